"""Model lifecycle in process (real app, real lifespan, the tiny model published as several
versions through the real export path): version policy, pinning, the admin reload, a
version that cannot be served, canary weights, shadow traffic, polling."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from export.repository import render_config, republish
from service.dataplane import routing
from service.host.processes import wait_until
from service.model.repository import (
    CONFIG_FILENAME,
    CONTRACT_FILENAME,
    MODEL_FILENAME,
    PROBE_FILENAME,
    Rollout,
    read_config,
    write_rollout,
)
from service.settings import Settings
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc import classifier_pb2_grpc as pbg
from service.transports.http.app import create_app
from tests.helpers.engines import ENGINES
from tests.helpers.errors import assert_error, code_of
from tests.helpers.images import image_bytes
from tests.helpers.metrics import counted
from tests.helpers.models import unconvertible_graph

ADMIN = {"X-API-Key": "admin-key"}
PNG = {"content-type": "image/png"}
IMAGE = image_bytes(seed=3)


def publish_version(model_dir: Path) -> str:
    """The newest version's graph published again as the next version (the real publish)."""
    return str(republish(model_dir, model_dir.parent, "onnxruntime"))


def set_policy(model_dir: Path, **policy: object) -> None:
    """config.pbtxt's version_policy: latest=N, specific=[...] or all=True."""
    cfg = read_config(model_dir)
    cfg.ClearField("version_policy")
    if "latest" in policy:
        cfg.version_policy.latest.num_versions = int(policy["latest"])  # type: ignore[call-overload]
    elif "specific" in policy:
        cfg.version_policy.specific.versions.extend(policy["specific"])  # type: ignore[arg-type]
    else:
        cfg.version_policy.all.SetInParent()
    (model_dir / CONFIG_FILENAME).write_text(render_config(cfg))


@pytest.fixture
def repo(tiny, tmp_path) -> Path:
    """A copy of the tiny model's repository (version 1), for a test to change."""
    shutil.copytree(tiny.repository, tmp_path / "repo")
    return tmp_path / "repo"


def serve(repo: Path, **settings: object) -> TestClient:
    app = create_app(Settings(repository=repo, admin_keys=["admin-key"], **settings))  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


def version_of(client: TestClient, path: str = "/v1/models/tiny/classify", **headers: str) -> str:
    resp = client.post(path, content=IMAGE, headers={**PNG, **headers})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["version"])


def states(client: TestClient) -> dict[str, dict]:
    return {s["version"]: s for s in client.get("/v1/models/tiny").json()["version_states"]}


# --- which versions are served ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ({"latest": 2}, ["2", "3"]),
        ({"specific": [1, 3]}, ["1", "3"]),
        ({"all": True}, ["1", "2", "3"]),
    ],
)
def test_the_version_policy_decides_what_is_served(repo, policy, served):
    publish_version(repo / "tiny")
    publish_version(repo / "tiny")
    set_policy(repo / "tiny", **policy)
    with serve(repo) as client:
        model = client.get("/v1/models/tiny").json()
        assert model["versions"] == served and model["version"] == served[-1]
        assert client.get("/v2/models/tiny").json()["versions"] == served
        assert version_of(client) == served[-1]  # unpinned: the newest served
        for v in served:
            assert version_of(client, f"/v1/models/tiny/versions/{v}/classify") == v
            infer = client.post(
                f"/v2/models/tiny/versions/{v}/infer",
                json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                  "data": [0.0] * 3072}]},
            )  # fmt: skip
            assert infer.status_code == 200 and infer.json()["model_version"] == v
        absent = next(str(v) for v in range(1, 5) if str(v) not in served)
        assert_error(
            client.post(f"/v1/models/tiny/versions/{absent}/classify", content=IMAGE, headers=PNG),
            404,
            "model_not_found",
            f"version '{absent}' is not served (serving versions {', '.join(served)})",
        )


def test_a_policy_naming_a_missing_version_stops_the_start_in_one_line(repo):
    set_policy(repo / "tiny", specific=[1, 7])
    app = create_app(Settings(repository=repo))
    with pytest.raises(RuntimeError), TestClient(app):
        pass
    assert app.state.startup_error == (
        "model 'tiny': version_policy names version 7, not in the repository (versions: 1)"
    )


# --- the admin reload ---------------------------------------------------------------------------


def test_the_admin_api_is_off_by_default_and_needs_its_own_key(repo):
    app = create_app(Settings(repository=repo, api_keys=["user-key"]))
    with TestClient(app) as client:
        resp = client.post("/v1/models/tiny/reload", headers={"X-API-Key": "user-key"})
        assert_error(resp, 403, "forbidden", "set RESNET_SERVE_ADMIN_KEYS")
    with serve(repo, api_keys=["user-key"]) as client:
        assert_error(client.post("/v1/models/tiny/reload"), 401, "unauthorized")
        user = client.post("/v1/models/tiny/reload", headers={"X-API-Key": "user-key"})
        assert_error(user, 401, "unauthorized", "invalid API key")
        ok = client.post("/v1/models/tiny/reload", headers={"Authorization": "Bearer admin-key"})
        assert ok.status_code == 200 and ok.json()["serving"] == ["1"]
        assert_error(client.post("/v1/models/nope/reload", headers=ADMIN), 404, "model_not_found")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_reload_switches_to_the_new_version_and_releases_the_old(repo, engine):
    with serve(repo, request_timeout_s=1.0, engine=engine) as client:
        assert version_of(client) == "1"
        assert publish_version(repo / "tiny") == "2"
        assert version_of(client) == "1"  # nothing changes until a reload
        resp = client.post("/v1/models/tiny/reload", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        report = resp.json()
        assert (report["ok"], report["serving"], report["added"], report["retired"]) == (
            True, ["2"], ["2"], ["1"],
        )  # fmt: skip
        assert version_of(client) == "2"
        assert_error(
            client.post("/v1/models/tiny/versions/1/classify", content=IMAGE, headers=PNG),
            404,
            "model_not_found",
            "serving versions 2",
        )
        backend = client.app.state.runtime.backend  # type: ignore[attr-defined]
        # Released once the last request planned on it is past its deadline (1 s here).
        # (Its state goes just after its session: under load the test may look in between.)
        wait_until(
            lambda: list(backend._runners) == [("tiny", "2")] and list(states(client)) == ["2"],
            10,
            "v1 not released",
        )
        registry = client.app.state.runtime.metrics.registry  # type: ignore[attr-defined]
        assert counted(registry, "resnet_serve_model_loads_total", version="2", outcome="ok") == 1
        assert counted(registry, "resnet_serve_model_info", version="1") == 0
        assert counted(registry, "resnet_serve_traffic_weight", version="2") == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_quick_rollback_routes_to_the_retiring_version_again(repo, engine):
    with serve(repo, request_timeout_s=2.0, engine=engine) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        backend = runtime.backend
        version_of(client)
        publish_version(repo / "tiny")
        assert client.post("/v1/models/tiny/reload", headers=ADMIN).json()["retired"] == ["1"]
        assert states(client)["1"]["state"] == "retiring"
        # What would release version 1 once its last deadline passes.
        (retirement,) = runtime.lifecycle._retiring.values()
        write_rollout(repo / "tiny", Rollout(weights={"1": 1}))
        report = client.post("/v1/models/tiny/reload", headers=ADMIN).json()
        assert (report["added"], report["serving"]) == (["1"], ["1", "2"])
        assert version_of(client) == "1"
        # Called off, not run out: nothing is released, now or past that deadline.
        wait_until(retirement.done, 10, "the retirement still runs")
        assert retirement.cancelled() and not runtime.lifecycle._retiring
        assert states(client)["1"]["state"] == "serving"
        assert sorted(backend._runners) == [("tiny", "1"), ("tiny", "2")]
        assert version_of(client) == "1"


# Each breakage returns what the refusal says, per engine.


def _truncate(vdir: Path) -> dict[str, str]:
    (vdir / MODEL_FILENAME).write_bytes((vdir / MODEL_FILENAME).read_bytes()[:200])
    return {
        "onnxruntime": "ONNX Runtime cannot load it",
        "openvino": "OpenVINO cannot load it (FrontEnd API failed with GeneralFailure: Model "
        "can't be parsed)",
    }


def _newer_ir(vdir: Path) -> dict[str, str]:
    """A graph saved by a newer ONNX than this ONNX Runtime reads: the reason is kept whole,
    not cut short behind ONNX Runtime's C++ source location and signature. (OpenVINO reads
    the graph as it is.)"""
    import onnx

    model = onnx.load(vdir / MODEL_FILENAME)
    model.ir_version = 99
    onnx.save(model, vdir / MODEL_FILENAME)
    return {
        "onnxruntime": "ONNX Runtime cannot load it (Unsupported model IR version: 99, max "
        "supported IR version:"
    }


def _unconvertible(vdir: Path) -> dict[str, str]:
    """A graph with an operator OpenVINO has no conversion for (StringNormalizer), which
    ONNX Runtime runs (its answers are not the probe's)."""
    unconvertible_graph(vdir / MODEL_FILENAME)
    return {
        "onnxruntime": "parity probe failed",
        "openvino": "OpenVINO cannot load it (FrontEnd API failed with OpConversionFailure: "
        "Model wasn't fully converted. Summary: -- No conversion rule found for operations: "
        "StringNormalizer-17)",
    }


def _other_contract(vdir: Path) -> dict[str, str]:
    text = (vdir / CONTRACT_FILENAME).read_text().replace('"resize": 36', '"resize": 40')
    (vdir / CONTRACT_FILENAME).write_text(text.replace('"crop": 32', '"crop": 40'))
    return dict.fromkeys(("onnxruntime", "openvino"), "!= preprocess.json")


def _wrong_probe(vdir: Path) -> dict[str, str]:
    inputs = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    outputs = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32) * 10
    np.savez(vdir / PROBE_FILENAME, inputs=inputs, outputs=outputs)
    return dict.fromkeys(("onnxruntime", "openvino"), "parity probe failed")


@pytest.mark.parametrize(
    ("corrupt", "engine"),
    [
        pytest.param(corrupt, *engine.values, marks=engine.marks)
        for corrupt in (_truncate, _newer_ir, _unconvertible, _other_contract, _wrong_probe)
        for engine in ENGINES
        if corrupt is not _newer_ir or engine.values == ("onnxruntime",)  # OpenVINO serves it
    ],
)
def test_a_version_that_cannot_be_served_leaves_the_old_one_serving(repo, corrupt, engine):
    with serve(repo, engine=engine) as client:
        publish_version(repo / "tiny")
        reason = corrupt(repo / "tiny" / "2")[engine]
        resp = client.post("/v1/models/tiny/reload", headers=ADMIN)
        assert_error(resp, 409, "load_failed", reason)
        assert "still serving version 1" in resp.json()["error"]["message"]
        assert version_of(client) == "1"
        assert client.get("/readyz").status_code == 200
        got = states(client)
        assert got["1"]["state"] == "serving" and got["2"]["state"] == "failed"
        assert reason in got["2"]["error"]
        last = client.get("/v1/models/tiny").json()["last_reload"]
        assert last["ok"] is False and last["serving"] == ["1"]
        registry = client.app.state.runtime.metrics.registry  # type: ignore[attr-defined]
        assert counted(registry, "resnet_serve_model_loads_total", outcome="failed") == 1
        assert counted(registry, "resnet_serve_model_load_failing", model="tiny") == 1
        backend = client.app.state.runtime.backend  # type: ignore[attr-defined]
        assert list(backend._runners) == [("tiny", "1")]  # nothing of version 2 is held


def test_polling_picks_up_a_new_version_and_a_removed_one(repo):
    with serve(repo, poll_interval_s=0.1, request_timeout_s=1.0) as client:
        publish_version(repo / "tiny")
        wait_until(lambda: version_of(client) == "2", 10, "version 2 not served")
        assert client.get("/v1/models/tiny").json()["last_reload"]["added"] == ["2"]
        set_policy(repo / "tiny", specific=[1])  # rollback by policy
        wait_until(lambda: version_of(client) == "1", 10, "version 1 not served again")


# --- canary and shadow ------------------------------------------------------------------------


def test_a_canary_splits_unpinned_traffic_by_weight_and_sticks_to_client_keys(repo, monkeypatch):
    # Unkeyed picks are drawn from a seeded generator: the same draws, one verdict, every run.
    monkeypatch.setattr(routing, "random", random.Random(0))
    publish_version(repo / "tiny")
    write_rollout(repo / "tiny", Rollout(weights={"1": 3, "2": 1}))
    with serve(repo) as client:
        got = states(client)
        assert (got["1"]["weight"], got["2"]["weight"]) == (0.75, 0.25)
        n = 400
        share = Counter(version_of(client) for _ in range(n))["2"] / n
        # Binomial(400, 0.25): sd 0.022; 0.08 is 3.7 sd.
        assert abs(share - 0.25) < 0.08, share
        for client_id in ("alice", "bob", "carol"):
            seen = {version_of(client, **{"X-Client-ID": client_id}) for _ in range(10)}
            assert len(seen) == 1, (client_id, seen)
        keyed = Counter(version_of(client, **{"X-Client-ID": f"user-{k}"}) for k in range(300))
        assert abs(keyed["2"] / 300 - 0.25) < 0.09, keyed
        assert version_of(client, "/v1/models/tiny/versions/2/classify") == "2"  # pinned wins


def test_a_shadow_gets_a_copy_whose_answers_are_compared_not_returned(repo):
    publish_version(repo / "tiny")  # the same graph: it must agree completely
    write_rollout(repo / "tiny", Rollout(weights={"1": 1}, shadow="2"))
    with serve(repo) as client:
        assert {s: states(client)[s]["shadow"] for s in ("1", "2")} == {"1": False, "2": True}
        sent = 20
        for k in range(sent):
            data = image_bytes(seed=k)
            resp = client.post("/v1/models/tiny/classify", content=data, headers=PNG)
            assert resp.json()["version"] == "1"

        def report() -> dict | None:
            pairs = client.get("/v1/models/tiny/shadow").json()["comparisons"]
            done = pairs and pairs[0]["images_compared"] + pairs[0]["images_dropped"] == sent
            return pairs[0] if done else None

        pair = wait_until(report, 10, "shadow comparisons incomplete")
        assert (pair["primary"], pair["shadow"]) == ("1", "2")
        assert pair["images_compared"] >= sent // 2 and pair["images_failed"] == 0
        assert pair["top1_agreement"] == 1.0 and pair["top5_overlap"] == 1.0
        assert pair["score_drift_max"] < 1e-5
        registry = client.app.state.runtime.metrics.registry  # type: ignore[attr-defined]
        compared = counted(registry, "resnet_serve_shadow_images_total", outcome="compared")
        assert compared == pair["images_compared"]
        assert counted(registry, "resnet_serve_shadow_top1_agreements_total") == compared
        # Pinned requests are not copied: a copy is handed to the shadow before its request
        # is answered, so once every copy handed over has settled, none came of it.
        version_of(client, "/v1/models/tiny/versions/1/classify")
        shadows = client.app.state.runtime.shadows  # type: ignore[attr-defined]
        wait_until(lambda: not shadows._tasks, 10, "shadow copies still running")
        assert report() == pair


def test_a_shadow_that_preprocesses_differently_is_refused(repo):
    with serve(repo) as client:
        publish_version(repo / "tiny")
        _other_contract(repo / "tiny" / "2")
        # The shadow's own config must agree with its tensors: same crop, other resize.
        text = (repo / "tiny" / "2" / CONTRACT_FILENAME).read_text()
        (repo / "tiny" / "2" / CONTRACT_FILENAME).write_text(
            text.replace('"crop": 40', '"crop": 32')
        )
        write_rollout(repo / "tiny", Rollout(weights={"1": 1}, shadow="2"))
        resp = client.post("/v1/models/tiny/reload", headers=ADMIN)
        assert_error(resp, 409, "load_failed", "shadow version 2 does not take the same input")
        assert client.get("/v1/models/tiny/shadow").json()["shadow"] is None
        assert version_of(client) == "1"


def test_grpc_reloads_pins_and_sticks_to_client_keys(repo):
    with serve(repo, grpc_port=0) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}")  # type: ignore[attr-defined]
        stub = pbg.ClassifierStub(channel)
        admin = (("authorization", "Bearer admin-key"),)
        denied = code_of(lambda: stub.ReloadModel(pb.ReloadModelRequest(model="tiny"), timeout=30))
        assert denied[0] == grpc.StatusCode.UNAUTHENTICATED
        publish_version(repo / "tiny")
        write_rollout(repo / "tiny", Rollout(weights={"1": 1, "2": 1}))
        reply = stub.ReloadModel(pb.ReloadModelRequest(model="tiny"), metadata=admin, timeout=30)
        assert (list(reply.serving), list(reply.added), list(reply.retired)) == (
            ["1", "2"],
            ["2"],
            [],
        )

        def answered(version: str = "", client_id: str = "") -> str:
            md = (("x-client-id", client_id),) if client_id else ()
            request = pb.ClassifyRequest(model="tiny", images=[IMAGE], model_version=version)
            return stub.Classify(request, metadata=md, timeout=30).model_version

        assert {answered("1"), answered("2")} == {"1", "2"}
        for client_id in ("a", "b", "c", "d"):
            assert len({answered(client_id=client_id) for _ in range(5)}) == 1
        assert len({answered() for _ in range(40)}) == 2  # unkeyed: both, by chance
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30).models[0]
        assert list(listed.versions) == ["1", "2"]
        publish_version(repo / "tiny")
        _truncate(repo / "tiny" / "3")
        code, details = code_of(
            lambda: stub.ReloadModel(
                pb.ReloadModelRequest(model="tiny"), metadata=admin, timeout=30
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 3: ONNX Runtime cannot load it" in details
        channel.close()
