"""The model lifecycle (service.runtime.lifecycle) driven directly: what a reload reports,
a version added beside the served one and the old one retired only once its last request
is past its deadline, a quick rollback that routes to the retiring version again, canary
weights and shadows from rollout.json, a version or a repository that cannot be served
leaving what serves untouched (the parity probe included), reloads one at a time, the
repository's fingerprint, and polling on a virtual clock.

The tiny model is copied into a repository of the test's own and served by the embedded
backend in process; the data plane is not started (no decoding processes, no request
runs): a reload loads, probes and routes without them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from export.repository import republish
from service.backends.base import Backend
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.dataplane.plane import DataPlane
from service.errors import BackendUnavailable, LoadFailed, ModelNotFound
from service.model.repository import (
    CONFIG_FILENAME,
    MODEL_FILENAME,
    PROBE_FILENAME,
    ROLLOUT_FILENAME,
    Rollout,
    load_repository,
    write_rollout,
)
from service.observability.metrics import Metrics
from service.runtime.lifecycle import Lifecycle, Reload, fingerprint
from service.settings import Settings
from tests.helpers.doubles import SlowBackend
from tests.helpers.engines import ENGINES, embedded
from tests.helpers.metrics import counted
from tests.helpers.timing import on_virtual_clock, until


@dataclass
class Served:
    lifecycle: Lifecycle
    plane: DataPlane
    backend: Backend
    metrics: Metrics

    def states(self) -> dict[str, dict]:
        return {s["version"]: s for s in self.lifecycle.states("tiny")}

    def version(self, v: str):
        return self.plane.routing("tiny").versions[v]

    def count(self, name: str, **labels: str) -> float:
        return counted(self.metrics.registry, name, **labels)


@contextlib.asynccontextmanager
async def serving(
    repo: Path, backend: Backend | None = None, engine: str = "onnxruntime", **settings
) -> AsyncIterator[Served]:
    """The repository served as the runtime serves it, less the running data plane (by
    ``backend``, else the embedded ``engine``)."""
    config = Settings(repository=repo, **settings)
    backend = backend or embedded(engine, intra_op_threads=1)
    specs = load_repository(repo)
    await backend.start(specs)
    metrics = Metrics()
    plane = DataPlane(specs, backend, config, metrics)
    lifecycle = Lifecycle(config, plane, backend, metrics)
    lifecycle.start()
    try:
        yield Served(lifecycle, plane, backend, metrics)
    finally:
        await lifecycle.close()
        await plane.close()
        await backend.close()


@pytest.fixture
def repo(tiny, tmp_path) -> Path:
    """A copy of the tiny model's repository (version 1), for a test to change."""
    shutil.copytree(tiny.repository, tmp_path / "repo")
    return tmp_path / "repo"


def publish(repo: Path) -> str:
    """The newest version published again as the next one (the real publish)."""
    return str(republish(repo / "tiny", repo, "onnxruntime"))


def truncate_model(repo: Path, version: str) -> None:
    path = repo / "tiny" / version / MODEL_FILENAME
    path.write_bytes(path.read_bytes()[:200])


# --- what a reload reports --------------------------------------------------------------------


def test_a_reload_report_says_what_serves_and_why_the_rest_does_not():
    fine = Reload("tiny", serving=["1", "2"], added=["2"], retired=["1"])
    assert fine.ok and fine.check() is fine
    bad = Reload("tiny", serving=["1"], failed={"2": "model 'tiny' version 2: broken", "": "odd"})
    assert not bad.ok
    with pytest.raises(LoadFailed) as info:
        bad.check()
    assert info.value.message == (
        "model 'tiny': still serving version 1; model 'tiny' version 2: broken; odd"
    )
    assert (info.value.http_status, info.value.code) == (409, "load_failed")
    report = bad.as_dict()
    assert report["ok"] is False and report["serving"] == ["1"]
    # A problem of the whole model is reported without a version.
    assert report["failed"] == [
        {"version": "2", "error": "model 'tiny' version 2: broken"},
        {"version": None, "error": "odd"},
    ]


async def test_reloading_an_unchanged_repository_keeps_every_version_as_it_is(repo):
    async with serving(repo) as served:
        before = served.version("1")
        for model in ("tiny", None):  # None: the default model
            result = await served.lifecycle.reload(model)
            assert (result.ok, result.serving, result.added, result.retired) == (
                True,
                ["1"],
                [],
                [],
            )
        assert served.version("1") is before  # not loaded again: the same batcher, the same stats
        assert served.lifecycle.reloads["tiny"] is result


async def test_a_model_that_is_not_served_cannot_be_reloaded(repo):
    async with serving(repo) as served:
        with pytest.raises(ModelNotFound, match="model 'nope' is not served"):
            await served.lifecycle.reload("nope")
        assert set(served.lifecycle.reloads) == {"tiny"}


# --- new versions, retired versions, rollback -------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_retired_version_keeps_answering_until_its_last_request_is_past(repo, engine):
    async with serving(repo, engine=engine) as served:
        old = served.version("1")
        old.last_deadline = time.perf_counter() + 3600  # a request planned on it, still running
        publish(repo)
        result = await served.lifecycle.reload("tiny")
        assert (result.serving, result.added, result.retired) == (["2"], ["2"], ["1"])
        assert served.plane.routing("tiny").newest.spec.version == "2"
        assert {v: s["state"] for v, s in served.states().items()} == {
            "1": "retiring",
            "2": "serving",
        }
        with pytest.raises(ModelNotFound, match="serving versions 2"):
            served.plane.served_version("tiny", "1")  # no new request is routed to it
        x = np.zeros((1, 3, 32, 32), np.float32)
        assert (await served.backend.infer(old.spec, x, 5.0)).shape == (1, 10)  # still loaded
        assert served.count("resnet_serve_model_loads_total", version="2", outcome="ok") == 1
        assert served.count("resnet_serve_traffic_weight", version="1") == 0
        assert served.count("resnet_serve_traffic_weight", version="2") == 1


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_retired_version_is_released_once_past_its_last_deadline(repo, engine):
    gauges = ("resnet_serve_model_info", "resnet_serve_queue_capacity")
    async with serving(repo, engine=engine) as served:
        old = served.version("1")  # no request planned on it: its last deadline is long past
        assert all(served.count(g, version="1") > 0 for g in gauges)
        publish(repo)
        await served.lifecycle.reload("tiny")
        await until(lambda: list(served.states()) == ["2"])
        with pytest.raises(BackendUnavailable, match="version 1 is not loaded"):
            await served.backend.infer(old.spec, np.zeros((1, 3, 32, 32), np.float32), 5.0)
        # Its series are gone (a stale one would read as a live version); 2's are there.
        assert [served.count(g, version="1") for g in gauges] == [0, 0]
        assert all(served.count(g, version="2") > 0 for g in gauges)


async def test_a_rollback_while_retiring_routes_to_the_same_version_again(repo):
    """No second load: the retiring version itself serves again, at once."""
    async with serving(repo) as served:
        old = served.version("1")
        old.last_deadline = time.perf_counter() + 3600
        publish(repo)
        await served.lifecycle.reload("tiny")
        write_rollout(repo / "tiny", Rollout(weights={"1": 1}))
        result = await served.lifecycle.reload("tiny")
        assert (result.ok, result.serving, result.added, result.retired) == (
            True,
            ["1", "2"],
            ["1"],
            [],
        )
        assert served.version("1") is old
        assert served.plane.routing("tiny").pick("tiny", "anyone") is old
        states = served.states()
        assert states["1"]["state"] == "serving" and states["1"]["weight"] == 1.0
        assert states["2"]["state"] == "serving" and states["2"]["weight"] == 0.0


# --- rollout.json -----------------------------------------------------------------------------


async def test_the_rollouts_weights_and_shadow_become_the_routing(repo):
    publish(repo)
    publish(repo)
    async with serving(repo) as served:
        write_rollout(repo / "tiny", Rollout(weights={"1": 3, "2": 1, "3": 0}, shadow="3"))
        result = await served.lifecycle.reload("tiny")
        assert result.ok and result.serving == ["1", "2", "3"]
        routing = served.plane.routing("tiny")
        assert routing.weights == (("1", 3.0), ("2", 1.0)) and routing.shadow == "3"
        states = served.states()
        assert {v: (s["weight"], s["shadow"]) for v, s in states.items()} == {
            "1": (0.75, False),
            "2": (0.25, False),
            "3": (0.0, True),
        }
        for version, share in (("1", 0.75), ("2", 0.25), ("3", 0.0)):
            assert served.count("resnet_serve_traffic_weight", version=version) == share
        write_rollout(repo / "tiny", Rollout())  # back to the default: the newest takes all
        result = await served.lifecycle.reload("tiny")
        assert (result.serving, result.retired) == (["3"], ["1", "2"])
        assert served.plane.routing("tiny").shares() == {"3": 1.0}


@pytest.mark.parametrize("engine", ENGINES)
async def test_canary_weights_on_a_version_that_cannot_load_go_to_the_newest_served(repo, engine):
    async with serving(repo, engine=engine) as served:
        publish(repo)
        truncate_model(repo, "2")
        write_rollout(repo / "tiny", Rollout(weights={"1": 1, "2": 1}))
        result = await served.lifecycle.reload("tiny")
        assert not result.ok and result.serving == ["1"] and result.retired == []
        assert f"{served.backend.engine} cannot load it" in result.failed["2"]
        assert result.failed[""] == (
            "model 'tiny': canary weights for version 2, which is not served; unpinned "
            "traffic goes to the newest served version"
        )
        routing = served.plane.routing("tiny")
        assert routing.weights == () and routing.shares() == {"1": 1.0}
        assert served.states()["2"] == {
            "version": "2",
            "state": "failed",
            "error": result.failed["2"],
        }
        assert served.count("resnet_serve_model_load_failing", model="tiny") == 2
        assert served.count("resnet_serve_model_loads_total", outcome="failed") == 1


# --- what cannot be served --------------------------------------------------------------------


class NaNForVersion2(SlowBackend):
    """The embedded backend, except that version 2 answers NaN (a broken kernel, a bad
    execution provider): loads fine, computes garbage."""

    async def infer(self, spec, batch, timeout_s):
        logits = await super().infer(spec, batch, timeout_s)
        return np.full_like(logits, np.nan) if spec.version == "2" else logits


async def test_a_version_whose_backend_answers_garbage_fails_its_probe_and_is_unloaded(repo):
    backend = NaNForVersion2(OnnxRuntimeBackend(intra_op_threads=1), 0.0)
    async with serving(repo, backend) as served:
        publish(repo)
        result = await served.lifecycle.reload("tiny")
        assert result.serving == ["1"] and list(result.failed) == ["2"]
        assert result.failed["2"].startswith(
            "model 'tiny' version 2: parity probe: the backend answered [2, 10] with "
            "non-finite or misshapen logits (expected [2, 10])"
        )
        spec2 = dataclasses.replace(served.version("1").spec, version="2")
        with pytest.raises(BackendUnavailable, match="version 2 is not loaded"):
            await backend.inner.infer(spec2, np.zeros((1, 3, 32, 32), np.float32), 5.0)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_version_published_without_a_probe_is_served(repo, engine):
    """An older export has no probe.npz: a blank image must give finite logits of the
    model's shape, nothing more is asked."""
    async with serving(repo, engine=engine) as served:
        publish(repo)
        (repo / "tiny" / "2" / PROBE_FILENAME).unlink()
        result = await served.lifecycle.reload("tiny")
        assert result.ok and result.serving == ["2"]


@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        (lambda d: (d / CONFIG_FILENAME).write_text("max_batch_size: nope\n"), "config.pbtxt"),
        (
            lambda d: (d / ROLLOUT_FILENAME).write_text(json.dumps({"weights": {"7": 1}})),
            "rollout.json names version 7, not in the repository (versions: 1)",
        ),
        (
            lambda d: (d / ROLLOUT_FILENAME).write_text(json.dumps({"weights": {"1": -1}})),
            "weight of version 1 must be 0 or more, got -1",
        ),
    ],
)
async def test_a_repository_problem_of_the_whole_model_keeps_it_serving(repo, breakage, why):
    config = (repo / "tiny" / CONFIG_FILENAME).read_text()
    async with serving(repo) as served:
        before = served.version("1")
        breakage(repo / "tiny")
        result = await served.lifecycle.reload("tiny")
        assert result.serving == ["1"] and list(result.failed) == [""]
        assert result.failed[""].startswith("model 'tiny': ") and why in result.failed[""]
        assert result.as_dict()["failed"] == [{"version": None, "error": result.failed[""]}]
        with pytest.raises(LoadFailed, match="still serving version 1"):
            result.check()
        assert served.version("1") is before and list(served.states()) == ["1"]
        assert served.count("resnet_serve_model_load_failing", model="tiny") == 1
        # Mended: the next reload says so, and the failing gauge goes back to 0.
        (repo / "tiny" / ROLLOUT_FILENAME).unlink(missing_ok=True)
        (repo / "tiny" / CONFIG_FILENAME).write_text(config)
        assert (await served.lifecycle.reload("tiny")).ok
        assert served.count("resnet_serve_model_load_failing", model="tiny") == 0
        assert served.version("1") is before


async def test_reloads_of_one_model_run_one_at_a_time(repo):
    async with serving(repo) as served:
        publish(repo)
        first, second = await asyncio.gather(
            served.lifecycle.reload("tiny"), served.lifecycle.reload("tiny")
        )
        assert sorted([first.added, second.added]) == [[], ["2"]]  # loaded once
        assert first.serving == second.serving == ["2"]
        assert served.count("resnet_serve_model_loads_total", version="2", outcome="ok") == 1


# --- watching the repository ------------------------------------------------------------------


def test_the_fingerprint_changes_with_the_versions_not_with_hidden_entries(repo):
    model = repo / "tiny"
    first = fingerprint(model)
    assert first is not None and fingerprint(model) == first
    (model / ".staging-2").mkdir()  # a publish under way
    (model / ".resnet-export.lock").write_text("")
    assert fingerprint(model) == first
    with (model / "1" / "export_report.json").open("a") as fh:
        fh.write(" ")  # a file of a version rewritten
    second = fingerprint(model)
    assert second != first
    publish(repo)
    assert fingerprint(model) not in (first, second)
    assert fingerprint(repo / "gone") is None


def test_polling_reloads_on_a_change_and_retries_a_failure_only_after_the_next(repo):
    """Every 60 s (virtual): nothing changed, no reload; a new, broken version is tried
    once and not again while the repository stays as it is; mended, it is served."""

    async def main() -> None:
        async with serving(repo, poll_interval_s=60) as served:
            lifecycle = served.lifecycle
            started = lifecycle.reloads["tiny"]
            await asyncio.sleep(61)
            assert lifecycle.reloads["tiny"] is started  # nothing changed: no reload
            publish(repo)
            good = (repo / "tiny" / "2" / MODEL_FILENAME).read_bytes()
            truncate_model(repo, "2")
            await asyncio.sleep(61)
            await until(lambda: lifecycle.reloads["tiny"] is not started)
            failed = lifecycle.reloads["tiny"]
            assert list(failed.failed) == ["2"] and failed.serving == ["1"]
            await asyncio.sleep(600)  # ten polls of an unchanged repository
            assert lifecycle.reloads["tiny"] is failed
            (repo / "tiny" / "2" / MODEL_FILENAME).write_bytes(good)
            await asyncio.sleep(61)  # past the next poll (the reload may still be running)
            await until(lambda: lifecycle.reloads["tiny"] is not failed)
            mended = lifecycle.reloads["tiny"]
            assert mended.ok and (mended.serving, mended.added) == (["2"], ["2"])

    on_virtual_clock(main())
