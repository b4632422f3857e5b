"""TensorRT engines: the trtexec command, the build Job (which runs export/trt_node.py: run
for real in test_trt_node.py), engine.json, and the Python build's settings.

TensorRT needs an NVIDIA GPU. Where there is none, ``build_engine``'s settings are checked
against a recording stand-in for the ``tensorrt`` module (names as in TensorRT 10's and
11's Python API), and the one test that builds and runs a real engine is skipped with the
reason.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from onnx import TensorProto

from export import tensorrt as trt_mod
from export.build_job import TRT_IMAGE, job_name, render_build_job
from export.errors import ExportError
from export.tensorrt import (
    MANIFEST_FILENAME,
    PLAN_FILENAME,
    TRT_CONFIG_NAME,
    EngineManifest,
    build_engine,
    run_engine,
    shell_command,
    trtexec_command,
    unavailable_reason,
)
from tests.helpers.models import TINY_CONTRACT

SMALL = TINY_CONTRACT
CONTRACT = SMALL.model_copy(
    update={"arch": "resnet50", "resize": 256, "crop": 224, "num_classes": 1000}
)
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
REASON = unavailable_reason()


# --- trtexec ------------------------------------------------------------------------------------

BASE = [
    "trtexec",
    "--onnx=m/1/model.onnx",
    "--saveEngine=m/1/model.plan",
    "--minShapes=input:1x3x224x224",
    "--optShapes=input:8x3x224x224",
    "--maxShapes=input:32x3x224x224",
]


@pytest.mark.parametrize(
    ("precision", "flags"), [("fp32", []), ("fp16", ["--fp16"]), ("int8", ["--int8", "--fp16"])]
)
def test_trtexec_command_shapes_and_precision_flags(precision, flags):
    argv = trtexec_command("m/1/model.onnx", "m/1/model.plan", CONTRACT, 32, precision)
    assert argv == BASE + flags
    # TensorRT 11: strongly typed, the graph's types are the precision; no such flags.
    for version in ("11.0.0.12", "11.4.1.3"):
        argv = trtexec_command(
            "m/1/model.onnx", "m/1/model.plan", CONTRACT, 32, precision, tensorrt_version=version
        )
        assert argv == BASE


def test_trtexec_command_timing_cache_and_small_max_batch():
    argv = trtexec_command("a.onnx", "a.plan", SMALL, 4, "fp16", timing_cache="/c/timing.cache")
    assert argv == [
        "trtexec",
        "--onnx=a.onnx",
        "--saveEngine=a.plan",
        "--minShapes=input:1x3x32x32",
        "--optShapes=input:4x3x32x32",  # opt is min(8, max)
        "--maxShapes=input:4x3x32x32",
        "--fp16",
        "--timingCacheFile=/c/timing.cache",
    ]


def test_trtexec_command_uses_the_contracts_input_name_and_channels():
    gray = SMALL.model_copy(update={"input_name": "pixels", "channels": "L", "mean": (0.5,)})
    gray = gray.model_copy(update={"std": (0.25,)})
    argv = trtexec_command("a.onnx", "a.plan", gray, 16, "fp32")
    assert argv[3:] == [
        "--minShapes=pixels:1x1x32x32",
        "--optShapes=pixels:8x1x32x32",
        "--maxShapes=pixels:16x1x32x32",
    ]
    # trtexec splits "name:dims" at ':' and shape lists at ',': such names are quoted.
    odd = SMALL.model_copy(update={"input_name": "input:0"})
    assert trtexec_command("a", "b", odd, 2, "fp32")[3] == "--minShapes='input:0':1x3x32x32"


@pytest.mark.parametrize(
    ("max_batch", "precision", "message"),
    [
        (0, "fp32", "max batch size must be at least 1, got 0"),
        (8, "bf16", "precision must be one of fp32, fp16, int8, got 'bf16'"),
    ],
)
def test_trtexec_command_rejects_bad_settings(max_batch, precision, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        trtexec_command("a", "b", CONTRACT, max_batch, precision)


def test_shell_command_quotes_what_the_shell_would_split():
    argv = trtexec_command("my models/x.onnx", "p.plan", CONTRACT, 32, "fp32")
    assert shell_command(argv).startswith("trtexec '--onnx=my models/x.onnx' --saveEngine=p.plan")


# --- the Kubernetes Job ---------------------------------------------------------------------------


def _job(model="ResNet_50.v2", version=3, precision="fp16", **kw) -> dict[str, Any]:
    text = render_build_job(model, version, 32, precision, **kw)
    return yaml.safe_load(text)


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def test_render_build_job_is_a_gpu_job_on_the_repository_claim():
    job = _job(namespace="inference")
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert job["metadata"]["namespace"] == "inference"
    assert job["metadata"]["annotations"]["resnet-serving/model"] == "ResNet_50.v2"
    spec = job["spec"]
    assert 0 <= spec["backoffLimit"] <= 3
    assert spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": "model-repository"}
    container = _container(job)
    assert container["image"] == TRT_IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": volume["name"], "mountPath": "/models"} in container["volumeMounts"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_render_build_job_runs_the_node_script_for_that_version():
    container = _container(_job(precision="int8"))
    assert container["command"] == [
        "sh",
        "-c",
        'exec python3 -c "$TRT_NODE" --repository /models --model ResNet_50.v2 --version 3 '
        "--require --verbose",
    ]
    # The script travels in the Job (one self-contained document), not in the image.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TRT_NODE"] == (Path(trt_mod.__file__).parent / "trt_node.py").read_text()


def test_render_build_job_options():
    job = _job(repository_claim="repo-pvc", image="registry.local/tensorrt:25.01-py3")
    assert "namespace" not in job["metadata"]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "repo-pvc"
    }
    assert _container(job)["image"] == "registry.local/tensorrt:25.01-py3"


@pytest.mark.parametrize(
    "model", ["ResNet_50.v2", "resnet50", "A", "x" * 128, "9.9-._a", "resnet--50__"]
)
def test_job_name_is_a_dns_1123_label(model):
    name = _job(model=model, version=12)["metadata"]["name"]
    assert DNS_1123_LABEL.match(name), name
    assert len(name) <= 63
    assert name.endswith("-v12")


def test_job_names_of_different_models_differ():
    names = {job_name(m, 1) for m in ("ResNet_50", "resnet-50", "resnet.50", "RESNET-50")}
    assert len(names) == 4
    assert job_name("resnet-50", 1) == "trt-resnet-50-v1"  # a valid name is kept as it is
    assert job_name("x" * 128, 1) != job_name("x" * 127 + "y", 1)


@pytest.mark.parametrize(
    ("model", "version", "message"),
    [
        ("../etc", 1, "model name '../etc' is not valid"),
        ("resnet", 0, "model version must be a positive integer, got 0"),
    ],
)
def test_render_build_job_rejects(model, version, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        render_build_job(model, version, 32, "fp32")


# --- engine.json ------------------------------------------------------------------------------------

MANIFEST = EngineManifest(
    tensorrt_version="10.8.0.43",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    cuda_version="12.8",
    precision="int8",
    max_batch_size=32,
    opt_batch_size=8,
    onnx_sha256="ab" * 32,
)


def test_manifest_round_trip(tmp_path):
    path = tmp_path / MANIFEST_FILENAME
    path.write_text(MANIFEST.to_json())
    assert EngineManifest.load(path) == MANIFEST
    assert json.loads(path.read_text())["compute_capability"] == "9.0"
    no_cuda = EngineManifest(**{**json.loads(MANIFEST.to_json()), "cuda_version": None})
    path.write_text(no_cuda.to_json())
    assert EngineManifest.load(path).cuda_version is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compute_capability": "sm_90"}, "compute_capability: 'sm_90' is not like '9.0'"),
        ({"precision": "fp8"}, "precision: 'fp8' is not one of fp32, fp16, int8"),
        ({"max_batch_size": 0}, "max_batch_size: a positive integer is expected, got 0"),
        ({"opt_batch_size": True}, "opt_batch_size: a positive integer is expected, got True"),
        ({"opt_batch_size": 64}, "opt_batch_size 64 exceeds max_batch_size 32"),
        ({"onnx_sha256": "abc"}, "onnx_sha256: 64 lowercase hex digits are expected"),
        ({"gpu_name": ""}, "gpu_name: a non-empty string is expected"),
    ],
)
def test_manifest_load_rejects_bad_fields(tmp_path, change, message):
    path = tmp_path / MANIFEST_FILENAME
    path.write_text(json.dumps({**json.loads(MANIFEST.to_json()), **change}))
    with pytest.raises(ExportError, match=re.escape(message)) as info:
        EngineManifest.load(path)
    assert str(info.value).startswith(f"{path}: not a valid engine manifest (")


def test_manifest_load_rejects_unreadable_and_incomplete_files(tmp_path):
    path = tmp_path / MANIFEST_FILENAME
    with pytest.raises(ExportError, match=re.escape(f"{path}: missing")):
        EngineManifest.load(path)
    path.write_text("{not json")
    with pytest.raises(ExportError, match="not a readable JSON file"):
        EngineManifest.load(path)
    data = json.loads(MANIFEST.to_json())
    del data["gpu_name"]
    path.write_text(json.dumps({**data, "gpu": "x"}))
    with pytest.raises(ExportError, match=re.escape("(missing gpu_name; unknown gpu)")):
        EngineManifest.load(path)
    path.write_text("[]")
    with pytest.raises(ExportError, match="a JSON object is expected"):
        EngineManifest.load(path)


def test_manifest_mismatch():
    assert MANIFEST.mismatch("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43") is None
    # Same architecture, another model: TensorRT loads it (with a warning).
    assert MANIFEST.mismatch("NVIDIA H200", "9.0", "10.8.0.43") is None
    assert MANIFEST.mismatch("NVIDIA H100 PCIe", "9", " 10.8.0.43\n") is None

    cc = MANIFEST.mismatch("NVIDIA A100-SXM4-80GB", "8.0", "10.8.0.43")
    assert cc is not None
    assert "built for compute capability 9.0 (NVIDIA H100 80GB HBM3), not 8.0" in cc
    assert "NVIDIA A100-SXM4-80GB" in cc
    assert "TensorRT 10.8.0.43, not" not in cc

    trt = MANIFEST.mismatch("NVIDIA H100 80GB HBM3", "9.0", "10.7.0.23")
    assert trt is not None
    assert "built by TensorRT 10.8.0.43, not 10.7.0.23" in trt
    assert "compute capability 9.0 (" not in trt

    both = MANIFEST.mismatch("NVIDIA L4", "8.9", "10.3.0")
    assert both is not None
    assert "not 8.9 (NVIDIA L4) and was built by TensorRT 10.8.0.43, not 10.3.0" in both
    assert both.endswith("rebuild it there")
    assert "\n" not in both


# --- availability -------------------------------------------------------------------------------


def test_unavailable_reason_is_one_line_or_none():
    assert REASON is None or (REASON.strip() and "\n" not in REASON)


def test_unavailable_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert unavailable_reason() == (
        "TensorRT is not installed (pip install tensorrt; it needs an NVIDIA GPU)"
    )


class _FakeCudart:
    """cuda-python's runtime module as far as device counting goes."""

    cudaError_t = enum.Enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})  # noqa: N815

    def __init__(self, count: int, err: str = "cudaSuccess") -> None:
        self.count, self.err = count, err

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.cudaError_t[self.err], self.count


def test_unavailable_without_a_gpu(monkeypatch):
    no_gpu = "no NVIDIA GPU is visible (TensorRT builds engines on the GPU they will run on)"
    fake = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_mod, "_import_cudart", lambda: _FakeCudart(0, "cudaErrorNoDevice"))
    assert unavailable_reason() == no_gpu
    monkeypatch.setattr(trt_mod, "_import_cudart", lambda: _FakeCudart(1))
    assert unavailable_reason() is None

    # Without cuda-python TensorRT itself is asked: its Builder cannot be made without a GPU.
    def no_cudart():
        raise ImportError("No module named 'cuda'")

    class Logger:
        ERROR = 1

        def __init__(self, severity: int) -> None:
            pass

    def builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    vars(fake).update(Logger=Logger, Builder=builder)
    monkeypatch.setattr(trt_mod, "_import_cudart", no_cudart)
    assert unavailable_reason() == no_gpu


def test_unavailable_reason_never_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))

    def broken():
        raise RuntimeError("CUDA driver version is insufficient\nfor CUDA runtime version")

    monkeypatch.setattr(trt_mod, "_cuda_device_count", broken)
    assert unavailable_reason() == (
        "TensorRT is unusable here (CUDA driver version is insufficient)"
    )


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are available here")
def test_build_and_run_refuse_with_the_reason(tmp_path):
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ExportError) as info:
        build_engine(onnx_path, tmp_path / "model.plan", CONTRACT, 32, "fp16")
    assert str(info.value) == REASON
    assert not (tmp_path / "model.plan").exists()
    with pytest.raises(ExportError) as info:
        run_engine(tmp_path / "model.plan", np.zeros((1, 3, 224, 224)), "input", "logits")
    assert str(info.value) == REASON


def test_run_engine_without_cuda_python(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_mod, "unavailable_reason", lambda: None)

    def no_cudart():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(trt_mod, "_import_cudart", no_cudart)
    with pytest.raises(ExportError, match=r"^running a TensorRT engine here needs cuda-python"):
        run_engine(tmp_path / "model.plan", np.zeros((1, 3, 32, 32)), "input", "logits")


# --- build_engine's settings, against a recording stand-in for TensorRT -------------------------


class _Severity(enum.IntEnum):  # TensorRT's ILogger.Severity order
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _BuilderFlag(enum.Enum):
    FP16 = 1
    INT8 = 2
    TF32 = 3


class _BuilderFlag11(enum.Enum):  # TensorRT 11 removed the precision flags
    TF32 = 3


class _LayerType(enum.Enum):
    CONVOLUTION = 1
    QUANTIZE = 2
    DEQUANTIZE = 3


def _fake_tensorrt(
    *,
    input_name: str = "input",
    input_shape: tuple[int, ...] = (-1, 3, 32, 32),
    parse_errors: tuple[str, ...] = (),
    quantize_layers: int = 0,
    build_fails: bool = False,
    version: str = "10.8.0.43",
) -> types.ModuleType:
    """A ``tensorrt`` module with the calls build_engine makes, recording them in
    ``trt.calls``: TensorRT 10's, or with ``version`` 11.x 11's (no precision flags)."""
    trt = types.ModuleType("tensorrt")
    calls: dict[str, Any] = {"flags": [], "profiles": [], "timing_cache_in": []}

    class ILogger:
        Severity = _Severity

        def __init__(self) -> None:
            pass

    class Network:
        num_inputs = 1
        num_layers = 3 + quantize_layers

        def get_input(self, i):
            return types.SimpleNamespace(name=input_name, shape=input_shape)

        def get_layer(self, i):
            kind = _LayerType.QUANTIZE if i < quantize_layers else _LayerType.CONVOLUTION
            return types.SimpleNamespace(type=kind)

    class Parser:
        def __init__(self, network, logger) -> None:
            self.num_errors = 0

        def parse_from_file(self, path):
            calls["parsed"] = path
            self.num_errors = len(parse_errors)
            return not parse_errors

        def get_error(self, i):
            return types.SimpleNamespace(node=lambda: i, desc=lambda: parse_errors[i])

    class Profile:
        def set_shape(self, name, min, opt, max):  # TensorRT's keyword names
            calls["profiles"].append((name, tuple(min), tuple(opt), tuple(max)))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self):
            return memoryview(self.data + b"+timings")

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_flag(self, flag):
            calls["flags"].append(flag.name)

        def add_optimization_profile(self, profile):
            calls["profile_added"] = True

        def create_timing_cache(self, data):
            calls["timing_cache_in"].append(bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            assert ignore_mismatch is False
            self.cache = cache
            return cache.data != b"from another gpu"

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.logger.log(_Severity.WARNING, "weights are outside of fp16 range")
            if build_fails:
                self.logger.log(
                    _Severity.ERROR, "Error Code 10: Could not find any\nimplementation"
                )
                return None
            return memoryview(b"serialized engine")

    vars(trt).update(
        __version__=version,
        calls=calls,
        BuilderFlag=_BuilderFlag11 if version.startswith("11.") else _BuilderFlag,
        LayerType=_LayerType,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=Parser,
    )
    return trt


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    def install(**kw) -> types.ModuleType:
        trt = _fake_tensorrt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_mod, "unavailable_reason", lambda: None)
        monkeypatch.setattr(
            trt_mod, "_gpu_identity", lambda: ("NVIDIA H100 80GB HBM3", "9.0", "12.8")
        )
        return trt

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    return install


@pytest.mark.parametrize(
    ("precision", "flags", "quantize_layers"),
    [("fp32", [], 0), ("fp16", ["FP16"], 0), ("int8", ["FP16", "INT8"], 2)],
)
def test_build_engine_settings(fake_trt, tmp_path, precision, flags, quantize_layers):
    trt = fake_trt(quantize_layers=quantize_layers)
    logged: list[str] = []
    plan = tmp_path / "1" / PLAN_FILENAME
    manifest = build_engine(tmp_path / "model.onnx", plan, SMALL, 4, precision, log=logged.append)
    assert trt.calls["parsed"] == str(tmp_path / "model.onnx")
    assert trt.calls["network_flags"] == 0
    assert trt.calls["profiles"] == [
        ("input", (1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32)),
    ]
    assert trt.calls["profile_added"]
    assert trt.calls["flags"] == flags
    assert plan.read_bytes() == b"serialized engine"
    assert sorted(p.name for p in plan.parent.iterdir()) == [PLAN_FILENAME]
    assert "tensorrt: weights are outside of fp16 range" in logged
    assert manifest == EngineManifest(
        tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        cuda_version="12.8",
        precision=precision,
        max_batch_size=4,
        opt_batch_size=4,
        onnx_sha256=hashlib.sha256(b"graph").hexdigest(),
    )


def _graph(path, dtype) -> None:
    """A one-node ONNX graph whose weight has ``dtype`` (an FP16 export's are float16)."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", dtype, [1], [1.0])
    cast = helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([cast], "g", [], [out], [weight])), str(path))


@pytest.mark.parametrize(("precision", "quantize_layers"), [("fp32", 0), ("fp16", 0), ("int8", 2)])
def test_build_engine_on_tensorrt_11_takes_the_graphs_types(
    fake_trt, tmp_path, precision, quantize_layers
):
    """TensorRT 11 has no precision flags (strongly typed): none is set, the engine is the
    graph's precision, and its version is the manifest's."""
    trt = fake_trt(quantize_layers=quantize_layers, version="11.4.1.3")
    onnx_path = tmp_path / "model.onnx"
    _graph(onnx_path, TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT)
    manifest = build_engine(
        onnx_path, tmp_path / "1" / PLAN_FILENAME, SMALL, 4, precision, log=print
    )
    assert trt.calls["flags"] == []
    assert (manifest.precision, manifest.tensorrt_version) == (precision, "11.4.1.3")


def test_build_engine_on_tensorrt_11_refuses_fp16_of_a_float32_graph(fake_trt, tmp_path):
    fake_trt(version="11.4.1.3")
    onnx_path = tmp_path / "model.onnx"
    _graph(onnx_path, TensorProto.FLOAT)
    plan = tmp_path / "1" / PLAN_FILENAME
    with pytest.raises(
        ExportError, match="has no float16 weights: export it with --precision fp16"
    ):
        build_engine(onnx_path, plan, SMALL, 4, "fp16", log=print)
    assert not plan.exists()


def test_build_engine_opt_batch_is_eight(fake_trt, tmp_path):
    trt = fake_trt()
    manifest = build_engine(tmp_path / "model.onnx", tmp_path / "p", SMALL, 64, "fp32", log=print)
    assert trt.calls["profiles"] == [("input", (1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32))]
    assert (manifest.opt_batch_size, manifest.max_batch_size) == (8, 64)


def test_build_engine_timing_cache(fake_trt, tmp_path):
    trt = fake_trt()
    cache = tmp_path / "timing.cache"
    onnx_path = tmp_path / "model.onnx"
    build_engine(onnx_path, tmp_path / "p", SMALL, 4, "fp16", timing_cache=cache, log=print)
    assert trt.calls["timing_cache_in"] == [b""]  # no file yet: a new cache
    assert cache.read_bytes() == b"+timings"
    build_engine(onnx_path, tmp_path / "p", SMALL, 4, "fp16", timing_cache=cache, log=print)
    assert trt.calls["timing_cache_in"] == [b"", b"+timings"]  # read back, then grown
    assert cache.read_bytes() == b"+timings+timings"

    cache.write_bytes(b"from another gpu")
    logged: list[str] = []
    build_engine(onnx_path, tmp_path / "p", SMALL, 4, "fp16", timing_cache=cache, log=logged.append)
    assert trt.calls["timing_cache_in"][-2:] == [b"from another gpu", b""]
    assert any("is from another GPU or TensorRT; not using it" in line for line in logged)
    assert cache.read_bytes() == b"+timings"


def test_build_engine_reports_parser_errors(fake_trt, tmp_path):
    fake_trt(parse_errors=("Unsupported ONNX data type: UINT8", "Assertion failed:\nshape"))
    with pytest.raises(ExportError) as info:
        build_engine(tmp_path / "model.onnx", tmp_path / "p", SMALL, 4, "fp32", log=print)
    assert str(info.value) == (
        f"{tmp_path / 'model.onnx'}: TensorRT's ONNX parser rejected the graph (node 0: "
        "Unsupported ONNX data type: UINT8; node 1: Assertion failed: shape)"
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"input_name": "x"}, "the graph has no input 'input' (it has x)"),
        (
            {"input_shape": (-1, 3, 224, 224)},
            "input 'input' is [-1, 3, 224, 224], the contract says [-1, 3, 32, 32]",
        ),
    ],
)
def test_build_engine_checks_the_graph_against_the_contract(fake_trt, tmp_path, kw, message):
    fake_trt(**kw)
    with pytest.raises(ExportError, match=re.escape(message)):
        build_engine(tmp_path / "model.onnx", tmp_path / "p", SMALL, 4, "fp32", log=print)


def test_build_engine_int8_needs_a_qdq_graph(fake_trt, tmp_path):
    fake_trt(quantize_layers=0)
    with pytest.raises(ExportError, match="int8 needs a QDQ graph"):
        build_engine(tmp_path / "model.onnx", tmp_path / "p", SMALL, 4, "int8", log=print)
    assert not (tmp_path / "p").exists()


def test_build_engine_failure_keeps_the_previous_plan(fake_trt, tmp_path):
    fake_trt(build_fails=True)
    plan = tmp_path / "1" / PLAN_FILENAME
    plan.parent.mkdir()
    plan.write_bytes(b"OLD")
    with pytest.raises(ExportError) as info:
        build_engine(tmp_path / "model.onnx", plan, SMALL, 4, "fp16", log=lambda _: None)
    assert str(info.value) == (
        f"TensorRT could not build an engine from {tmp_path / 'model.onnx'} "
        "(Error Code 10: Could not find any implementation)"
    )
    assert plan.read_bytes() == b"OLD"
    assert sorted(p.name for p in plan.parent.iterdir()) == [PLAN_FILENAME]


def test_build_engine_checks_its_arguments_first(fake_trt, tmp_path):
    fake_trt()
    with pytest.raises(ExportError, match="no such ONNX file"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "p", SMALL, 4, "fp32")
    with pytest.raises(ExportError, match="precision must be one of"):
        build_engine(tmp_path / "model.onnx", tmp_path / "p", SMALL, 4, "tf32")


def test_constants():
    assert (PLAN_FILENAME, MANIFEST_FILENAME, TRT_CONFIG_NAME) == (
        "model.plan",
        "engine.json",
        "tensorrt",
    )
    assert TRT_IMAGE.startswith("nvcr.io/nvidia/tensorrt:")


# --- the real thing, where there is a GPU -------------------------------------------------------


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-2), ("fp16", 5e-2)])
def test_build_and_run_a_real_engine_matches_onnxruntime(tmp_path, precision, atol):
    import onnxruntime as ort
    import torch

    from export.models import BasicBlock, ResNet
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, channels=(4, 8, 8, 8))
    onnx_path, plan = tmp_path / "model.onnx", tmp_path / PLAN_FILENAME
    export_onnx(model, SMALL, onnx_path, opset=17)
    manifest = build_engine(onnx_path, plan, SMALL, 4, precision, tmp_path / "timing.cache")
    assert manifest.onnx_sha256 == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert manifest.mismatch(manifest.gpu_name, manifest.compute_capability, "0.0") is not None

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    got = run_engine(plan, x, "input", "logits")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want = session.run(["logits"], {"input": x})[0]
    assert got.shape == want.shape == (3, 10)
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
    with pytest.raises(ExportError, match="outside the engine's profile"):
        run_engine(plan, np.zeros((5, 3, 32, 32), np.float32), "input", "logits")
