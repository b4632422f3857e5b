"""The demo model: really trained, offline, >= 97% held-out, exported through the same path."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from export.repository import validate_repository
from service.dataplane.preprocess import preprocess
from tests.helpers.cli import assert_one_line_failure, run_cli


def test_demo_trains_and_reports_progress(demo):
    assert "epoch  1/12" in demo.stdout and "epoch 12/12" in demo.stdout
    assert "parity PASS" in demo.stdout
    report = json.loads((demo.model_dir / "1" / "export_report.json").read_text())
    assert report["training"]["heldout_accuracy_torch"] >= 0.97
    assert report["parity"]["passed"]
    assert validate_repository(demo.repository) == (["digits"], [])


def test_demo_labels_and_contract(demo):
    assert (demo.model_dir / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    contract = demo.contract
    assert (contract.channels, contract.num_classes, contract.crop) == ("L", 10, 32)


def test_heldout_pngs_classify_through_the_contract(demo):
    """The exported ONNX model, fed the PNG files through the contract, keeps the accuracy."""
    files = demo.pngs()
    assert len(files) == 450 and len({label for _, label in files}) == 10
    contract = demo.contract
    x = np.stack([preprocess(path.read_bytes(), contract) for path, _ in files])
    session = ort.InferenceSession(
        str(demo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    pred = session.run(None, {"input": x})[0].argmax(1)
    acc = float((pred == np.array([label for _, label in files])).mean())
    torch_acc = json.loads((demo.model_dir / "1" / "export_report.json").read_text())["training"][
        "heldout_accuracy_torch"
    ]
    assert acc >= 0.97
    assert abs(acc - torch_acc) <= 0.005


def test_digit_png_is_the_documented_encoding(demo):
    from PIL import Image
    from sklearn.datasets import load_digits

    from export.demo import digit_png

    values = load_digits().data[0]
    img = Image.open(__import__("io").BytesIO(digit_png(values)))
    assert img.mode == "L" and img.size == (8, 8)
    assert np.array_equal(np.asarray(img).ravel(), np.rint(values * 255 / 16).astype(np.uint8))


def test_the_trained_weights_export_to_the_demos_model(demo, tmp_path):
    """`demo --checkpoint-out`: a checkpoint `export --weights` reads; the command demo's log
    gives publishes a model answering exactly as the demo's."""
    assert f"wrote the trained weights to {demo.checkpoint}; exported as the demo was by: " \
        "resnet-export export --arch resnet18" in demo.stdout  # fmt: skip
    proc = run_cli(*demo.export_command(tmp_path / "repo", "again"))
    assert proc.returncode == 0, proc.stderr
    files = demo.pngs()[::9]
    x = np.stack([preprocess(path.read_bytes(), demo.contract) for path, _ in files])
    logits = [
        ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        for d in (demo.model_dir, tmp_path / "repo" / "again")
    ]
    np.testing.assert_array_equal(*logits)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda tmp: tmp, "is a directory, not a file"),
        (lambda tmp: tmp / "file" / "w.pth", "--checkpoint-out's directory"),
    ],
    ids=["a-directory", "under-a-file"],
)
def test_checkpoint_out_mistakes_are_one_line_before_training(tmp_path, target, message):
    (tmp_path / "file").write_text("not a directory")
    repo = tmp_path / "repo"
    proc = run_cli("resnet-export", "demo", "-r", str(repo), "--checkpoint-out",
                   str(target(tmp_path)))  # fmt: skip
    assert_one_line_failure(proc, message)
    assert "epoch" not in proc.stdout and not repo.exists()
