"""The gateway with each engine of its embedded backend, in process (real app, real
lifespan, real sockets for gRPC): OpenVINO answers the trained model's real images as ONNX
Runtime does; every API says which engine runs a version and what it computes in; ENGINE=auto
times both and keeps the faster, saying so with both figures."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.backends.engines import installed_engines
from service.host.cpus import cpu_isa, has_bf16
from service.observability.metrics import Metrics
from service.runtime.core import Runtime
from service.settings import Settings
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc import classifier_pb2_grpc as pbg
from service.transports.http.app import create_app
from tests.helpers.engines import ENGINES, NEEDS_OPENVINO
from tests.helpers.images import image_bytes
from tests.helpers.metrics import counted
from tests.helpers.models import as_bf16

PNG = {"content-type": "image/png"}


def serve(repository: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(repository=repository, **settings)))  # type: ignore[arg-type]


@NEEDS_OPENVINO
@pytest.mark.slow
def test_openvino_answers_real_images_as_onnx_runtime_does(demo):
    """The trained digits model, 60 of its held-out PNGs through the whole gateway: the same
    classes, the same probabilities within FP32 rounding."""
    pngs = [p.read_bytes() for p, _ in demo.pngs()[::7][:60]]
    answers = {}
    for engine in ("onnxruntime", "openvino"):
        with serve(demo.repository, engine=engine) as client:
            files = [("file", (f"{n}.png", data, "image/png")) for n, data in enumerate(pngs)]
            resp = client.post("/v1/classify", files=files[:30], params={"top_k": 10})
            more = client.post("/v1/classify", files=files[30:], params={"top_k": 10})
            assert resp.status_code == more.status_code == 200, resp.text + more.text
            predictions = resp.json()["predictions"] + more.json()["predictions"]
            answers[engine] = np.array(
                [[p["score"] for p in sorted(row, key=lambda p: p["index"])] for row in predictions]
            )
    ours, exact = answers["openvino"], answers["onnxruntime"]
    assert (ours.argmax(1) == exact.argmax(1)).all()
    np.testing.assert_allclose(ours, exact, atol=1e-5)


@pytest.fixture
def bf16_repo(tiny, tmp_path) -> Path:
    """The tiny model as a bf16 version (export's ``--precision bf16``: the FP32 graph)."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny.repository, repo)
    as_bf16(repo)
    return repo


@pytest.mark.parametrize("engine", ENGINES)
def test_every_api_says_which_engine_computes_a_bf16_version_in_what(bf16_repo, engine, caplog):
    """The start-up log, REST's model summary, KServe v2's model metadata, the Classifier's
    ListModels and the metrics: BF16 with OpenVINO on a CPU with BF16, else exactly FP32;
    the parity probe holds either way (a reload runs it)."""
    served = "bf16" if engine == "openvino" and has_bf16() else "fp32"
    with (
        caplog.at_level(logging.INFO, logger="service.backends.embedded"),
        serve(bf16_repo, engine=engine, grpc_port=0, admin_keys=["k"]) as client,
    ):
        backend = client.app.state.runtime.backend  # type: ignore[attr-defined]
        assert (
            f"{engine}: loaded tiny version 1 (bf16), computing in {served} on {cpu_isa()} "
            f"kernels, {backend.sizing()}"
        ) in caplog.messages
        summary = client.get("/v1/models/tiny").json()
        assert (summary["backend"], summary["precision"], summary["served_precision"]) == (
            engine,
            "bf16",
            served,
        )
        assert client.get("/v2/models/tiny").json()["parameters"] == {
            "backend": engine,
            "precision": "bf16",
            "served_precision": served,
            "kernels": cpu_isa(),
        }
        with grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}") as channel:  # type: ignore[attr-defined]
            (info,) = pbg.ClassifierStub(channel).ListModels(pb.ListModelsRequest()).models
        assert (info.backend, info.precision, info.served_precision) == (engine, "bf16", served)
        resp = client.post("/v1/classify", content=image_bytes(seed=1), headers=PNG)
        assert resp.status_code == 200, resp.text
        registry = client.app.state.runtime.metrics.registry  # type: ignore[attr-defined]
        labels = {"backend": engine, "served_precision": served}
        assert counted(registry, "resnet_serve_inference_seconds_count", **labels) == 1
        assert counted(registry, "resnet_serve_model_info", precision="bf16", **labels) == 1
        # A reload of the same files as version 2 runs the parity probe on this engine.
        shutil.copytree(bf16_repo / "tiny" / "1", bf16_repo / "tiny" / "2")
        reload = client.post("/v1/models/tiny/reload", headers={"X-API-Key": "k"})
        assert reload.status_code == 200 and reload.json()["added"] == ["2"], reload.text


async def test_auto_keeps_the_faster_engine_and_logs_both_figures(tiny, caplog):
    """Whichever is faster here: the one kept is the one with more images a second (its
    batch's cost over the batches it runs at once), and the figures say how each split the
    cores."""
    runtime = Runtime(Settings(repository=tiny.repository, engine="auto"), Metrics())
    with caplog.at_level(logging.INFO, logger="service.backends.engines"):
        await runtime.start()
    try:
        (line,) = [m for m in caplog.messages if m.startswith("engine auto:")]
        match = re.fullmatch(
            r"engine auto: a batch of 8 of tiny version 1 took (.+): serving with (\w+)", line
        )
        assert match, line
        found = re.findall(r"(\w+) ([\d.]+) ms, (\d+) at once \(([\d.]+) images/s\)", match[1])
        assert sorted(name for name, *_ in found) == sorted(installed_engines()), line
        rates = {name: float(per_s) for name, _, _, per_s in found}
        assert runtime.backend is not None and runtime.backend.name == match[2]
        assert rates[match[2]] == max(rates.values())
        assert runtime.backend.max_inflight_batches == int(
            next(at_once for name, _, at_once, _ in found if name == match[2])
        )
        assert runtime.not_ready_reason() is None
    finally:
        await runtime.close()


async def test_auto_without_openvino_serves_with_onnx_runtime(tiny, caplog, monkeypatch):
    """Where OpenVINO is not installed (its import made to fail: None in sys.modules), auto
    times the one engine there is."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    runtime = Runtime(Settings(repository=tiny.repository, engine="auto"), Metrics())
    with caplog.at_level(logging.INFO, logger="service.backends.engines"):
        await runtime.start()
    try:
        assert runtime.backend is not None and runtime.backend.name == "onnxruntime"
        (line,) = [m for m in caplog.messages if m.startswith("engine auto:")]
        assert re.fullmatch(
            r"engine auto: a batch of 8 of tiny version 1 took onnxruntime [\d.]+ ms, 1 at once "
            r"\([\d.]+ images/s\): serving with onnxruntime",
            line,
        ), line
    finally:
        await runtime.close()
