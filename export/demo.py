"""The demo model: a ResNet-18 trained on scikit-learn's bundled handwritten digits.

1,797 real 8x8 greyscale scans, 10 classes, no download. The gateway will receive these
digits as ordinary PNG files (pixel = round(v * 255 / 16)), so the training tensors are
made by encoding each digit as exactly such a PNG and running it through the gateway's own
preprocessing (``service.dataplane.preprocess``) under the model's contract: what the model learns
from is byte-for-byte what it will be served.
"""

from __future__ import annotations

import io
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from export.errors import ExportError
from export.gate import DEFAULT_MIN_AGREEMENT
from export.images import Images, spread
from export.models import build_model
from export.pipeline import export_and_publish
from export.plan import PrecisionPlan, check_precision
from export.publish import ExportResult
from export.quantize import DEFAULT_CALIBRATION_COUNT, Precision
from export.repository import Flavor, ServingConfig, ensure_writable
from export.trt_node import write_atomic
from service.dataplane.preprocess import preprocess
from service.host.cpus import usable_cpus
from service.model.contract import PreprocessContract, input_fields

DEMO_NAME = "digits"
DEMO_ARCH = "resnet18"
#: 8x8 digits are upscaled to this side; ResNet's five stride-2 stages need room.
DEMO_SIDE = 32
MIN_ACCURACY = 0.97


@dataclass(frozen=True)
class DigitsSplit:
    train_png: list[bytes]
    train_y: np.ndarray
    test_png: list[bytes]
    test_y: np.ndarray


def digit_png(values: np.ndarray) -> bytes:
    """One sklearn digit (64 values in 0..16) as an 8x8 greyscale PNG."""
    pixels = np.rint(values.reshape(8, 8) * 255.0 / 16.0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def load_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    return DigitsSplit(
        [digit_png(v) for v in x_train],
        np.asarray(y_train),
        [digit_png(v) for v in x_test],
        np.asarray(y_test),
    )


def demo_contract(mean: float, std: float) -> PreprocessContract:
    return PreprocessContract(
        arch=DEMO_ARCH,
        input_name="input",
        output_name="logits",
        channels="L",
        resize=DEMO_SIDE,
        crop=DEMO_SIDE,
        interpolation="bilinear",
        mean=(mean,),
        std=(std,),
        num_classes=10,
    )


def _tensors(pngs: list[bytes], contract: PreprocessContract) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess(p, contract) for p in pngs]))


def accuracy(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred.numpy() == y).mean())


def train(
    split: DigitsSplit, epochs: int, seed: int, log: Callable[[str], None]
) -> tuple[nn.Module, PreprocessContract, float]:
    torch.manual_seed(seed)
    torch.set_num_threads(usable_cpus())
    # Normalisation statistics are the training set's, measured through the contract's own
    # resize (mean/std 0/1 first, so the tensors are plain 0..1 pixels).
    raw = _tensors(split.train_png, demo_contract(0.0, 1.0))
    contract = demo_contract(round(float(raw.mean()), 4), round(float(raw.std()), 4))
    x_train = _tensors(split.train_png, contract)
    x_test = _tensors(split.test_png, contract)
    y_train = torch.from_numpy(split.train_y).long()

    model = build_model(DEMO_ARCH, num_classes=10, in_chans=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=4e-3, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(seed)
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            xb = _jitter(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = accuracy(model, x_test, split.test_y)
        log(
            f"epoch {epoch:2d}/{epochs}  loss {total / len(x_train):.4f}  "
            f"held-out accuracy {acc:.2%}  ({time.perf_counter() - t0:.1f}s)"
        )
    return model, contract, acc


def _jitter(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (the digits are not all centred)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def write_images(split: DigitsSplit, out: Path) -> int:
    """Held-out digits as PNG files, ImageFolder layout: ``out/<label>/<n>.png``."""
    for n, (png, label) in enumerate(zip(split.test_png, split.test_y, strict=True)):
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n}.png").write_bytes(png)
    return len(split.test_png)


def run_demo(
    repository: Path,
    flavor: Flavor = "onnxruntime",
    epochs: int = 12,
    seed: int = 0,
    images_out: Path | None = None,
    serving: ServingConfig | None = None,
    precision: Precision = "fp32",
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    input_dtype: str = "float32",
    checkpoint_out: Path | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    ensure_writable(repository)  # before a minute of training, not after
    if checkpoint_out is not None:
        if checkpoint_out.is_dir():
            raise ExportError(f"--checkpoint-out {checkpoint_out} is a directory, not a file")
        ensure_writable(checkpoint_out.parent, "--checkpoint-out's directory")
    check_precision(precision)
    split = load_split(seed)
    log(
        f"digits: {len(split.train_png)} training / {len(split.test_png)} held-out images, "
        f"training {DEMO_ARCH} for {epochs} epochs on {torch.get_num_threads()} threads"
    )
    model, contract, acc = train(split, epochs, seed, log)
    if acc < MIN_ACCURACY:
        raise ExportError(
            f"demo model reached only {acc:.2%} held-out accuracy (< {MIN_ACCURACY:.0%})"
        )
    # Trained on float planes; published to take what ``input_dtype`` says (a uint8 graph
    # normalizes the same pixels in its first nodes).
    contract = contract.model_copy(update=input_fields(input_dtype))
    plan = None
    if precision != "fp32":
        # INT8 calibrates on training digits; every precision is judged on the held-out
        # ones, which the model has never seen in any form.
        calibration = _tensors(spread(split.train_png, DEFAULT_CALIBRATION_COUNT), contract)
        plan = PrecisionPlan(
            precision=precision,
            calibration=Images(calibration.numpy(), "digits training images"),
            validation=Images(_tensors(split.test_png, contract).numpy(), "held-out digits"),
            min_agreement=min_agreement,
        )
    result = export_and_publish(
        model=model,
        contract=contract,
        labels=[str(i) for i in range(10)],
        name=DEMO_NAME,
        repository=repository,
        flavor=flavor,
        serving=serving or ServingConfig(),
        opset=17,
        real_images=split.test_png[:64],
        source="resnet-export demo (sklearn digits)",
        plan=plan,
        extra_report={
            "training": {
                "dataset": "sklearn.datasets.load_digits",
                "train_images": len(split.train_png),
                "heldout_images": len(split.test_png),
                "epochs": epochs,
                "seed": seed,
                "heldout_accuracy_torch": acc,
            }
        },
        log=log,
    )
    if images_out is not None:
        n = write_images(split, images_out)
        log(f"wrote {n} held-out PNGs to {images_out}/<label>/<n>.png")
    if checkpoint_out is not None:
        write_checkpoint(model, contract, checkpoint_out, repository / DEMO_NAME, log)
    return result


def write_checkpoint(
    model: nn.Module,
    contract: PreprocessContract,
    path: Path,
    model_dir: Path,
    log: Callable[[str], None],
) -> None:
    """The trained weights as a checkpoint ``resnet-export export --weights`` reads (a
    state_dict), whole or not at all, and the command that exports them as the demo did:
    a real checkpoint to try the export path on."""
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    write_atomic(path, buf.getbuffer())
    command = shlex.join(export_command(contract, path, model_dir / "labels.txt"))
    log(f"wrote the trained weights to {path}; exported as the demo was by: {command}")


def export_command(contract: PreprocessContract, weights: Path, labels: Path) -> list[str]:
    """``resnet-export export`` publishing ``weights`` under the demo's ``contract`` (add
    ``--name`` and ``--repository``)."""
    return [
        "resnet-export", "export", "--arch", contract.arch, "--weights", str(weights),
        "--num-classes", str(contract.num_classes), "--labels", str(labels),
        "--channels", contract.channels, "--resize", str(contract.resize),
        "--crop", str(contract.crop), "--interpolation", contract.interpolation,
        "--mean", ",".join(map(str, contract.mean)), "--std", ",".join(map(str, contract.std)),
        "--input", contract.dtype,
    ]  # fmt: skip
