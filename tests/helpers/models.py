"""The models the tests publish: the tiny ResNet (kB, real export path) and its contract,
the trained demo, and comparing answers and trees."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.model.contract import PreprocessContract
from service.model.repository import load_spec
from tests.helpers.images import image_bytes


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 for every file under ``path`` (hidden ones included)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".resnet-export.lock"
    }


@dataclass(frozen=True)
class Demo:
    repository: Path
    images: Path
    checkpoint: Path  # the trained weights (`demo --checkpoint-out`)
    stdout: str

    @property
    def model_dir(self) -> Path:
        return self.repository / "digits"

    @property
    def contract(self) -> PreprocessContract:
        return load_spec(self.model_dir).contract

    def pngs(self) -> list[tuple[Path, int]]:
        return sorted((p, int(p.parent.name)) for p in self.images.rglob("*.png"))

    def export_command(self, repository: Path, name: str) -> list[str]:
        """``resnet-export export`` publishing the trained weights as the demo did, as
        ``name`` in ``repository`` (the command demo's own log gives)."""
        from export.demo import export_command

        labels = self.model_dir / "labels.txt"
        command = export_command(self.contract, self.checkpoint, labels)
        return [*command, "--name", name, "--repository", str(repository)]


TINY_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

TINY_CONTRACT = PreprocessContract(
    arch="tiny",
    input_name="input",
    output_name="logits",
    channels="RGB",
    resize=36,
    crop=32,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    num_classes=10,
)


def contract(**changes: object) -> PreprocessContract:
    """The one contract of the tests (``TINY_CONTRACT``), with ``changes``, validated as a
    published one is (model_copy would not check them)."""
    return PreprocessContract(**{**TINY_CONTRACT.model_dump(), **changes})


@dataclass(frozen=True)
class Tiny:
    """A ResNet of a few kB (random weights, 10 classes, RGB 32x32): every transport test
    runs on it in milliseconds."""

    repository: Path
    name: str = "tiny"

    @property
    def model_dir(self) -> Path:
        return self.repository / self.name

    @property
    def contract(self) -> PreprocessContract:
        return load_spec(self.model_dir).contract


def assert_same_predictions(ours: list[dict], theirs: list[dict]) -> None:
    """Two answers' prediction lists for one image (REST ``predictions[i]``): the same
    classes in the same order, the same probabilities within float32 rounding."""
    assert [p["index"] for p in ours] == [p["index"] for p in theirs]
    np.testing.assert_allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5)


def publish_tiny(repository: Path, name: str, contract: PreprocessContract) -> Tiny:
    """The tiny network (the same weights every time: seed 0) published as ``name``."""
    import torch

    from export.models import BasicBlock, ResNet
    from export.pipeline import export_and_publish
    from export.repository import ServingConfig

    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, channels=(4, 8, 8, 8))
    export_and_publish(
        model=model,
        contract=contract,
        labels=TINY_LABELS,
        name=name,
        repository=repository,
        flavor="onnxruntime",
        serving=ServingConfig(max_batch_size=8),
        opset=17,
        real_images=[image_bytes(seed=s) for s in range(2)],
        source="tests",
        log=lambda _: None,
    )
    return Tiny(repository, name)


# ResNet-50's contract, and a grey one: what the preprocessing tests run with.
RGB = contract(arch="resnet50", resize=256, crop=224, num_classes=1000)  # ResNet-50's

GREY = RGB.model_copy(
    update={"channels": "L", "mean": (0.5,), "std": (0.25,), "resize": 36, "crop": 32}
)


def as_bf16(repo: Path, name: str = "tiny") -> None:
    """Version 1 of ``name`` in ``repo`` made a bf16 version: its contract says bf16 over the
    same FP32 graph, as export's ``--precision bf16`` publishes it."""
    import json

    from service.model.repository import CONTRACT_FILENAME

    path = repo / name / "1" / CONTRACT_FILENAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "precision": "bf16"}))


def unconvertible_graph(path: Path) -> None:
    """A valid graph with the tiny contract's tensors that ONNX Runtime runs and OpenVINO
    has no conversion for (StringNormalizer: strings have no place in its CPU plugin)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Cast", ["mean"], ["text"], to=TensorProto.STRING),
        helper.make_node("StringNormalizer", ["text"], ["same"], locale="C"),
        helper.make_node("Cast", ["same"], ["number"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["number", "axis"], ["column"]),
        helper.make_node("Tile", ["column", "repeats"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unconvertible",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("repeats", TensorProto.INT64, [2], [1, 10]),
        ],
    )
    # IR 8: what ONNX Runtime 1.31 reads (onnx writes its newest by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
