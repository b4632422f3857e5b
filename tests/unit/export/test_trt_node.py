"""export/trt_node.py, the GPU node's step before Triton starts: keep or build each model's
TensorRT engine, write configs/tensorrt.pbtxt, or fall back to the ONNX graph.

The script runs as it does on the node: a subprocess (``python3 trt_node.py``, and the build
Job's ``python3 -c "$TRT_NODE"``) on a copy of a real exported repository (the ``tiny``
fixture). There is no NVIDIA GPU and no TensorRT on the machines this project is built
and tested on, so ``trtexec``, ``nvidia-smi`` and the ``tensorrt`` module are stand-ins
put first on PATH and PYTHONPATH: they speak the real ones' interfaces (trtexec writes its
``--saveEngine`` file or fails with an ``[E]`` line; nvidia-smi answers the CSV query or
fails as it does without a driver), record their calls, and fail on demand. What they
cannot show (that the real trtexec builds a plan Triton loads) needs a GPU node.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from export import trt_node
from export.build_job import render_build_job
from export.repository import (
    Publication,
    ServingConfig,
    build_config,
    publish,
    render_config,
    tensorrt_config,
    validate_model,
)
from export.tensorrt import EngineManifest, trtexec_command
from service.model import repository as service_repository
from service.model.repository import load_spec, parse_config, read_config
from tests.helpers.models import TINY_CONTRACT
from tests.helpers.paths import ROOT

SCRIPT = ROOT / "export" / "trt_node.py"
H100 = "NVIDIA H100 80GB HBM3, 9.0"
TRT_VERSION = "10.8.0.43"

FAKE_TRTEXEC = """#!{python}
import json, os, sys
with open(os.environ["FAKE_TRTEXEC_LOG"], "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100800] # trtexec " + " ".join(sys.argv[1:]))
if os.environ.get("FAKE_TRTEXEC_FAIL"):
    print("[01/01/2025-00:00:00] [I] [TRT] Local timing cache in use.")
    print("[01/01/2025-00:00:00] [E] Error[10]: IBuilder::buildSerializedNetwork: Error "
          "Code 10: Internal Error (Could not find any implementation for node conv1.)")
    print("[01/01/2025-00:00:00] [E] Engine could not be created from network")
    print("[01/01/2025-00:00:00] [E] Building engine failed")
    print("&&&& FAILED TensorRT.trtexec [TensorRT v100800]")
    sys.exit(1)
out = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--saveEngine="))
with open(out, "wb") as fh:
    fh.write(b"PLAN for " + os.environ["FAKE_GPU"].encode())
print("&&&& PASSED TensorRT.trtexec [TensorRT v100800]")
"""
FAKE_NVIDIA_SMI = """#!{python}
import os, sys
if sys.argv[1:] != ["--query-gpu=name,compute_cap", "--format=csv,noheader"]:
    sys.exit("unexpected arguments: " + " ".join(sys.argv[1:]))
if os.environ.get("FAKE_NO_GPU"):
    print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
          "Make sure that the latest NVIDIA driver is installed and running.")
    sys.exit(9)
print(os.environ["FAKE_GPU"])
"""
FAKE_TENSORRT = """import os
if os.environ.get("FAKE_TRT_BROKEN"):
    raise ImportError("libnvinfer.so.10: cannot open shared object file: No such file or directory")
__version__ = os.environ["FAKE_TRT_VERSION"]
"""
BUILT = re.compile(r"^model (\S+) version (\d+): serving TensorRT, engine built in \d+ s \((.+)\)$")


@dataclasses.dataclass
class Node:
    """A GPU node as far as the script can tell: fake tools, a copy of the repository."""

    tmp: Path
    repo: Path
    env: dict[str, str]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(SCRIPT), "--repository", str(self.repo), *args]
        return self._run(argv, env)

    def _run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env={**self.env, **env}, capture_output=True, text=True, timeout=120
        )

    def calls(self) -> list[list[str]]:
        log = Path(self.env["FAKE_TRTEXEC_LOG"])
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def model(self, name: str = "tiny") -> Path:
        return self.repo / name


def _tools(tmp: Path, trtexec: bool = True, nvidia_smi: bool = True) -> dict[str, str]:
    bin_dir, py_dir = tmp / "bin", tmp / "py"
    bin_dir.mkdir()
    py_dir.mkdir()
    tools = {
        **({"nvidia-smi": FAKE_NVIDIA_SMI} if nvidia_smi else {}),
        **({"trtexec": FAKE_TRTEXEC} if trtexec else {}),
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)  # the image's python3, for the Job
    (py_dir / "tensorrt.py").write_text(FAKE_TENSORRT)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTHONPATH")}
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "PYTHONPATH": str(py_dir),
        "CUDA_VERSION": "12.8.0.038",  # set by NVIDIA's CUDA images
        "FAKE_GPU": H100,
        "FAKE_TRT_VERSION": TRT_VERSION,
        "FAKE_TRTEXEC_LOG": str(tmp / "trtexec.calls"),
    }


def _copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".resnet-export.lock"))
    return dst


@pytest.fixture
def node(tiny, tmp_path) -> Node:
    return Node(tmp_path, _copy_repo(tiny.repository, tmp_path / "repo"), _tools(tmp_path))


def _manifest(model_dir: Path, version: int = 1, **change) -> EngineManifest:
    vdir = model_dir / str(version)
    base = EngineManifest(
        tensorrt_version=TRT_VERSION,
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        cuda_version="12.8",
        precision="fp32",
        max_batch_size=8,
        opt_batch_size=8,
        onnx_sha256=hashlib.sha256((vdir / "model.onnx").read_bytes()).hexdigest(),
    )
    return dataclasses.replace(base, **change)


def _trt_config(model_dir: Path) -> Path:
    return model_dir / "configs" / "tensorrt.pbtxt"


def _hidden(vdir: Path) -> list[str]:
    return sorted(p.name for p in vdir.rglob(".*"))


# --- keep or build ----------------------------------------------------------------------------


@pytest.mark.external
def test_first_run_builds_the_engine_and_the_tensorrt_config_then_keeps_them(node):
    model_dir, vdir = node.model(), node.model() / "1"
    proc = node.run()
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    m = BUILT.match(line)
    assert m is not None, line
    assert m.group(3) == (
        f"NVIDIA H100 80GB HBM3, compute capability 9.0, TensorRT {TRT_VERSION}; no engine before"
    )
    assert proc.stderr == ""
    assert (vdir / "model.plan").read_bytes() == f"PLAN for {H100}".encode()
    assert (vdir / "engine.json").read_text() == _manifest(model_dir).to_json()
    assert EngineManifest.load(vdir / "engine.json") == _manifest(model_dir)
    assert _trt_config(model_dir).read_text() == render_config(
        tensorrt_config(read_config(model_dir))
    )
    assert _trt_config(model_dir).stat().st_mode & 0o777 == 0o644  # Triton may be another user
    assert _hidden(vdir) == []  # the temporary plan was renamed
    assert validate_model(model_dir) == []  # the exporter's own checks accept the result
    assert len(node.calls()) == 1

    before = {p: p.stat().st_mtime_ns for p in (vdir / "model.plan", vdir / "engine.json")}
    proc = node.run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "model tiny version 1: serving TensorRT, engine kept "
        f"(NVIDIA H100 80GB HBM3, compute capability 9.0, TensorRT {TRT_VERSION})\n"
    )
    assert len(node.calls()) == 1  # trtexec not run again
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.external
def test_the_trtexec_command_is_the_exporters(node):
    assert node.run().returncode == 0
    ((*argv,),) = node.calls()
    vdir = node.model() / "1"
    saved = argv[1].removeprefix("--saveEngine=")
    assert Path(saved).parent == vdir and Path(saved).name.startswith(".model.plan.tmp-")
    spec = load_spec(node.model())
    want = trtexec_command(
        str(vdir / "model.onnx"),
        saved,
        spec.contract,
        spec.max_batch_size,
        spec.precision,
        tensorrt_version=TRT_VERSION,
    )
    assert ["trtexec", *argv] == want


@pytest.mark.external
@pytest.mark.parametrize(
    ("change", "replaced"),
    [
        ({"FAKE_GPU": "NVIDIA H200, 9.0"}, "gpu_name 'NVIDIA H100 80GB HBM3'"),
        (
            {"FAKE_GPU": "NVIDIA A100-SXM4-80GB, 8.0"},
            "gpu_name 'NVIDIA H100 80GB HBM3', compute_capability '9.0'",
        ),
        ({"FAKE_TRT_VERSION": "10.9.0.34"}, f"tensorrt_version '{TRT_VERSION}'"),
    ],
    ids=["same-architecture", "other-architecture", "other-tensorrt"],
)
def test_an_engine_from_another_gpu_or_tensorrt_is_rebuilt(node, change, replaced):
    assert node.run().returncode == 0
    proc = node.run(**change)
    assert proc.returncode == 0, proc.stderr
    m = BUILT.match(proc.stdout.strip())
    assert m is not None, proc.stdout
    assert m.group(3).endswith(f"; replacing one built with {replaced}")
    assert len(node.calls()) == 2
    manifest = EngineManifest.load(node.model() / "1" / "engine.json")
    gpu, _, cc = change.get("FAKE_GPU", H100).rpartition(", ")
    assert (manifest.gpu_name, manifest.compute_capability) == (gpu, cc)
    assert manifest.tensorrt_version == change.get("FAKE_TRT_VERSION", TRT_VERSION)


@pytest.mark.external
def test_a_changed_graph_or_batch_size_is_rebuilt(node):
    model_dir = node.model()
    assert node.run().returncode == 0
    onnx = model_dir / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes())  # same bytes: kept
    assert "engine kept" in node.run().stdout
    onnx.write_bytes(onnx.read_bytes() + b" ")
    assert "replacing one built with onnx_sha256 " in node.run().stdout
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
    proc = node.run()
    assert "replacing one built with max_batch_size 8, opt_batch_size 8" in proc.stdout
    assert node.calls()[-1][2:5] == [
        "--minShapes=input:1x3x32x32",
        "--optShapes=input:4x3x32x32",
        "--maxShapes=input:4x3x32x32",
    ]
    assert "max_batch_size: 4" in _trt_config(model_dir).read_text()
    assert len(node.calls()) == 3


# --- falling back to ONNX ----------------------------------------------------------------------


def _one_line(proc: subprocess.CompletedProcess[str], code: int, expected: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [expected]
    assert "Traceback" not in proc.stderr


TRTEXEC_ERROR = (
    "trtexec failed: [E] Error[10]: IBuilder::buildSerializedNetwork: "
    "Error Code 10: Internal Error (Could not find any implementation for node conv1.)"
)


@pytest.mark.external
@pytest.mark.parametrize(("require", "code"), [((), 0), (("--require",), 1)])
def test_a_failed_build_serves_onnx(node, require, code):
    model_dir, vdir = node.model(), node.model() / "1"
    assert node.run().returncode == 0  # an engine for the H100, and its config
    old = {p.name: p.read_bytes() for p in (vdir / "model.plan", vdir / "engine.json")}
    proc = node.run(*require, FAKE_GPU="NVIDIA L4, 8.9", FAKE_TRTEXEC_FAIL="1")
    _one_line(proc, code, f"model tiny version 1: serving ONNX ({TRTEXEC_ERROR})")
    assert not _trt_config(model_dir).exists()  # Triton serves config.pbtxt
    # The H100's engine stays (another node may share this repository); nothing half-written.
    assert {name: (vdir / name).read_bytes() for name in old} == old
    assert _hidden(vdir) == []


@pytest.mark.external
@pytest.mark.parametrize(
    ("env", "tools", "reason"),
    [
        ({}, {"nvidia_smi": False}, "no NVIDIA GPU given to this container (no nvidia-smi)"),
        (
            {"FAKE_NO_GPU": "1"},
            {},
            "no usable NVIDIA GPU: nvidia-smi failed (NVIDIA-SMI has failed because it couldn't "
            "communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is "
            "installed and running.)",
        ),
        (
            {"FAKE_TRT_BROKEN": "1"},
            {},
            "the tensorrt Python module does not import (ImportError: libnvinfer.so.10: cannot "
            "open shared object file: No such file or directory)",
        ),
        (
            {},
            {"trtexec": False},
            "trtexec is not installed here (not on PATH, nor in NVIDIA's usual places)",
        ),
    ],
    ids=["no-gpu-given", "no-driver", "no-tensorrt", "no-trtexec"],
)
def test_a_node_without_the_tools_serves_onnx(tiny, tmp_path, env, tools, reason):
    node = Node(tmp_path, _copy_repo(tiny.repository, tmp_path / "repo"), _tools(tmp_path, **tools))
    _trt_config(node.model()).parent.mkdir()
    _trt_config(node.model()).write_text("stale")
    _one_line(node.run(**env), 0, f"model tiny version 1: serving ONNX ({reason})")
    _one_line(node.run("--require", **env), 1, f"model tiny version 1: serving ONNX ({reason})")
    assert not _trt_config(node.model()).exists()
    assert node.calls() == []
    assert not (node.model() / "1" / "model.plan").exists()


def _edit_json(path: Path, **change) -> None:
    data = json.loads(path.read_text())
    for key, value in change.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(data))


@pytest.mark.external
def test_int8_for_onnx_runtimes_cpu_kernels_serves_onnx_and_symmetric_int8_builds(node):
    # The tiny model's files, relabelled as an INT8 export (what `resnet-export export
    # --precision int8` writes: the contract's precision, the report's quantization).
    vdir = node.model() / "1"
    _edit_json(vdir / "preprocess.json", precision="int8")
    _edit_json(vdir / "export_report.json", quantization={"activations": "uint8 asymmetric"})
    _one_line(
        node.run(),
        0,
        "model tiny version 1: serving ONNX (INT8 with uint8 activations, for ONNX Runtime's "
        "CPU kernels; TensorRT takes symmetric INT8 only: re-export with --symmetric-int8)",
    )
    assert node.calls() == []
    _edit_json(vdir / "export_report.json", quantization={"activations": "int8 symmetric"})
    assert node.run().returncode == 0
    assert node.calls()[-1][-2:] == ["--int8", "--fp16"]
    assert EngineManifest.load(vdir / "engine.json").precision == "int8"
    # TensorRT 11 builds strongly typed: the Q/DQ nodes say INT8, no flag (they are gone).
    (vdir / "model.plan").unlink()
    assert node.run(FAKE_TRT_VERSION="11.4.1.3").returncode == 0
    assert not {"--int8", "--fp16"} & set(node.calls()[-1])
    assert EngineManifest.load(vdir / "engine.json").tensorrt_version == "11.4.1.3"


def _publish_copy(repo: Path, src: Path, name: str, flavor: str) -> None:
    spec = load_spec(src)
    report = json.loads((spec.model_path.parent / "export_report.json").read_text())
    serving = ServingConfig(max_batch_size=8, instance_kind="cpu")
    publish(
        repo,
        Publication(
            name, spec.contract, list(spec.labels), spec.model_path, flavor, serving, report
        ),
    )


@pytest.mark.external
def test_other_flavors_are_skipped(node):
    _publish_copy(node.repo, node.model(), "tiny_py", "python-ort")
    (node.repo / "lost+found").mkdir()
    proc = node.run("--require")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "lost+found: skipped (not a model: no config.pbtxt)"
    assert BUILT.match(lines[1]) and lines[1].startswith("model tiny version 1:")
    assert lines[2] == (
        'model tiny_py: skipped (backend "python": TensorRT engines are made for onnxruntime_onnx)'
    )
    assert len(lines) == 3
    assert not (node.model("tiny_py") / "configs").exists()
    # Named, it was meant to get an engine: --require fails.
    proc = node.run("--model", "tiny_py", "--require")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [lines[2]]
    assert node.run("--model", "tiny_py").returncode == 0


@pytest.mark.external
def test_an_older_version_gets_an_engine_but_the_served_config_is_the_newest_ones(node):
    _publish_copy(node.repo, node.model(), "tiny", "onnxruntime")  # version 2
    model_dir = node.model()
    proc = node.run("--model", "tiny", "--version", "1", "--require")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("model tiny version 1: engine built in ")
    assert proc.stdout.endswith(
        "; version 2 is the one served, configs/tensorrt.pbtxt left as it was\n"
    )
    assert (model_dir / "1" / "model.plan").is_file()
    assert not _trt_config(model_dir).exists()
    proc = node.run("--model", "tiny")
    m = BUILT.match(proc.stdout.strip())
    assert m is not None and m.group(2) == "2", proc.stdout
    assert _trt_config(model_dir).read_text() == render_config(
        tensorrt_config(read_config(model_dir))
    )


@pytest.mark.external
def test_a_version_policy_serving_several_versions_serves_onnx(node):
    config = node.model() / "config.pbtxt"
    config.write_text(config.read_text().replace("num_versions: 1", "num_versions: 2"))
    _one_line(
        node.run(),
        0,
        "model tiny version 1: serving ONNX (its version_policy serves more than the newest "
        "version; engines are made for the newest only)",
    )


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repository", "/nonexistent/repo"], "repository /nonexistent/repo is not a directory"),
        (["--model", "nope"], "no model 'nope' in {repo} (models: tiny)"),
        (["--model", "../tiny"], "no model '../tiny' in {repo} (models: tiny)"),
        (["--model", "tiny", "--version", "7"], "model 'tiny' has no version 7 (versions: 1)"),
        (["--version", "1"], "--version needs --model"),
        (["--model", "tiny", "--version", "one"], "argument --version: 'one' is not a positive"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(node, args, message):
    proc = node.run(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("trt_node.py: ")
    assert message.format(repo=node.repo) in line
    assert node.calls() == []


@pytest.mark.external
def test_no_repository_argument_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "trt_node.py: the following arguments are required: --repository"
    ]


@pytest.mark.external
def test_an_empty_repository(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--repository", str(tmp_path)], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout) == (0, f"{tmp_path}: no model\n")


# --- the build Job runs the same script ----------------------------------------------------------


@pytest.mark.external
@pytest.mark.parametrize(("fail", "code"), [(False, 0), (True, 1)])
def test_the_build_job_runs_this_script(node, fail, code):
    job = yaml.safe_load(render_build_job("tiny", 1, 8, "fp32"))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TRT_NODE"] == SCRIPT.read_text()
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]
    sh, dash_c, script = container["command"]
    assert (sh, dash_c) == ("sh", "-c")
    script = script.replace(" /models ", f" {node.repo} ")  # the PVC, mounted here
    proc = node._run([sh, dash_c, script], {**env, "FAKE_TRTEXEC_FAIL": "1" if fail else ""})
    assert proc.returncode == code, proc.stdout + proc.stderr
    if fail:
        assert proc.stdout == f"model tiny version 1: serving ONNX ({TRTEXEC_ERROR})\n"
        assert "&&&& FAILED TensorRT.trtexec" in proc.stderr  # --verbose: trtexec's own log
        return
    assert BUILT.match(proc.stdout.strip())
    assert "&&&& PASSED TensorRT.trtexec" in proc.stderr
    assert EngineManifest.load(node.model() / "1" / "engine.json") == _manifest(node.model())
    assert _trt_config(node.model()).is_file()


# --- configs/tensorrt.pbtxt is tensorrt_config(), without protobuf ----------------------------------


def test_tensorrt_config_text_of_the_tiny_model(tiny):
    text = (tiny.model_dir / "config.pbtxt").read_text()
    assert trt_node.tensorrt_config_text(text) == render_config(tensorrt_config(parse_config(text)))


@pytest.mark.parametrize("flavor", ["onnxruntime", "python-ort"])
@pytest.mark.parametrize(
    "serving",
    [
        ServingConfig(),
        ServingConfig(max_batch_size=1, instance_kind="gpu"),
        ServingConfig(max_batch_size=64, instance_count=3, instance_kind="cpu"),
        ServingConfig(max_batch_size=16, max_queue_delay_us=0, preferred_batch_sizes=(2, 16)),
    ],
    ids=["defaults", "gpu-batch-1", "3-cpu-instances", "preferred-sizes"],
)
def test_tensorrt_config_text_equals_tensorrt_config(flavor, serving):
    contract = TINY_CONTRACT.model_copy(update={"input_name": "pixel:0", "channels": "L"})
    contract = contract.model_copy(update={"mean": (0.5,), "std": (0.25,)})
    cfg = build_config("m", contract, flavor, serving)
    assert trt_node.tensorrt_config_text(render_config(cfg)) == render_config(tensorrt_config(cfg))


HAND_EDITED = """# edited by hand: fields out of order, lists, comments, <> and ';'
dynamic_batching { max_queue_delay_microseconds: 500, preferred_batch_size: [4, 8] }
instance_group [ { count: 2 kind: KIND_CPU }, { kind: KIND_GPU; gpus: [0, 1] } ]
name: 'tiny'  # a comment
platform: "onnxruntime_onnx"
max_batch_size: 0x10
input [{ name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }]
output < name: "logits" data_type: TYPE_FP32 dims: 10 label_filename: "labels.txt" >
parameters { key: "x" value { string_value: "a" "b" } }
optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }
default_model_filename: "model.onnx"
"""


def test_tensorrt_config_text_of_a_hand_edited_config():
    # Triton reads the same config from both: compared as protobuf, not as text.
    got = parse_config(trt_node.tensorrt_config_text(HAND_EDITED))
    assert got == tensorrt_config(parse_config(HAND_EDITED))
    assert [g.kind for g in got.instance_group] == [mc.ModelInstanceGroup.KIND_GPU] * 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: ", "unexpected end of text"),
        ("input { name: 'x' ", "unexpected end of text (expected '}')"),
        ("name 'x'", "expected ':' or '{' after 'name', found \"'x'\""),
        ("[ext.field]: 1", "expected a field name, found '['"),
    ],
)
def test_a_config_that_does_not_parse_says_why(text, message):
    with pytest.raises(trt_node.NodeError, match=re.escape(message)):
        trt_node.parse_pbtxt(text)


# --- one definition of each name -----------------------------------------------------------------


def test_names_and_fields_are_the_exporters():
    assert tuple(f.name for f in dataclasses.fields(EngineManifest)) == trt_node.MANIFEST_FIELDS
    for name in ("CONFIG_FILENAME", "CONTRACT_FILENAME", "MODEL_FILENAME", "REPORT_FILENAME"):
        assert getattr(trt_node, name) == getattr(service_repository, name)
    header = render_config(mc.ModelConfig())
    assert header == trt_node.CONFIG_HEADER
    for message, table in (
        (mc.ModelConfig, trt_node._CONFIG_FIELDS),
        (mc.ModelInstanceGroup, trt_node._GROUP_FIELDS),
    ):
        assert table == {f.name: f.number for f in message.DESCRIPTOR.fields}


@pytest.mark.external
def test_the_script_needs_only_the_standard_library(tmp_path):
    tree = ast.parse(SCRIPT.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported
    # And it runs as a lone file, without site-packages (-S) or this project (-I).
    lone = tmp_path / "trt_node.py"
    shutil.copy(SCRIPT, lone)
    proc = subprocess.run([sys.executable, "-I", "-S", str(lone), "--help"], capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.external
def test_a_tensorrt_config_that_cannot_be_removed_fails_the_step(node):
    # Triton would serve it, with a plan this node cannot run: exit 1 even without --require.
    # (A directory in its place: unlink fails as it would on a read-only volume, even as root.)
    (_trt_config(node.model()) / "x").mkdir(parents=True)
    proc = node.run(FAKE_NO_GPU="1")
    assert proc.returncode == 1
    (line,) = proc.stdout.splitlines()
    assert line.startswith("model tiny version 1: NOT serving ONNX (no usable NVIDIA GPU: ")
    assert line.endswith(
        f"; {_trt_config(node.model())} could not be removed (Is a directory): "
        "Triton would serve it)"
    )
