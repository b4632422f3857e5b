"""Shadow traffic (service.runtime.shadow): how two logit batches are compared, and what
the shadows do with each answered batch: copy it to the model's shadow version only when
there is one and the primary is idle, one copy in flight at most, count what was compared,
dropped or failed, and never touch the primary's answer. The tiny model is served as
versions 1 and 2 by the embedded backend, in process; the data plane is not started (no
decoding processes): tensors go straight to the batchers."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.dataplane.plane import DataPlane
from service.dataplane.routing import Routing
from service.model.repository import load_spec
from service.observability.metrics import Metrics
from service.runtime.shadow import Comparison, Shadows, compare
from service.settings import Settings
from tests.helpers.metrics import counted


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- comparing two answers --------------------------------------------------------------------


def test_compare_reports_top1_agreement_top5_overlap_and_drift_per_image():
    primary = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], np.float32)
    shadow = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 6]], np.float32)
    agree, overlap, drift = compare(primary, shadow)
    assert agree.tolist() == [False, True]
    # Row 0: the primary's top-5 {5, 4, 3, 2, 1} against {0, 1, 2, 3, 4}: 4 of 5.
    assert overlap.tolist() == pytest.approx([0.8, 1.0])
    # The drift is the change of the primary's top-1 class's probability (class 5).
    expected = np.abs(softmax(primary)[:, 5] - softmax(shadow)[:, 5])
    assert drift == pytest.approx(expected, abs=1e-6)
    assert drift[1] > 0  # same ranking, other confidence: drift without disagreement


def test_with_fewer_than_five_classes_the_overlap_is_over_all_of_them():
    primary = np.array([[3.0, 2.0, 1.0]], np.float32)
    shadow = np.array([[1.0, 2.0, 3.0]], np.float32)
    agree, overlap, _ = compare(primary, shadow)
    assert agree.tolist() == [False] and overlap.tolist() == [1.0]


def test_a_pair_with_nothing_compared_reports_no_rates():
    report = Comparison("1", "2").as_dict()
    assert {k: report[k] for k in report if k != "since"} == {
        "primary": "1",
        "shadow": "2",
        "images_compared": 0,
        "images_dropped": 0,
        "images_failed": 0,
        "top1_agreement": None,
        "top5_overlap": None,
        "score_drift_mean": None,
        "score_drift_max": None,
    }


# --- the copies -------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    plane: DataPlane
    shadows: Shadows
    #: Images being decoded, as the shadows are told (live work the copies yield to).
    decoding: list[int]

    def version(self, v: str):
        return self.plane.routing("tiny").versions[v]

    def route(self, shadow: str | None) -> None:
        """Unpinned traffic to version 1; ``shadow`` gets the copies."""
        versions = self.plane.routing("tiny").versions
        self.plane.models["tiny"] = Routing(versions, (("1", 1.0),), shadow)

    def pairs(self) -> list[dict]:
        return self.shadows.report("tiny", self.plane.routing("tiny"))["comparisons"]

    def images(self, outcome: str) -> float:
        registry = self.plane.metrics.registry
        return counted(registry, "resnet_serve_shadow_images_total", outcome=outcome)

    def shadow_batches(self) -> int:
        (stats,) = self.plane.statistics("tiny", "2")
        return int(stats["execution_count"])


@pytest.fixture
async def stage(tiny):
    one = load_spec(tiny.model_dir)
    specs = [one, dataclasses.replace(one, version="2")]  # the same graph: the same answers
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    await backend.start(specs)
    settings = Settings(repository=tiny.repository, max_batch_delay_ms=0)
    plane = DataPlane(specs, backend, settings, Metrics())
    for version in plane.served():
        version.batcher.start()
    decoding = [0]
    shadows = Shadows(plane.metrics, plane.models.get, lambda: decoding[0], timeout_s=5.0)
    plane.attach(shadows)
    stage = Stage(plane, shadows, decoding)
    stage.route("2")
    yield stage
    await plane.close()  # the shadows' copies finish first
    await backend.close()


def batch_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


async def answer(stage: Stage, batch: np.ndarray) -> np.ndarray:
    """Version 1's real logits for ``batch`` (what the primary answered)."""
    return await stage.plane.backend.infer(stage.version("1").spec, batch, 5.0)


async def test_a_shadow_that_answers_alike_agrees_on_every_image(stage):
    batch = batch_of(3)
    logits = await answer(stage, batch)
    stage.shadows.answered(stage.version("1"), batch, logits)
    await stage.shadows.close()
    (pair,) = stage.pairs()
    assert (pair["primary"], pair["shadow"], pair["images_compared"]) == ("1", "2", 3)
    assert (pair["top1_agreement"], pair["top5_overlap"]) == (1.0, 1.0)
    assert pair["score_drift_max"] < 1e-5
    assert (pair["images_dropped"], pair["images_failed"]) == (0, 0)
    registry = stage.plane.metrics.registry
    assert stage.images("compared") == 3
    assert counted(registry, "resnet_serve_shadow_top1_agreements_total", shadow="2") == 3
    assert counted(registry, "resnet_serve_shadow_score_drift_count", shadow="2") == 3
    assert stage.shadow_batches() == 1  # the copy is the primary's batch, whole


async def test_a_shadow_that_disagrees_is_reported_and_the_answer_is_left_alone(stage):
    batch = batch_of(4, seed=1)
    primary = -(await answer(stage, batch))  # the primary ranks every class the other way
    sent = primary.copy()
    stage.shadows.answered(stage.version("1"), batch, primary)
    await stage.shadows.close()
    np.testing.assert_array_equal(primary, sent)  # the caller's answer is untouched
    (pair,) = stage.pairs()
    assert pair["images_compared"] == 4
    assert (pair["top1_agreement"], pair["top5_overlap"]) == (0.0, 0.0)  # top-5 vs bottom-5
    shadow = -primary
    top1 = primary.argmax(axis=1)
    rows = np.arange(4)
    drift = np.abs(softmax(primary)[rows, top1] - softmax(shadow)[rows, top1])
    assert pair["score_drift_mean"] == pytest.approx(drift.mean(), abs=1e-5)
    assert pair["score_drift_max"] == pytest.approx(drift.max(), abs=1e-5)
    assert counted(stage.plane.metrics.registry, "resnet_serve_shadow_top1_agreements_total") == 0


@pytest.mark.parametrize("shadow", [None, "1"])
async def test_no_copy_without_a_shadow_or_to_the_primary_itself(stage, shadow):
    stage.route(shadow)
    batch = batch_of(2)
    stage.shadows.answered(stage.version("1"), batch, await answer(stage, batch))
    await stage.shadows.close()
    assert stage.pairs() == [] and stage.shadow_batches() == 0
    assert stage.images("compared") == stage.images("dropped") == 0


async def test_no_copy_for_a_model_no_longer_routed(stage):
    batch = batch_of(2)
    logits = await answer(stage, batch)
    primary = stage.version("1")
    del stage.plane.models["tiny"]  # routes() now answers None
    stage.shadows.answered(primary, batch, logits)
    await stage.shadows.close()
    assert stage.shadows.report("tiny", Routing({}))["comparisons"] == []


def _queued(stage: Stage) -> None:
    stage.version("1").batcher.reserve(1, time.perf_counter() + 60)


def _decoding(stage: Stage) -> None:
    stage.decoding[0] = 1


@pytest.mark.parametrize(("busy", "n"), [(_queued, 2), (_decoding, 2), (None, 9)])
async def test_a_copy_is_dropped_while_the_primary_has_live_work_or_if_too_large(stage, busy, n):
    """Live work waiting for the primary (queued, or images decoding), or a batch larger than
    the shadow takes (8): the copy is dropped and counted, the shadow does nothing."""
    if busy is not None:
        busy(stage)
    batch = batch_of(n)
    logits = await answer(stage, batch)
    stage.shadows.answered(stage.version("1"), batch, logits)
    await stage.shadows.close()
    (pair,) = stage.pairs()
    assert (pair["images_compared"], pair["images_dropped"]) == (0, n)
    assert pair["top1_agreement"] is None
    assert stage.images("dropped") == n and stage.shadow_batches() == 0
    if busy is _queued:
        stage.version("1").batcher.release(1)


async def test_one_copy_in_flight_at_most(stage):
    batch = batch_of(2)
    logits = await answer(stage, batch)
    primary = stage.version("1")
    stage.shadows.answered(primary, batch, logits)
    stage.shadows.answered(primary, batch, logits)  # while the first copy runs
    await stage.shadows.close()
    (pair,) = stage.pairs()
    assert (pair["images_compared"], pair["images_dropped"]) == (2, 2)
    assert stage.shadow_batches() == 1


async def test_a_shadow_that_fails_is_counted_and_the_primary_never_sees_it(stage):
    await stage.version("2").batcher.close()  # refuses every copy (shutting down)
    batch = batch_of(3)
    logits = await answer(stage, batch)
    stage.shadows.answered(stage.version("1"), batch, logits)  # returns, raises nothing
    await stage.shadows.close()
    (pair,) = stage.pairs()
    assert (pair["images_compared"], pair["images_failed"]) == (0, 3)
    assert stage.images("failed") == 3


async def test_comparisons_are_kept_once_the_shadow_is_taken_away(stage):
    batch = batch_of(2)
    stage.shadows.answered(stage.version("1"), batch, await answer(stage, batch))
    await stage.shadows.close()
    stage.route(None)
    report = stage.shadows.report("tiny", stage.plane.routing("tiny"))
    assert report["model"] == "tiny" and report["shadow"] is None
    assert [p["images_compared"] for p in report["comparisons"]] == [2]


async def test_the_plane_copies_unpinned_batches_only(stage):
    """Through the data plane's answer hook: a request the routing sent to version 1 is
    copied, one that named version 1 is not; both get version 1's own answer."""
    batch = batch_of(2, seed=2)
    expected = await answer(stage, batch)
    plane = stage.plane

    async def copied(plan) -> int:
        np.testing.assert_allclose(await plane.infer(plan, batch), expected, atol=1e-6)
        await stage.shadows.close()
        # Compared, or dropped if the primary's batch was still finishing.
        return sum(p["images_compared"] + p["images_dropped"] for p in stage.pairs())

    assert await copied(plane.plan("tiny")) == 2
    assert await copied(plane.plan("tiny", version="1")) == 2  # no more
