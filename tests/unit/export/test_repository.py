"""Repository writing: Triton-parseable configs, versions, atomic publishing, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import ExportError
from export.gate import run_onnx
from export.images import Images
from export.models import BasicBlock, ResNet
from export.onnx_export import preprocess_real, real_images
from export.pipeline import export_and_publish
from export.plan import PrecisionPlan
from export.repository import (
    PROBE_SIZE,
    Probe,
    Publication,
    ServingConfig,
    build_config,
    publish,
    render_config,
    republish,
    set_rollout,
    validate_model,
    validate_repository,
)
from service.model.contract import PreprocessContract
from service.model.repository import (
    Rollout,
    load_probe,
    load_spec,
    parse_config,
    read_rollout,
    served_versions,
)
from tests.helpers.models import contract, tree_digest


def small_model():
    """A ResNet of a few kB: publishing tests need a real graph, not a big one."""
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=3, channels=(4, 8, 8, 8))


LABELS = ["cat", "dog", "ship"]


def small_contract(**kw) -> PreprocessContract:
    return contract(**{"resize": 40, "num_classes": 3, **kw})


def publish_small(
    repo: Path,
    name: str = "tiny",
    flavor="onnxruntime",
    model=None,
    seed=0,
    real_images_override=None,
    **kw,
):
    torch.manual_seed(seed)
    return export_and_publish(
        model=model or small_model(),
        contract=small_contract(),
        labels=LABELS,
        name=name,
        repository=repo,
        flavor=flavor,
        serving=ServingConfig(max_batch_size=16),
        opset=17,
        real_images=real_images() if real_images_override is None else real_images_override,
        source="test",
        log=lambda _: None,
        **kw,
    )


@pytest.mark.parametrize("flavor", ["onnxruntime", "python-ort"])
def test_config_parses_with_tritons_model_config(tmp_path, flavor):
    result = publish_small(tmp_path, flavor=flavor)
    text = (result.model_dir / "config.pbtxt").read_text()
    cfg = parse_config(text)  # tritonclient's model_config_pb2 + text_format
    assert cfg.name == "tiny"
    assert cfg.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("input", mc.TYPE_FP32, [3, 32, 32])
    ]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [
        ("logits", [3], "labels.txt")
    ]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.version_policy.latest.num_versions == 1
    # Every batch size the gateway may send is warmed, with zeros of the input's shape.
    assert [w.batch_size for w in cfg.model_warmup] == list(range(1, 17))
    assert all(
        w.inputs["input"].zero_data and list(w.inputs["input"].dims) == [3, 32, 32]
        for w in cfg.model_warmup
    )
    assert len(cfg.instance_group) == 1
    if flavor == "onnxruntime":
        assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
    else:
        assert cfg.backend == "python" and not cfg.platform
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert (result.model_dir / "1" / "model.py").is_file()
    assert (result.model_dir / "labels.txt").read_text().splitlines() == LABELS
    # One copy of the contract, in the version it describes.
    assert not (result.model_dir / "preprocess.json").exists()
    contract = PreprocessContract.load(result.model_dir / "1" / "preprocess.json")
    assert contract == small_contract() == load_spec(result.model_dir).contract


def test_report_records_checks(tmp_path):
    result = publish_small(tmp_path)
    report = json.loads((result.model_dir / "1" / "export_report.json").read_text())
    assert report["onnx_checker"] == "pass"
    assert report["parity"]["passed"] is True
    assert report["parity"]["inputs_real"] == 2
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert report["version"] == 1


def test_each_export_adds_a_version_and_keeps_the_old(tmp_path):
    first = publish_small(tmp_path, seed=0)
    v1 = tree_digest(first.model_dir / "1")
    second = publish_small(tmp_path, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert tree_digest(second.model_dir / "1") == v1
    assert (second.model_dir / "2" / "model.onnx").read_bytes() != (
        second.model_dir / "1" / "model.onnx"
    ).read_bytes()
    assert validate_repository(tmp_path) == (["tiny"], [])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_failed_publish_leaves_repository_untouched(tmp_path, monkeypatch):
    publish_small(tmp_path)
    before = tree_digest(tmp_path)

    def broken_copy(src, dst, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)  # dies half-way through staging
    with pytest.raises(OSError, match="No space left"):
        publish_small(tmp_path, seed=3)
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["tiny"]


class Noisy(torch.nn.Module):
    """Exports fine, but ONNX Runtime's random numbers are not PyTorch's: parity must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_model()

    def forward(self, x):
        return self.net(x) + torch.rand_like(self.net(x)) * 10


def test_parity_failure_publishes_nothing(tmp_path):
    publish_small(tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(ExportError, match="not published: parity FAIL"):
        publish_small(tmp_path, model=Noisy())
    assert tree_digest(tmp_path) == before


def test_labels_count_mismatch_refused(tmp_path):
    with pytest.raises(ExportError, match="2 labels for 3 classes"):
        export_and_publish(
            model=small_model(),
            contract=small_contract(),
            labels=["a", "b"],
            name="x",
            repository=tmp_path,
            flavor="onnxruntime",
            serving=ServingConfig(),
            opset=17,
            real_images=[],
            source="t",
            log=lambda _: None,
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", [".hidden", "a/b", "", "x" * 200, "sp ace"])
def test_bad_model_names(tmp_path, name):
    with pytest.raises(ExportError, match="model name"):
        publish_small(tmp_path, name=name)


def test_bad_serving_config():
    with pytest.raises(ExportError, match="max-batch-size must be at least 1"):
        build_config("m", small_contract(), "onnxruntime", ServingConfig(max_batch_size=0))
    with pytest.raises(ExportError, match="exceed --max-batch-size"):
        build_config(
            "m",
            small_contract(),
            "onnxruntime",
            ServingConfig(max_batch_size=4, preferred_batch_sizes=(8,)),
        )


def test_render_round_trips():
    cfg = build_config("m", small_contract(), "python-ort", ServingConfig(max_batch_size=8))
    assert parse_config(render_config(cfg)) == cfg


@pytest.fixture
def good(tmp_path) -> Path:
    return publish_small(tmp_path).model_dir


def test_validate_accepts_a_good_model(good):
    assert validate_model(good) == []


def test_validate_finds_a_broken_config(good):
    (good / "config.pbtxt").write_text("name: 'tiny'\nmax_batch_size: lots\n")
    assert any("does not parse as a Triton ModelConfig" in p for p in validate_model(good))


def test_validate_finds_labels_count_mismatch(good):
    (good / "labels.txt").write_text("a\nb\n")
    assert validate_model(good) == ["tiny: labels.txt has 2 names for 3 classes"]


def test_validate_finds_missing_onnx(good):
    (good / "1" / "model.onnx").unlink()
    assert validate_model(good) == ["tiny: version 1: model.onnx missing"]


def test_validate_finds_contract_graph_disagreement(good):
    data = json.loads((good / "1" / "preprocess.json").read_text())
    data["crop"] = 28
    (good / "1" / "preprocess.json").write_text(json.dumps(data))
    assert validate_model(good) == [
        "tiny: version 1: probe.npz inputs are float32 [2, 3, 32, 32], the contract says "
        "float32 [n, 3, 28, 28] with n >= 1",
        "tiny: version 1: config.pbtxt inputs ['input' FP32 [-1, 3, 32, 32]] != preprocess.json "
        "['input' FP32 [-1, 3, 28, 28]]",
        "tiny: version 1: graph inputs ['input' FP32 [-1, 3, 32, 32]] != preprocess.json "
        "['input' FP32 [-1, 3, 28, 28]]",
    ]


def test_validate_checks_every_version(tmp_path):
    publish_small(tmp_path, seed=0)
    model_dir = publish_small(tmp_path, seed=1).model_dir
    (model_dir / "1" / "preprocess.json").write_text('{"arch": "resnet18"}')
    problems = validate_model(model_dir)
    assert len(problems) == 1 and problems[0].startswith(
        "tiny: version 1: preprocess.json: not a valid preprocessing contract"
    )


def test_validate_finds_bad_contract(good):
    (good / "1" / "preprocess.json").write_text('{"arch": "resnet18"}')
    assert any("not a valid preprocessing contract" in p for p in validate_model(good))


def test_validate_empty_repository(tmp_path):
    assert validate_repository(tmp_path) == ([], [f"{tmp_path}: holds no model"])


def test_republish_keeps_the_verified_graph(good, tmp_path):
    target = tmp_path / "other"
    assert republish(good, target, "python-ort") == 1
    spec = load_spec(target / "tiny")
    assert spec.config.backend == "python" and spec.contract == load_spec(good).contract
    assert spec.model_path.read_bytes() == (good / "1" / "model.onnx").read_bytes()
    assert validate_repository(target) == (["tiny"], [])


def test_an_engine_is_published_with_its_tensorrt_config_until_a_newer_onnx(tmp_path):
    """The layout of a --format tensorrt publication (the plan here is placeholder bytes:
    building a real one needs a GPU; tests/unit/export/test_tensorrt.py builds it there)."""
    from export.repository import Engine, Publication, ServingConfig, publish, validate_model
    from export.tensorrt import EngineManifest

    repo = tmp_path / "repo"
    publish_small(repo)
    spec = load_spec(repo / "tiny")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    manifest = EngineManifest(
        tensorrt_version="10.8.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        cuda_version="12.8", precision="fp32", max_batch_size=8, opt_batch_size=8,
        onnx_sha256="0" * 64,
    )  # fmt: skip
    report = json.loads((spec.model_path.parent / "export_report.json").read_text())
    pub = Publication("tiny", spec.contract, list(spec.labels), spec.model_path, "onnxruntime",
                      ServingConfig(max_batch_size=8), report, Engine(plan, manifest.to_json()))  # fmt: skip
    assert publish(repo, pub) == 2
    trt = parse_config((repo / "tiny" / "configs" / "tensorrt.pbtxt").read_text())
    onnx_cfg = parse_config((repo / "tiny" / "config.pbtxt").read_text())
    assert (trt.platform, trt.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert onnx_cfg.platform == "onnxruntime_onnx"
    assert trt.input == onnx_cfg.input and trt.output == onnx_cfg.output
    assert trt.max_batch_size == onnx_cfg.max_batch_size
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in trt.instance_group)
    assert EngineManifest.load(repo / "tiny" / "2" / "engine.json") == manifest
    assert validate_model(repo / "tiny") == []
    (repo / "tiny" / "2" / "model.plan").unlink()
    assert validate_model(repo / "tiny") == [
        "tiny: configs/tensorrt.pbtxt serves model.plan, missing in version 2"
    ]
    # A newer ONNX-only version: Triton would serve it, so the TensorRT config goes.
    pub.engine = None
    assert publish(repo, pub) == 3
    assert not (repo / "tiny" / "configs").exists()


# --- the parity probe ------------------------------------------------------------------------


def probe_of(version_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(version_dir / "probe.npz", allow_pickle=False) as data:
        return data["inputs"], data["outputs"]


def test_publish_writes_a_probe_of_the_published_graph(good):
    inputs, outputs = probe_of(good / "1")
    # The parity check's two real photographs, and ONNX Runtime's logits for them.
    assert inputs.dtype == outputs.dtype == np.float32
    assert inputs.shape == (2, 3, 32, 32) and outputs.shape == (2, 3)
    spec = load_spec(good)
    np.testing.assert_array_equal(outputs, run_onnx(spec.model_path, spec.contract, inputs))
    stored = load_probe(spec)  # the gateway's reader
    assert stored is not None and np.array_equal(stored[0], inputs)
    report = json.loads((good / "1" / "export_report.json").read_text())
    assert report["probe"] == {"inputs": 2, "source": "parity images", "outputs": "onnxruntime"}


def test_probe_without_real_images_uses_the_parity_checks_random_inputs(tmp_path):
    result = publish_small(tmp_path, real_images_override=[])
    inputs, outputs = probe_of(result.model_dir / "1")
    assert inputs.shape == (PROBE_SIZE, 3, 32, 32) and outputs.shape == (PROBE_SIZE, 3)
    assert result.report["probe"]["source"] == "random inputs"
    assert validate_model(result.model_dir) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_reduced_precision_probe_holds_the_reduced_graphs_outputs(tmp_path, precision):
    """The probe is the published graph's (the gate's images through the INT8/FP16 graph),
    not the FP32 graph's: that is what the gateway serves; for INT8 the exact reference's,
    which every CPU's kernels must match, not this CPU's kernels'."""
    images = Images(np.stack(preprocess_real(small_contract(), real_images() * 3)), "photos")
    plan = PrecisionPlan(
        precision=precision,
        calibration=images if precision == "int8" else None,
        validation=images,
        min_agreement=0,  # untrained weights: near-tied logits
    )
    result = publish_small(tmp_path, plan=plan)
    vdir = result.model_dir / "1"
    inputs, outputs = probe_of(vdir)
    assert len(inputs) == PROBE_SIZE
    contract = load_spec(result.model_dir).contract
    assert contract.precision == precision
    exact = precision == "int8"
    expected = run_onnx(vdir / "model.onnx", contract, inputs, exact=exact)
    np.testing.assert_array_equal(outputs, expected)
    made_by = "INT8 exact reference" if exact else "onnxruntime"
    assert result.report["probe"] == {"inputs": PROBE_SIZE, "source": "photos", "outputs": made_by}


def test_republish_copies_the_probe(good, tmp_path):
    target = tmp_path / "other"
    republish(good, target, "python-ort")
    for got, want in zip(probe_of(target / "tiny" / "1"), probe_of(good / "1"), strict=True):
        np.testing.assert_array_equal(got, want)


def test_republish_of_a_version_without_probe_publishes_none(good, tmp_path):
    (good / "1" / "probe.npz").unlink()  # exported before probes existed
    target = tmp_path / "other"
    republish(good, target, "python-ort")
    assert not (target / "tiny" / "1" / "probe.npz").exists()
    assert validate_repository(target) == (["tiny"], [])


def test_a_version_without_probe_is_valid(good):
    (good / "1" / "probe.npz").unlink()
    assert validate_model(good) == []


X = np.zeros((2, 3, 32, 32), np.float32)
Y = np.zeros((2, 3), np.float32)


def test_publish_refuses_a_malformed_probe(good):
    repo = good.parent
    before = tree_digest(repo)
    spec = load_spec(good)
    report = json.loads((good / "1" / "export_report.json").read_text())
    pub = Publication("tiny", spec.contract, list(spec.labels), spec.model_path, "onnxruntime",
                      ServingConfig(max_batch_size=8), report, probe=Probe(X, Y[:, :2]))  # fmt: skip
    with pytest.raises(ExportError, match=r"refusing to publish: tiny: version 2: probe.npz out"):
        publish(repo, pub)
    assert tree_digest(repo) == before


# --- rollout.json ----------------------------------------------------------------------------


def test_a_new_version_keeps_the_rollout(tmp_path):
    publish_small(tmp_path, seed=0)
    model_dir = publish_small(tmp_path, seed=1).model_dir
    rollout = Rollout(weights={"1": 90, "2": 10})
    assert set_rollout(tmp_path, "tiny", rollout) == ([1, 2], rollout)
    publish_small(tmp_path, seed=2)
    assert read_rollout(model_dir) == rollout
    assert served_versions(model_dir) == ([1, 2, 3], rollout)
    assert validate_model(model_dir) == []


def test_what_publish_and_rollout_write_is_readable_by_other_users(tmp_path):
    """The gateway and Triton run as other users (uid 10001 in the image) than the export
    that wrote the repository: nothing may be left at a temporary file's owner-only mode."""
    publish_small(tmp_path, seed=0)
    model_dir = publish_small(tmp_path, seed=1).model_dir
    set_rollout(tmp_path, "tiny", Rollout(weights={"1": 90, "2": 10}))
    for path in [model_dir, *model_dir.rglob("*")]:
        mode = path.stat().st_mode
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others read
        if path.is_dir():
            assert mode & 0o011 == 0o011, (path, oct(mode))  # and enter


def test_set_rollout_refuses_a_version_not_on_disk(good):
    with pytest.raises(ExportError, match=r"model 'tiny' has no version 4, 7 \(versions: 1\)"):
        set_rollout(good.parent, "tiny", Rollout(weights={"1": 1, "7": 0}, shadow="4"))
    assert not (good / "rollout.json").exists()


def test_validate_finds_a_rollout_naming_a_missing_version(good):
    (good / "rollout.json").write_text('{"weights": {"1": 1, "5": 2}}')
    assert validate_model(good) == ["tiny: rollout.json names version 5, not on disk"]
    (good / "rollout.json").write_text('{"weights": {"1": -1}}')
    assert validate_model(good) == [
        "tiny: rollout.json: weights: weight of version 1 must be 0 or more, got -1.0"
    ]
