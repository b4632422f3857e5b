"""`resnet-export` as a user runs it: real processes, real files, one-line failures."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from export.models import build_model
from service.dataplane.preprocess import normalized
from service.host.cpus import cpu_isa
from service.model.contract import PreprocessContract
from tests.helpers.cli import assert_one_line_failure, run_cli
from tests.helpers.models import tree_digest


@pytest.fixture(scope="module")
def r18_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r18_5cls.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": build_model("resnet18", num_classes=5).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def labels5(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("apple\nbanana\ncherry\ndate\nelder\n")
    return path


def test_help_explains_every_option():
    proc = run_cli("resnet-export", "export", "--help")
    assert proc.returncode == 0
    for option in (
        "--arch",
        "--weights",
        "--name",
        "--repository",
        "--num-classes",
        "--labels",
        "--max-batch-size",
        "--flavor",
        "--opset",
        "--resize",
        "--crop",
        "--mean",
        "--input",
    ):
        assert option in proc.stdout


def test_export_then_validate(tmp_path, r18_ckpt, labels5):
    repo = tmp_path / "repo"
    args = [
        "resnet-export",
        "export",
        "--arch",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--name",
        "fruit",
        "--repository",
        str(repo),
        "--num-classes",
        "5",
        "--labels",
        str(labels5),
        "--resize",
        "72",
        "--crop",
        "64",
        "--max-batch-size",
        "8",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "parity PASS" in proc.stdout
    assert "published fruit version 1" in proc.stdout
    contract = json.loads((repo / "fruit" / "1" / "preprocess.json").read_text())
    assert (contract["resize"], contract["crop"], contract["num_classes"]) == (72, 64, 5)
    assert contract["source_sha256"] is not None and len(contract["source_sha256"]) == 64

    proc = run_cli(*args, "--flavor", "python-ort")
    assert proc.returncode == 0, proc.stderr
    assert "published fruit version 2" in proc.stdout
    # The config is per model: version 1 became servable by the python backend too.
    assert (repo / "fruit" / "1" / "model.py").is_file()

    proc = run_cli("resnet-export", "validate", "--repository", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok: fruit (version 2, fp32; {cpu_isa()} kernels)"

    # Exported logits are PyTorch's logits.
    import onnxruntime as ort

    model = build_model("resnet18", num_classes=5).eval()
    model.load_state_dict(torch.load(r18_ckpt, weights_only=True)["state_dict"])
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(
        str(repo / "fruit" / "2" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        np.testing.assert_allclose(
            sess.run(None, {"input": x})[0], model(torch.from_numpy(x)).numpy(), atol=1e-4
        )

    # --input uint8: the graph takes pixels and normalizes them as the contract says. Not
    # beside float-input versions of the same model (one config.pbtxt, one input).
    before = tree_digest(repo)
    proc = run_cli(*args, "--input", "uint8")
    assert proc.returncode == 1 and tree_digest(repo) == before
    assert proc.stderr.strip() == (
        "resnet-export: error: model 'fruit' takes 'input' FP32 [-1, 3, 64, 64] (version 1); "
        "this version would take 'input' UINT8 [-1, 64, 64, 3], and config.pbtxt holds one "
        "input per model: publish it under another --name (or with the other --input)"
    )
    args[args.index("fruit")] = "pixels"
    proc = run_cli(*args, "--input", "uint8")
    assert proc.returncode == 0, proc.stderr
    assert "max |uint8 graph - float input|" in proc.stdout
    contract = PreprocessContract.load(repo / "pixels" / "1" / "preprocess.json")
    assert (contract.dtype, contract.layout) == ("uint8", "NHWC")
    pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    sess = ort.InferenceSession(
        str(repo / "pixels" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        planes = torch.from_numpy(normalized(pixels, contract))
        np.testing.assert_allclose(
            sess.run(None, {"input": pixels})[0], model(planes).numpy(), atol=1e-4
        )
    proc = run_cli("resnet-export", "validate", "--repository", str(repo))
    assert proc.returncode == 0, proc.stderr


def test_a_training_script_exports_its_model_in_memory_without_the_cli(tmp_path, r18_ckpt):
    """export(ExportRequest(...)) is the command without the command: the model a training
    script holds, published with the same proofs; a bad request raises before any work,
    with nothing written."""
    from export.errors import ExportError
    from export.pipeline import ExportRequest, export
    from export.repository import ServingConfig
    from service.model.repository import load_spec

    model = build_model("resnet18", num_classes=5)
    model.load_state_dict(torch.load(r18_ckpt, weights_only=True)["state_dict"])  # "trained"
    lines: list[str] = []
    request = ExportRequest(
        arch="resnet18",
        weights=model,
        name="fruit",
        repository=tmp_path / "repo",
        num_classes=5,
        labels=["apple", "banana", "cherry", "date", "elder"],
        resize=72,
        crop=64,
        serving=ServingConfig(max_batch_size=8),
    )
    result = export(request, log=lines.append)
    assert result.version == 1 and result.report["source"] == "in-memory model"
    assert any("parity PASS" in line for line in lines)
    spec = load_spec(result.model_dir)
    assert spec.labels == ("apple", "banana", "cherry", "date", "elder")
    assert (spec.contract.resize, spec.contract.crop, spec.max_batch_size) == (72, 64, 8)
    before = tree_digest(tmp_path / "repo")
    for bad, message in (
        ({"name": "../escape"}, "model name"),
        ({"opset": 3}, "--opset must be between"),
        ({"precision": "int8"}, "needs --calibration-dir"),
    ):
        with pytest.raises(ExportError, match=message):
            export(dataclasses.replace(request, **bad), log=lines.append)
    assert tree_digest(tmp_path / "repo") == before


def test_imagenet_default_labels(tmp_path):
    repo = tmp_path / "repo"
    proc = run_cli(
        "resnet-export",
        "export",
        "--arch",
        "resnet18",
        "--weights",
        "random",
        "--name",
        "r18",
        "--repository",
        str(repo),
    )
    assert proc.returncode == 0, proc.stderr
    labels = (repo / "r18" / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[207] == "Golden Retriever"


def test_random_weights_are_the_same_from_run_to_run(tmp_path, labels5):
    """`--weights random` (for benchmarks) draws from a fixed seed: two runs publish the same
    weights, so what a benchmark measures, and INT8's verdict on it, does not change."""
    import onnx
    from onnx import numpy_helper

    weights = []
    for run in ("first", "second"):
        repo = tmp_path / run
        proc = _export(repo, "--arch", "resnet18", "--weights", "random", "--num-classes", "5",
                       "--labels", str(labels5), "--resize", "36", "--crop", "32")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        graph = onnx.load(str(repo / "m" / "1" / "model.onnx")).graph
        weights.append({t.name: numpy_helper.to_array(t) for t in graph.initializer})
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 20
    for name, values in weights[0].items():
        np.testing.assert_array_equal(values, weights[1][name], err_msg=name)


def test_validate_reports_problems(tmp_path, r18_ckpt, labels5):
    repo = tmp_path / "repo"
    run_cli(
        "resnet-export",
        "export",
        "--arch",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--name",
        "m",
        "--repository",
        str(repo),
        "--num-classes",
        "5",
        "--labels",
        str(labels5),
        "--resize",
        "36",
        "--crop",
        "32",
    )
    (repo / "m" / "labels.txt").write_text("only\n")
    proc = run_cli("resnet-export", "validate", "--repository", str(repo))
    assert proc.returncode == 1
    # The problems, each on a line of its own, and nothing else (no "internal error: Exit").
    assert proc.stderr.splitlines() == [
        "resnet-export: invalid: m: labels.txt has 1 names for 5 classes"
    ]


# --- bad input: one line, exit 1, nothing written -------------------------------------------


@pytest.fixture
def repo(tmp_path):
    return tmp_path / "repo"


def _export(repo, *extra):
    return run_cli("resnet-export", "export", "--name", "m", "--repository", str(repo), *extra)


def test_unknown_arch(repo):
    proc = _export(repo, "--arch", "resnet99", "--weights", "random")
    assert_one_line_failure(proc, "unknown arch 'resnet99'", "resnet18", "wide_resnet101_2")
    assert not repo.exists()


def test_corrupt_checkpoint(repo, tmp_path, r18_ckpt, labels5):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(r18_ckpt.read_bytes()[:5000])
    proc = _export(
        repo,
        "--arch",
        "resnet18",
        "--weights",
        str(bad),
        "--num-classes",
        "5",
        "--labels",
        str(labels5),
    )
    assert_one_line_failure(proc, str(bad), "corrupt or truncated")
    assert tree_digest(repo) == {}


def test_wrong_num_classes(repo, r18_ckpt):
    proc = _export(repo, "--arch", "resnet18", "--weights", str(r18_ckpt))  # 1000 classes
    assert_one_line_failure(proc, "has 5 classes", "--num-classes 5")
    assert tree_digest(repo) == {}


def test_unwritable_repository(tmp_path, r18_ckpt, labels5):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _export(
        blocker / "repo",
        "--arch",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--num-classes",
        "5",
        "--labels",
        str(labels5),
    )
    assert_one_line_failure(proc, "is not writable")
    assert blocker.read_text() == "not a directory"


def test_labels_count_mismatch(repo, tmp_path, r18_ckpt):
    labels = tmp_path / "three.txt"
    labels.write_text("a\nb\nc\n")
    proc = _export(
        repo,
        "--arch",
        "resnet18",
        "--weights",
        str(r18_ckpt),
        "--num-classes",
        "5",
        "--labels",
        str(labels),
    )
    assert_one_line_failure(proc, "has 3 names but the model has 5 classes")
    assert not repo.exists()


def test_labels_required_for_non_imagenet(repo, r18_ckpt):
    proc = _export(repo, "--arch", "resnet18", "--weights", str(r18_ckpt), "--num-classes", "5")
    assert_one_line_failure(proc, "--labels FILE is required for a 5-class model")


def test_missing_checkpoint(repo):
    proc = _export(repo, "--arch", "resnet18", "--weights", "/nonexistent/w.pth")
    assert_one_line_failure(proc, "no such file")


def test_bad_preprocessing_options(repo):
    proc = _export(repo, "--arch", "resnet18", "--weights", "random", "--mean", "0.5,0.5")
    assert_one_line_failure(proc, "mean and std need 3 value(s)")
    proc = _export(
        repo, "--arch", "resnet18", "--weights", "random", "--resize", "100", "--crop", "200"
    )
    assert_one_line_failure(proc, "crop (200) cannot exceed resize (100)")
    proc = _export(repo, "--arch", "resnet18", "--weights", "random", "--mean", "a,b,c")
    assert_one_line_failure(proc, "--mean takes comma-separated numbers")
    assert not repo.exists()


def test_an_unknown_input_is_refused_by_name(repo):
    """--input takes float32 or uint8: anything else is the CLI's usage error (exit 2), with
    the choices, before any work."""
    proc = _export(repo, "--arch", "resnet18", "--weights", "random", "--input", "int4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Invalid value for '--input'" in proc.stderr and "'uint8'" in proc.stderr
    assert not repo.exists()


def test_bad_opset(repo):
    proc = _export(repo, "--arch", "resnet18", "--weights", "random", "--opset", "7")
    assert_one_line_failure(proc, "--opset must be between 13 and 21")


def test_validate_missing_repository(tmp_path):
    proc = run_cli("resnet-export", "validate", "--repository", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert "not a directory" in proc.stderr


# --- rollout ---------------------------------------------------------------------------------


@pytest.fixture
def three(tiny, tmp_path):
    """A copy of the tiny model with versions 1, 2, 3 (config: the newest is served)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny.repository, repo)
    for version in ("2", "3"):
        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / version)
    return repo


def _rollout(repo, *args):
    return run_cli("resnet-export", "rollout", "tiny", "--repository", str(repo), *args)


def test_rollout_canary_and_shadow_then_clear(three):
    from service.model.repository import Rollout, read_rollout

    proc = _rollout(three)  # nothing yet: the newest served version takes everything
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout == "tiny: serving versions 3; unpinned traffic all to 3 (the newest served)\n"
    )

    proc = _rollout(three, "--weight", "1=90", "--weight", "2=10", "--shadow", "3")
    assert proc.returncode == 0, proc.stderr
    line = "tiny: serving versions 1, 2, 3; unpinned traffic 1=90 2=10; shadow 3\n"
    assert proc.stdout == line
    assert read_rollout(three / "tiny") == Rollout(weights={"1": 90, "2": 10}, shadow="3")
    assert _rollout(three).stdout == line  # shown, unchanged
    assert run_cli("resnet-export", "validate", "-r", str(three)).returncode == 0

    # Each call states the whole rollout: a rollback to version 1 alone drops the rest.
    proc = _rollout(three, "--weight", "01=1")
    assert proc.stdout == "tiny: serving versions 1, 3; unpinned traffic 1=1\n"
    assert read_rollout(three / "tiny") == Rollout(weights={"1": 1})

    proc = _rollout(three, "--clear")
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout == "tiny: serving versions 3; unpinned traffic all to 3 (the newest served)\n"
    )
    assert not (three / "tiny" / "rollout.json").exists()
    assert _rollout(three, "--clear").returncode == 0  # clearing nothing is not an error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weight", "7=1"], "model 'tiny' has no version 7 (versions: 1, 2, 3)"),
        (["--weight", "1=1", "--weight", "8=0"], "model 'tiny' has no version 8"),
        (["--shadow", "9"], "model 'tiny' has no version 9 (versions: 1, 2, 3)"),
        (["--weight", "1:90"], "--weight takes VERSION=WEIGHT (e.g. --weight 2=10), got '1:90'"),
        (
            ["--weight", "1=lots"],
            "--weight takes VERSION=WEIGHT (e.g. --weight 2=10), got '1=lots'",
        ),
        (["--weight", "one=5"], "--weight: version 'one' is not a version number"),
        (["--shadow", "latest"], "--shadow 'latest' is not a version number"),
        (
            ["--weight", "1=-5"],
            "invalid rollout: weights: weight of version 1 must be 0 or more, got -5.0",
        ),
        (
            ["--weight", "1=0", "--weight", "2=0"],
            "invalid rollout: weights: at least one weight must be above 0",
        ),
        (["--weight", "1=1", "--weight", "01=2"], "--weight: version 1 given twice"),
        (["--clear", "--shadow", "2"], "--clear takes no --weight or --shadow"),
    ],
)
def test_rollout_refusals(three, args, message):
    from service.model.repository import Rollout, write_rollout

    write_rollout(three / "tiny", Rollout(weights={"2": 1}))  # a refusal leaves it as it was
    before = tree_digest(three)
    proc = _rollout(three, *args)
    assert_one_line_failure(proc, message)
    assert tree_digest(three) == before


def test_rollout_of_a_model_not_there(three, tmp_path):
    proc = run_cli("resnet-export", "rollout", "nope", "-r", str(three), "--weight", "1=1")
    assert_one_line_failure(proc, f"no model 'nope' in {three} (models: tiny)")
    proc = run_cli("resnet-export", "rollout", "tiny", "-r", str(tmp_path / "none"), "--clear")
    assert_one_line_failure(proc, f"model repository {tmp_path / 'none'} is not a directory")
    assert not (tmp_path / "none").exists()


def test_rollout_shows_a_broken_rollout_in_one_line(three):
    (three / "tiny" / "rollout.json").write_text('{"weights": {"5": 1}}')
    assert_one_line_failure(_rollout(three), "rollout.json names version 5, not in the repository")
    proc = _rollout(three, "--weight", "3=1")  # and a new one replaces it
    assert proc.stdout == "tiny: serving versions 3; unpinned traffic 3=1\n"
