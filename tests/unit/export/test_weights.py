"""Checkpoint loading: formats, wrappers, prefixes, safety, and clear failures."""

from __future__ import annotations

import collections
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from export.errors import ExportError
from export.models import build_model
from export.weights import URL_ENV, load_weights, read_checkpoint


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("resnet18", num_classes=10)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: collections.OrderedDict((f"module.{k}", v) for k, v in sd.items()),
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "state_dict", "model", "module-prefix", "wrapped-prefixed"],
)
def test_pth_variants_load(tmp_path, source, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    target = build_model("resnet18", num_classes=10)
    loaded = load_weights(target, "resnet18", str(path))
    assert _same(source, target)
    assert len(loaded.sha256) == 64


def test_safetensors_loads(tmp_path, source):
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = build_model("resnet18", num_classes=10)
    load_weights(target, "resnet18", str(path))
    assert _same(source, target)


def test_truncated_checkpoint_names_the_file(tmp_path, source):
    path = tmp_path / "broken.pth"
    torch.save(source.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"broken\.pth is corrupt or truncated"):
        read_checkpoint(path)


def test_garbage_safetensors_names_the_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ExportError, match=r"junk\.safetensors is not a readable safetensors"):
        read_checkpoint(path)


class Payload:
    """Unpickling this would call a function: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_never_runs_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(ExportError, match="refusing to unpickle"):
        read_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_missing_file():
    with pytest.raises(ExportError, match="no such file"):
        read_checkpoint(Path("/nonexistent/w.pth"))


def test_wrong_num_classes_says_which(tmp_path, source):
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(
        ExportError, match=r"has 10 classes .* built with 1000; pass --num-classes 10"
    ):
        load_weights(build_model("resnet18"), "resnet18", str(path))


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path, source):
    sd = dict(source.state_dict())
    del sd["layer1.0.bn1.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    sd["layer2.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ExportError) as info:
        load_weights(build_model("resnet18", num_classes=10), "resnet18", str(path))
    msg = str(info.value)
    assert "missing keys: layer1.0.bn1.running_var" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "layer2.0.conv1.weight (1, 1, 1, 1) != (128, 64, 3, 3)" in msg


def test_wrong_arch_checkpoint(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(ExportError, match=r"does not fit the model: missing keys: .*conv3"):
        load_weights(build_model("resnet50"), "resnet50", str(path))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.external
def test_torchvision_name_without_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{_closed_port()}/models/")
    with pytest.raises(
        ExportError,
        match=r"cannot download torchvision weights resnet50:IMAGENET1K_V2 .* --weights PATH",
    ):
        load_weights(build_model("resnet50"), "resnet50", "torchvision:IMAGENET1K_V2")


def test_unknown_torchvision_name():
    with pytest.raises(
        ExportError, match="no weights 'IMAGENET1K_V9' for resnet18; known: IMAGENET1K_V1"
    ):
        load_weights(build_model("resnet18"), "resnet18", "torchvision:IMAGENET1K_V9")


@pytest.mark.external
def test_download_is_hash_checked_and_cached(tmp_path, monkeypatch, source):
    """A real HTTP server on loopback: a file whose hash differs from torchvision's is rejected."""
    served = tmp_path / "served"
    served.mkdir()
    torch.save(build_model("resnet18").state_dict(), served / "resnet18-f37072fd.pth")

    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
        monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
        with pytest.raises(ExportError, match="does not match its published hash prefix f37072fd"):
            load_weights(build_model("resnet18"), "resnet18", "torchvision:IMAGENET1K_V1")
        # Nothing half-downloaded is left in the cache.
        assert not any((tmp_path / "cache").rglob("*.pth"))
    finally:
        server.shutdown()
        server.server_close()


class Opaque:
    """Any class but argparse.Namespace: a checkpoint holding one is refused by name."""

    def __init__(self) -> None:
        self.value = 1


def _reference_checkpoint(source: torch.nn.Module) -> dict:
    """The dict torchvision's references/classification/train.py saves (with --model-ema)."""
    import argparse

    model_ema = torch.optim.swa_utils.AveragedModel(source)
    with torch.no_grad():
        for p in model_ema.module.parameters():
            p.add_(1.0)  # EMA weights that differ from the live ones
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)
    args = argparse.Namespace(
        model="resnet18", lr=0.5, epochs=600, lr_steps=[16, 22], weights=None, amp=False
    )
    return {
        "model": source.state_dict(),
        "model_ema": model_ema.state_dict(),  # "module."-prefixed, plus "n_averaged"
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 599,
        "args": args,
    }


def test_reference_script_checkpoint_loads_model_and_ema(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    ckpt = _reference_checkpoint(source)
    torch.save(ckpt, path)
    live = build_model("resnet18", num_classes=10)
    load_weights(live, "resnet18", str(path))  # auto: the "model" entry
    assert _same(source, live)
    ema = build_model("resnet18", num_classes=10)
    load_weights(ema, "resnet18", str(path), key="model_ema")
    expected = {k.removeprefix("module."): v for k, v in ckpt["model_ema"].items()}
    assert all(torch.equal(ema.state_dict()[k], expected[k]) for k in ema.state_dict())
    assert not torch.equal(ema.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_checkpoint_with_any_other_object_is_refused_by_name(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "args": Opaque()}, path)
    with pytest.raises(ExportError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "test_weights.Opaque object" in message
    assert "refusing to unpickle it" in message


def test_missing_weights_key_lists_the_entries(tmp_path, source):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    with pytest.raises(ExportError, match=r"has no 'model_ema' weight set .*'model', 'epoch'"):
        read_checkpoint(path, "model_ema")
