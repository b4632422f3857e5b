"""PyTorch -> ONNX, then proof: the ONNX checker and a parity run against PyTorch.

An export is not done until it is checked (timm's utils/onnx.py): tensors are named, only
the batch axis is dynamic, ``onnx.checker`` runs with ``full_check``, and ONNX Runtime must
reproduce PyTorch's logits on the same inputs (random tensors and real images pushed
through the model's own preprocessing contract) before anything is published.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import ExportError
from export.gate import run_onnx
from service.dataplane.preprocess import normalized, preprocess
from service.errors import brief
from service.model.contract import PreprocessContract
from service.model.repository import TensorSig, tensor_problems

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 21


@dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduced PyTorch on the same inputs."""

    inputs_random: int
    inputs_real: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    top1_disagreements_beyond_tolerance: int
    passed: bool
    #: A uint8 graph: its largest difference from the float-input network fed the
    #: gateway's normalized planes of the same pixels (within the tolerance to pass).
    max_abs_diff_vs_float_input: float | None = None

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        floats = self.max_abs_diff_vs_float_input
        versus = "" if floats is None else f", max |uint8 graph - float input| = {floats:.3g}"
        return (
            f"parity {verdict}: max |onnx - torch| = {self.max_abs_diff:.3g}{versus} "
            f"(tolerance {self.tolerance:.3g}), top-1 agreement "
            f"{self.top1_agreement:.2%} on {self.inputs_random} random + "
            f"{self.inputs_real} real inputs"
        )


class PixelInput(nn.Module):
    """A network behind the contract's normalization as the graph's first nodes (a uint8
    contract): 8-bit pixels (N, H, W, C) as decoded in, to NCHW float, scaled by
    1 / (255 std) and shifted by mean / std per channel (Cast, Transpose, Mul, Sub: exact
    at the borders, where folding them into the first convolution's weights would not be,
    since its zero padding is zero after normalization, not before)."""

    def __init__(self, net: nn.Module, contract: PreprocessContract) -> None:
        super().__init__()
        self.net = net
        std = torch.tensor(contract.std, dtype=torch.float32).reshape(1, -1, 1, 1)
        mean = torch.tensor(contract.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2).float() * self.scale - self.shift)


def for_contract(model: nn.Module, contract: PreprocessContract) -> nn.Module:
    """The module whose graph takes the contract's input: ``model`` itself for float32
    planes, PixelInput around it for uint8 pixels."""
    return PixelInput(model, contract) if contract.dtype == "uint8" else model


def random_inputs(rng: np.random.Generator, n: int, contract: PreprocessContract) -> np.ndarray:
    """``n`` random inputs of the contract's shape and dtype (normal planes, or any pixels)."""
    if contract.dtype == "uint8":
        return rng.integers(0, 256, (n, *contract.input_shape), dtype=np.uint8)
    return rng.standard_normal((n, *contract.input_shape), dtype=np.float32)


def export_onnx(model: nn.Module, contract: PreprocessContract, path: Path, opset: int) -> None:
    """Write ``model`` as ONNX with named tensors and a dynamic batch axis only."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    model.eval()
    dummy = torch.from_numpy(np.zeros((2, *contract.input_shape), dtype=contract.dtype))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[contract.input_name],
            output_names=[contract.output_name],
            dynamic_axes={contract.input_name: {0: "batch"}, contract.output_name: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def check_onnx(path: Path, contract: PreprocessContract) -> None:
    """``onnx.checker`` (full) plus: the graph's tensors are the contract's tensors."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph ({brief(exc)})") from exc
    problems = graph_problems(onnx.load(str(path), load_external_data=False), contract)
    if problems:
        raise ExportError(f"{path}: " + "; ".join(problems))


_DATATYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
}


def _sig(value_info: onnx.ValueInfoProto) -> TensorSig:
    t = value_info.type.tensor_type
    dims = tuple(-1 if d.dim_param or not d.dim_value else d.dim_value for d in t.shape.dim)
    dtype = _DATATYPES.get(t.elem_type) or onnx.TensorProto.DataType.Name(t.elem_type)
    return TensorSig(value_info.name, dtype, dims)


def graph_problems(model: onnx.ModelProto, contract: PreprocessContract) -> list[str]:
    """Every way in which the ONNX graph's tensors disagree with the contract (none: [])."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_sig(i) for i in model.graph.input if i.name not in initializers]
    return tensor_problems(contract, inputs, [_sig(o) for o in model.graph.output], "graph")


def real_images() -> list[bytes]:
    """Real photographs that ship with scikit-learn (no download): china.jpg, flower.jpg."""
    from sklearn.datasets import load_sample_images

    return [Path(name).read_bytes() for name in load_sample_images().filenames]


def parity_check(
    model: nn.Module,
    onnx_path: Path,
    contract: PreprocessContract,
    real: list[np.ndarray],
    n_random: int = 4,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> ParityReport:
    """Run PyTorch and ONNX Runtime on the same inputs and compare logits and top-1.

    ``real`` are preprocessed real images (tensors of ``contract.input_shape`` and dtype).
    Top-1 disagreements only fail the check where PyTorch's own margin between its top two
    classes exceeds the tolerance (a near-tie may legitimately flip). A uint8 graph
    (PixelInput) is also compared with its network fed the float planes the gateway makes
    of the same pixels: what serving the float-input graph would answer.
    """
    rng = np.random.default_rng(seed)
    batches = [random_inputs(rng, n_random, contract)]
    if real:
        batches.append(np.stack(real).astype(contract.dtype))
    x = np.concatenate(batches)

    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
        floats = (
            model.net(torch.from_numpy(normalized(x, contract))).numpy()
            if isinstance(model, PixelInput)
            else None
        )
    got = run_onnx(onnx_path, contract, x)
    diff = float(np.max(np.abs(got - ref)))
    tolerance = atol + rtol * float(np.max(np.abs(ref)))
    float_diff = None if floats is None else float(np.max(np.abs(got - floats)))
    agree = got.argmax(1) == ref.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    margin = top2[:, 1] - top2[:, 0]
    hard = int(np.sum(~agree & (margin > tolerance)))
    return ParityReport(
        inputs_random=n_random,
        inputs_real=len(real),
        max_abs_diff=diff,
        tolerance=tolerance,
        top1_agreement=float(agree.mean()),
        top1_disagreements_beyond_tolerance=hard,
        passed=diff <= tolerance and hard == 0 and (float_diff or 0.0) <= tolerance,
        max_abs_diff_vs_float_input=float_diff,
    )


def preprocess_real(contract: PreprocessContract, images: list[bytes]) -> list[np.ndarray]:
    return [preprocess(data, contract) for data in images]
