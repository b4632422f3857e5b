"""Reduced precision, proven: INT8, FP16 and BF16 exports pass (or fail) the accuracy gate,
the parity probe they publish holds with every engine that may serve them, the INT8 digits
model serves within 1 point of FP32, and `evaluate` measures the deployed path and the
in-process path alike."""

from __future__ import annotations

import json
import re
import shutil

import httpx
import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.gate import openvino_version, run_onnx, run_openvino
from export.images import Images
from export.pipeline import export_and_publish
from export.plan import PrecisionPlan
from export.repository import ServingConfig
from service.host.cpus import bf16_isa, cpu_isa, has_bf16
from service.host.processes import GatewayProcess, wait_until
from service.model.repository import Rollout, load_spec, parity_problem, write_rollout
from tests.helpers.cli import assert_one_line_failure, run_cli, without_package
from tests.helpers.images import image_bytes
from tests.helpers.metrics import scrape
from tests.helpers.models import TINY_CONTRACT, TINY_LABELS

pytestmark = pytest.mark.slow

#: Why a BF16 export cannot be measured here, if it cannot (export.plan.check_precision).
NO_BF16 = (
    "this CPU has no BF16 instructions" if not has_bf16()
    else "OpenVINO is not installed" if openvino_version() is None
    else None
)  # fmt: skip
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"BF16 export: {NO_BF16}")
#: Each reduced precision of the demo: the least top-1 agreement with FP32 on the held-out
#: digits (BF16: the issue's bar), the probe's outputs, the kernels its report names, and
#: its precision as `resnet-export validate` prints it.
DEMO_PRECISIONS = {
    "int8": (99.0, "INT8 exact reference", cpu_isa(), "int8 u8s8-reduce-range"),
    "bf16": (99.5, "FP32 (onnxruntime)", bf16_isa(), "bf16"),
}
REDUCED = ["int8", pytest.param("bf16", marks=needs_bf16)]


@pytest.fixture(scope="module")
def reduced_demo(demo, tmp_path_factory):
    """`resnet-export demo --precision P` as version 2 beside the FP32 demo model (version
    1), trained once per precision in this module: P -> (the repository, the command's
    output)."""
    made: dict[str, tuple] = {}

    def make(precision: str):
        if precision not in made:
            repo = tmp_path_factory.mktemp(precision) / "repo"
            shutil.copytree(demo.model_dir, repo / "digits")
            proc = run_cli("resnet-export", "demo", "--precision", precision, "-r", str(repo))
            assert proc.returncode == 0, proc.stderr
            made[precision] = (repo, proc.stdout)
        return made[precision]

    return make


@pytest.fixture(scope="module")
def int8_repo(reduced_demo):
    repo, stdout = reduced_demo("int8")
    assert f"accuracy gate PASS: INT8 on {cpu_isa()} kernels agrees with FP32" in stdout
    assert "accuracy gate PASS: INT8 exact reference agrees with FP32" in stdout
    return repo


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _report(spec) -> dict:
    return json.loads((spec.model_path.parent / "export_report.json").read_text())


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_demo_is_published_with_its_proof(reduced_demo, precision):
    """The gate on the 450 held-out digits, and the kernels a node computes the version
    with held to the probe's outputs within the gateway's probe tolerance."""
    least, probe, kernels, validated = DEMO_PRECISIONS[precision]
    repo, stdout = reduced_demo(precision)
    spec = load_spec(repo / "digits")
    assert (spec.version, spec.precision) == ("2", precision)
    report = _report(spec)
    gate = report["accuracy_gate"]
    assert gate["passed"] and gate["images"] == 450 and gate["images_source"] == "held-out digits"
    assert gate["top1_agreement_pct"] >= least
    assert f"accuracy gate PASS: {gate['candidate']} agrees with FP32" in stdout
    versus = report["kernels_vs_exact"]
    assert versus["passed"] and versus["kernels"] == kernels
    assert versus["max_abs_logit_diff"] <= 0.02 * versus["largest_logit"]
    share = 100 * versus["max_abs_logit_diff"] / versus["largest_logit"]
    assert versus["max_diff_pct_of_largest"] == pytest.approx(share, abs=1e-3)
    assert report["probe"]["outputs"] == probe
    proc = run_cli("resnet-export", "validate", "--repository", str(repo))
    line = f"ok: digits (version 2, {validated}; {cpu_isa()} kernels)"
    assert proc.stdout.strip() == line, proc.stderr


def test_int8_demo_records_its_quantization(int8_repo):
    spec = load_spec(int8_repo / "digits")
    report = _report(spec)
    exact = report["accuracy_gate_exact"]
    assert exact["passed"] and exact["images"] == 450 and exact["top1_agreement_pct"] >= 99.0
    assert report["kernels_vs_exact"]["kernels"] == report["cpu_isa"]
    assert report["int8_scheme"] == spec.contract.int8_scheme == "u8s8-reduce-range"
    assert report["quantization"]["calibration_images"] == 256
    assert report["quantization"]["calibration_method"] == "percentile"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(spec.model_path)
    # OpenVINO's INT8 kernels are held to the same exact reference, where it is installed.
    openvino = report["openvino_vs_exact"]
    if openvino_version() is None:
        assert openvino == {"skipped": "OpenVINO is not installed (the openvino extra)"}
    else:
        assert openvino["passed"] and openvino["inference_precision"] == "f32"
        assert openvino["engine"] == f"OpenVINO {openvino_version()}"


def _digits(spec, split):
    """The held-out digits as the model's contract makes them (what its gate judged)."""
    from export.demo import _tensors

    return _tensors(split.test_png, spec.contract).numpy()


@pytest.mark.parametrize("precision", REDUCED)
def test_the_probe_holds_with_every_engine_on_this_cpu(reduced_demo, precision):
    """The published file through every engine and precision a gateway may serve it with
    here: ONNX Runtime (INT8: this CPU's integer kernels; BF16: exactly FP32) and OpenVINO
    where installed (INT8 with the f32 hint; BF16 in BF16 on a CPU with BF16, else FP32),
    each against the exact result (INT8: the QDQ reference; BF16: FP32), by the gateway's
    own probe check, on all 450 held-out digits: the stored probe, picked from them and
    holding the exact result, passes at load on any node and with either engine."""
    from export.demo import load_split

    repo, _ = reduced_demo(precision)
    spec = load_spec(repo / "digits")
    x = _digits(spec, load_split())
    int8 = precision == "int8"
    exact = run_onnx(spec.model_path, spec.contract, x, exact=int8)
    served = {"onnxruntime": run_onnx(spec.model_path, spec.contract, x)}
    if openvino_version() is not None:
        hint = "bf16" if precision == "bf16" and has_bf16() else "f32"
        served[f"openvino {hint}"] = run_openvino(spec.model_path, spec.contract, x, hint)[0]
    for engine, logits in served.items():
        assert parity_problem(exact, logits) is None, (engine, cpu_isa(), bf16_isa())
    inputs, outputs = np.load(spec.model_path.parent / "probe.npz").values()
    assert np.allclose(outputs, run_onnx(spec.model_path, spec.contract, inputs, exact=int8))


#: Kernel paths that add u8 x s8 pairs in 16 bits with saturation (service.host.cpus).
SATURATING = {"AVX2", "AVX-512"}


def test_8_bit_weights_answer_differently_on_saturating_kernels(demo, tmp_path, monkeypatch):
    """Why weights are 7-bit: the same quantization with 8-bit weights is exact on VNNI and
    AMX but not on AVX2 or AVX-512 without VNNI (on AVX2, measured: top-1 98.4 % of the
    exact result's, logits off by 36 % of the largest), where export refuses it even with
    the accuracy gate off, naming the kernel path."""
    import onnxruntime.quantization as q

    from export.demo import load_split
    from export.images import spread
    from export.precision import reduce_precision

    real = q.quantize_static
    monkeypatch.setattr(
        q, "quantize_static", lambda *a, **k: real(*a, **{**k, "reduce_range": False})
    )
    spec = load_spec(demo.model_dir)
    x = _digits(spec, load_split())
    fp32 = tmp_path / "model.onnx"  # the reduced graph is written beside it
    shutil.copy(spec.model_path, fp32)
    digits = Images(x, "held-out digits")
    plan = PrecisionPlan(
        precision="int8",
        calibration=Images(np.stack(spread(list(x), 128)), "digits"),
        validation=digits,
        min_agreement=0,
    )
    isa = cpu_isa()
    if isa in SATURATING:
        refusal = rf"not published: INT8 on this CPU's {isa} kernels differs from the exact reference on held-out digits: max abs logit difference"
        with pytest.raises(ExportError, match=refusal):
            reduce_precision(fp32, spec.contract, plan, digits, 8, log=lambda _: None)
    else:
        reduced = reduce_precision(fp32, spec.contract, plan, digits, 8, log=lambda _: None)
        assert reduced.report["kernels_vs_exact"]["kernels"] == isa


def _evaluate(*args: str, out) -> dict:
    proc = run_cli("resnet-export", "evaluate", *args, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_int8_through_the_gateway_is_within_one_point_and_evaluate_agrees(
    int8_repo, demo, tmp_path
):
    images = str(demo.images)
    fp32 = _evaluate("--images", images, "--model", "digits:1", "-r", str(int8_repo),
                     out=tmp_path / "fp32.json")  # fmt: skip
    local = _evaluate("--images", images, "--model", "digits:2", "-r", str(int8_repo),
                      "--compare", "1", out=tmp_path / "int8.json")  # fmt: skip
    gw = GatewayProcess.start(tmp_path / "gw.log", "--repository", str(int8_repo))
    try:
        served = _evaluate("--images", images, "--model", "digits", "--url", gw.url,
                           "-r", str(int8_repo), out=tmp_path / "http.json")  # fmt: skip
        models = httpx.get(gw.url + "/v1/models").json()["models"]
        info = {
            "arch": "resnet18",
            "backend": "onnxruntime",
            "model": "digits",
            "kernels": cpu_isa(),
        }
        assert scrape(gw.url, "resnet_serve_model_info", **info, precision="int8", version="2") == 1
        detail = httpx.get(gw.url + "/v1/models/digits").json()
    finally:
        gw.stop()
    assert models[0]["precision"] == "int8"
    assert (
        detail["kernels"] == cpu_isa() and detail["contract"]["int8_scheme"] == "u8s8-reduce-range"
    )
    assert served["images"] == local["images"] == fp32["images"] == 450
    assert served["model"] == local["model"] == "digits:2"
    assert abs(served["top1_accuracy_pct"] - fp32["top1_accuracy_pct"]) <= 1.0
    # The deployed path and the in-process path are the same code: the same answers.
    assert served["per_class"] == local["per_class"]
    assert served["top1_accuracy_pct"] == local["top1_accuracy_pct"]
    assert local["agreement"]["reference"] == "digits:1"
    assert local["agreement"]["top1_agreement_pct"] >= 99.0


def test_evaluate_refuses_unknown_labels_and_bad_models(int8_repo, tmp_path):
    (tmp_path / "imgs" / "eleven").mkdir(parents=True)
    (tmp_path / "imgs" / "eleven" / "a.png").write_bytes(image_bytes())
    proc = run_cli("resnet-export", "evaluate", "--images", str(tmp_path / "imgs"),
                   "--model", "digits", "-r", str(int8_repo))  # fmt: skip
    assert_one_line_failure(proc, "folders not among digits's labels: eleven")
    proc = run_cli("resnet-export", "evaluate", "--images", str(tmp_path / "imgs"),
                   "--model", "digits:x", "-r", str(int8_repo))  # fmt: skip
    assert_one_line_failure(proc, "--model takes NAME or NAME:VERSION")
    # --compare is resolved before any image is read.
    ok = tmp_path / "ok"
    shutil.copytree(tmp_path / "imgs", ok / "3")
    for ref, message in (
        ("7", "model 'digits': no version 7 (versions: 1, 2)"),
        ("zz", "--compare takes a version of digits or an ONNX file"),
    ):
        proc = run_cli("resnet-export", "evaluate", "--images", str(ok), "--model", "digits",
                       "-r", str(int8_repo), "--compare", ref)  # fmt: skip
        assert_one_line_failure(proc, message)
    proc = run_cli("resnet-export", "evaluate", "--images", str(ok), "--model", "digits")
    assert_one_line_failure(proc, "--repository DIR is needed")
    from service.host.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_cli("resnet-export", "evaluate", "--images", str(ok), "--model", "digits",
                   "--url", url)  # fmt: skip
    assert_one_line_failure(proc, f"cannot reach {url}/v1/models/digits/classify")


# --- the gate, on the tiny model (milliseconds per export) -----------------------------------


def _tiny_model():
    import torch

    from export.models import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, channels=(4, 8, 8, 8))


def _images(n: int, seed: int = 0) -> Images:
    from service.dataplane.preprocess import preprocess

    tensors = [preprocess(image_bytes(seed=seed + i), TINY_CONTRACT) for i in range(n)]
    return Images(np.stack(tensors), "test images")


def _export(repo, plan: PrecisionPlan):
    return export_and_publish(
        model=_tiny_model(),
        contract=TINY_CONTRACT,
        labels=TINY_LABELS,
        name="tiny",
        repository=repo,
        flavor="onnxruntime",
        serving=ServingConfig(max_batch_size=8),
        opset=17,
        real_images=[image_bytes(seed=99)],
        source="tests",
        plan=plan,
        log=lambda _: None,
    )


@pytest.mark.parametrize("precision", ["fp16", pytest.param("bf16", marks=needs_bf16)])
def test_float_precisions_keep_fp32_inputs_and_pass_parity(tmp_path, precision):
    plan = PrecisionPlan(precision=precision, validation=_images(16), min_agreement=90)
    result = _export(tmp_path / "repo", plan)
    spec = load_spec(result.model_dir)
    assert spec.precision == precision
    graph = onnx.load(str(spec.model_path))
    weights = {i.data_type for i in graph.graph.initializer}
    # FP16 publishes a float16 graph; BF16 the FP32 graph itself (the engine computes BF16).
    assert (onnx.TensorProto.FLOAT16 in weights) == (precision == "fp16")
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    gate = result.report["accuracy_gate"]
    assert gate["passed"] and gate["images"] == 16
    assert gate["max_abs_logit_diff"] < 0.05


def test_the_gate_refuses_a_corrupted_quantization_and_publishes_nothing(tmp_path, monkeypatch):
    """A quantization that went wrong (here: every weight of the last layer zeroed after
    calibration, as a broken scale would) disagrees with FP32; nothing may be published."""
    from export import precision

    real = precision.quantize_int8

    def corrupted(src, dst, *args, **kwargs):
        settings = real(src, dst, *args, **kwargs)
        model = onnx.load(str(dst))
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 2:  # fc
                init.raw_data = bytes(len(init.raw_data))
        onnx.save(model, str(dst))
        return settings

    monkeypatch.setattr(precision, "quantize_int8", corrupted)
    repo = tmp_path / "repo"
    plan = PrecisionPlan(precision="int8", calibration=_images(16), validation=_images(24, 50))
    # The kernel path is named as the CPU's flags say ("AVX-512 VNNI" has a space in it).
    refusal = f"not published: INT8 on {cpu_isa()} kernels top-1 agreement with FP32 is "
    with pytest.raises(ExportError, match=re.escape(refusal)):
        _export(repo, plan)
    assert not (repo / "tiny").exists()
    # --min-agreement 0: the same figures, reported, and published (benchmarks).
    result = _export(repo, PrecisionPlan(
        precision="int8", calibration=_images(16), validation=_images(24, 50), min_agreement=0
    ))  # fmt: skip
    assert result.report["accuracy_gate"]["top1_agreement_pct"] < 99


def test_int8_cli_calibrates_on_a_folder_and_holds_images_apart(tmp_path, demo):
    """`export --precision int8 --calibration-dir`: a folder with corrupt files among real
    images; the gate judges the share held apart from calibration."""
    calib = tmp_path / "calib"
    shutil.copytree(demo.images, calib)
    (calib / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    repo = tmp_path / "repo"
    proc = run_cli(*demo.export_command(repo, "d8"), "--precision", "int8",
                   "--calibration-dir", str(calib), "--calibration-count", "1000")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipping" in proc.stderr and "broken.png" in proc.stderr
    report = json.loads((repo / "d8" / "1" / "export_report.json").read_text())
    held = report["accuracy_gate"]["images"]
    assert 45 <= held <= 135  # about a fifth of the 451 files
    # Every readable file is used once: calibrated on, or held apart to judge by.
    assert report["quantization"]["calibration_images"] + held == 450
    assert report["accuracy_gate"]["images_source"].startswith("held-out images from")
    # The published graph answers like the FP32 one on the images it was judged by.
    assert load_spec(repo / "d8").precision == "int8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "int8"], "--precision int8 needs --calibration-dir DIR"),
        (["--calibration-dir", "/tmp"], "--calibration-dir is used only with --precision int8"),
        (["--precision", "int8", "--calibration-dir", "/nonexistent/dir"],
         "--calibration-dir /nonexistent/dir: no such directory"),
        (["--format", "tensorrt"], "--format tensorrt: "),
        (["--precision", "bf16", "--calibration-dir", "/tmp"],
         "--calibration-dir is used only with --precision int8"),
        (["--precision", "bf16", "--format", "tensorrt"],
         "--format tensorrt builds fp32, fp16 and int8 engines; a bf16 version is for CPU nodes"),
    ],
    ids=["int8-without-images", "images-without-int8", "missing-dir", "tensorrt-here",
         "bf16-with-images", "bf16-tensorrt"],
)  # fmt: skip
def test_precision_option_mistakes_are_one_line_and_write_nothing(tmp_path, extra, message):
    from export.tensorrt import unavailable_reason

    if extra[:2] == ["--format", "tensorrt"] and unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    repo = tmp_path / "repo"
    proc = run_cli(
        "resnet-export", "export", "--arch", "resnet18", "--weights", "random", "--name", "m",
        "--repository", str(repo), *extra,
    )  # fmt: skip
    assert_one_line_failure(proc, message)
    assert not repo.exists()


@pytest.mark.parametrize("command", ["export", "demo"])
def test_bf16_on_a_cpu_without_bf16_is_refused_before_any_work(tmp_path, monkeypatch, command):
    """Only the CPU's flags are simulated: service.host.cpus.bf16_isa, as export.plan reads
    it, answers as on a CPU with neither avx512_bf16 nor amx_bf16. Everything else is real:
    the refusal comes before any export or training, and nothing is written."""
    from export import plan
    from export.demo import run_demo
    from export.pipeline import export

    monkeypatch.setattr(plan, "bf16_isa", lambda: None)
    repo, logged = tmp_path / "repo", []
    request = plan.ExportRequest(
        arch="resnet18", weights="random", name="m", repository=repo, precision="bf16"
    )
    run = {
        "export": lambda: export(request, log=logged.append),
        "demo": lambda: run_demo(repo, precision="bf16", log=logged.append),
    }[command]
    refusal = "--precision bf16: this CPU has no BF16 instructions (neither avx512_bf16 nor "
    with pytest.raises(ExportError, match=re.escape(refusal)):
        run()
    assert logged == [] and not repo.exists()


@pytest.mark.skipif(not has_bf16(), reason="without BF16 the CPU is refused first (above)")
@pytest.mark.parametrize(
    "command",
    [["export", "--arch", "resnet18", "--weights", "random", "--name", "m"], ["demo"]],
    ids=["export", "demo"],
)
def test_bf16_without_openvino_is_one_line_naming_the_extra(tmp_path, command):
    repo = tmp_path / "repo"
    proc = run_cli("resnet-export", *command, "--precision", "bf16", "-r", str(repo),
                   env=without_package("openvino", tmp_path))  # fmt: skip
    assert_one_line_failure(
        proc,
        "--precision bf16: OpenVINO, which the accuracy gate computes BF16 with, is not installed",
        "pip install 'resnet-serving[export,openvino]'",
    )
    assert not repo.exists()


def test_int8_without_openvino_skips_its_check_and_says_so(tmp_path, demo):
    """A gateway without OpenVINO serves INT8 with ONNX Runtime, which the export checks;
    the report says OpenVINO's kernels were not. Trained weights: untrained ones' near-tied
    logits put the kernel check itself at the probe's tolerance (measured: 0.008-0.022
    against 0.02), which is not what this test is about."""
    repo = tmp_path / "repo"
    proc = run_cli(*demo.export_command(repo, "m"), "--precision", "int8",
                   "--calibration-dir", str(demo.images),
                   env=without_package("openvino", tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "INT8 through OpenVINO: skipped (OpenVINO is not installed)" in proc.stdout
    report = json.loads((repo / "m" / "1" / "export_report.json").read_text())
    assert report["openvino_vs_exact"] == {
        "skipped": "OpenVINO is not installed (the openvino extra)"
    }
    assert report["kernels_vs_exact"]["passed"] and "openvino" not in report["versions"]


def test_empty_calibration_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(
        "resnet-export", "export", "--arch", "resnet18", "--weights", "random", "--name", "m",
        "--repository", str(tmp_path / "repo"), "--precision", "int8",
        "--calibration-dir", str(tmp_path / "empty"),
    )  # fmt: skip
    assert_one_line_failure(proc, "empty: holds no files")


def test_tensorrt_job_for_a_published_model(int8_repo, tmp_path):
    """The engine is built on the GPU node: the command and the Job come from the repository
    (and an INT8 graph quantized for CPUs, with uint8 activations, is refused)."""
    proc = run_cli("resnet-export", "tensorrt-job", "-r", str(int8_repo), "--model", "digits")
    assert_one_line_failure(proc, "TensorRT takes symmetric INT8 only")
    proc = run_cli("resnet-export", "tensorrt-job", "-r", str(int8_repo), "--model", "nope")
    assert_one_line_failure(proc, "model 'nope': config.pbtxt missing")
    out = tmp_path / "job.yaml"
    proc = run_cli("resnet-export", "tensorrt-job", "-r", str(int8_repo), "--model", "digits:1",
                   "--output", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "trtexec --onnx=/models/digits/1/model.onnx --saveEngine=/models/digits/1/model.plan "
        "--minShapes=input:1x1x32x32 --optShapes=input:8x1x32x32 --maxShapes=input:32x1x32x32"
    )
    import yaml

    job = yaml.safe_load(out.read_text())
    assert job["kind"] == "Job" and job["metadata"]["name"] == "trt-digits-v1"


def test_run_onnx_scores_in_batches(tmp_path):
    result = _export(tmp_path / "repo", PrecisionPlan())
    spec = load_spec(result.model_dir)
    x = _images(11).tensors
    assert run_onnx(spec.model_path, spec.contract, x).shape == (11, 10)


def test_a_shadow_int8_version_agrees_with_fp32_as_evaluate_says(int8_repo, demo, tmp_path):
    """FP32 (version 1) answers, INT8 (version 2) shadows it: the gateway's live agreement
    report on the held-out digits is the offline comparison `evaluate --compare` makes."""
    repo = tmp_path / "repo"
    shutil.copytree(int8_repo, repo)
    write_rollout(repo / "digits", Rollout(weights={"1": 1}, shadow="2"))
    offline = _evaluate("--images", str(demo.images), "--model", "digits:2", "-r", str(repo),
                        "--compare", "1", out=tmp_path / "int8.json")  # fmt: skip
    files = [p for p, _ in demo.pngs()]
    gw = GatewayProcess.start(tmp_path / "gw.log", "--repository", str(repo))
    try:
        sent = 0
        for i in range(0, len(files), 16):
            chunk = files[i : i + 16]
            parts = [("file", (p.name, p.read_bytes(), "image/png")) for p in chunk]
            resp = httpx.post(gw.url + "/v1/models/digits/classify", files=parts, timeout=60)
            assert resp.status_code == 200 and resp.json()["version"] == "1", resp.text
            sent += len(chunk)

            def accounted(sent: int = sent) -> dict | None:
                pairs = httpx.get(gw.url + "/v1/models/digits/shadow").json()["comparisons"]
                pair = pairs[0] if pairs else {"images_compared": 0, "images_dropped": 0}
                return pair if pair["images_compared"] + pair["images_dropped"] == sent else None

            pair = wait_until(accounted, 30, "shadow copy not accounted for")
    finally:
        gw.stop()
    assert (pair["primary"], pair["shadow"], pair["images_failed"]) == ("1", "2", 0)
    # One client, one request at a time: nothing is dropped for load.
    assert pair["images_compared"] == len(files) == 450
    live = 100 * pair["top1_agreement"]
    assert abs(live - offline["agreement"]["top1_agreement_pct"]) <= 100 / 450, (live, offline)
    assert pair["top5_overlap"] > 0.9 and 0 <= pair["score_drift_mean"] < 0.05
