"""The data plane, its routing and the shadows, driven directly (as KServe tests its
DataPlane) with a scripted backend: real images decoded by the real preprocessing, real
batchers, a backend whose logits and batches the test chooses and sees."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from service.backends.base import Backend
from service.dataplane.plane import Classification, DataPlane, Prediction, exclusive_cpus
from service.dataplane.routing import Routing
from service.errors import ModelNotFound, ValidationFailed
from service.host.processes import wait_until
from service.model.repository import ModelSpec, load_spec
from service.observability.metrics import Metrics
from service.runtime.shadow import Shadows
from service.settings import Settings
from tests.helpers.images import image_bytes

IMAGES = [image_bytes(seed=i) for i in range(3)]


class ScriptedBackend(Backend):
    """Logits chosen per version (every image of a batch gets its version's row); every
    batch recorded as (version, size)."""

    name = "scripted"
    max_inflight_batches = 2

    def __init__(self, logits: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.logits = logits
        self.batches: list[tuple[str, int]] = []

    async def start(self, specs: list[ModelSpec]) -> None: ...

    async def load(self, spec: ModelSpec) -> None: ...

    async def unload(self, spec: ModelSpec) -> None: ...

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        assert batch.shape[1:] == spec.contract.input_shape  # what preprocessing made
        self.batches.append((spec.version, len(batch)))
        return np.tile(self.logits[spec.version], (len(batch), 1)).astype(np.float32)

    def is_ready(self) -> bool:
        return True

    async def close(self) -> None: ...


@pytest.fixture
def specs(tiny) -> list[ModelSpec]:
    one = load_spec(tiny.model_dir)
    return [one, dataclasses.replace(one, version="2")]


def make_plane(specs, logits, **settings) -> tuple[DataPlane, ScriptedBackend]:
    backend = ScriptedBackend(logits)
    config = Settings(repository=specs[0].model_path.parent.parent, **settings)
    plane = DataPlane(specs, backend, config, Metrics())
    plane.start()
    return plane, backend


RISING = np.arange(10, dtype=np.float32)  # class 9 best, then 8, ...
FALLING = RISING[::-1].copy()  # class 0 best


@pytest.mark.external
async def test_concurrent_requests_each_get_their_own_top_k_of_the_newest_version(specs):
    plane, backend = make_plane(specs, {"2": RISING})
    try:
        plans = [plane.plan("tiny", top_k=k) for k in (1, 3, 10)]
        results = await asyncio.gather(
            *(plane.classify(p, [img]) for p, img in zip(plans, IMAGES, strict=True))
        )
    finally:
        await plane.close()
    # Unpinned: the newest version. (How the batcher groups them is test_batching's.)
    assert {v for v, _ in backend.batches} == {"2"} and sum(n for _, n in backend.batches) == 3
    probs = np.exp(RISING - RISING.max()) / np.exp(RISING - RISING.max()).sum()  # softmax
    for result, k in zip(results, (1, 3, 10), strict=True):
        (row,) = result.predictions
        assert [p.index for p in row] == list(range(9, 9 - k, -1))
        assert [p.label for p in row] == [specs[1].labels[i] for i in range(9, 9 - k, -1)]
        assert [p.score for p in row] == pytest.approx(list(probs[::-1][:k]))
        assert (result.model, result.version) == ("tiny", "2")
    (stats,) = plane.statistics("tiny", "2")
    assert stats["inference_count"] == 3
    assert stats["execution_count"] == len(backend.batches)


@pytest.mark.external
async def test_a_request_resolves_to_a_version_once_and_bad_ones_are_named(specs):
    plane, backend = make_plane(specs, {"1": RISING, "2": FALLING})
    try:
        pinned = plane.plan("tiny", version="1")
        assert pinned.pinned and pinned.spec.version == "1"
        result = await plane.classify(pinned, IMAGES[:1])
        assert result.version == "1" and result.predictions[0][0].index == 9
        with pytest.raises(ModelNotFound, match="serving versions 1, 2"):
            plane.plan("tiny", version="7")
        with pytest.raises(ModelNotFound, match="is not served"):
            plane.plan("nope")
        with pytest.raises(ValidationFailed, match="top_k must be an integer between 1 and 10"):
            plane.plan("tiny", top_k=11)
        with pytest.raises(ValidationFailed, match=r"at least 0\.001 seconds"):
            plane.plan("tiny", timeout_s=0)
    finally:
        await plane.close()
    assert backend.batches == [("1", 1)]


@pytest.mark.external
async def test_routing_splits_unpinned_traffic_by_weight_and_keeps_a_client_on_one_version(
    specs,
):
    plane, _ = make_plane(specs, {})
    await plane.close()
    versions = plane.routing("tiny").versions
    assert Routing(versions).pick("tiny", None).spec.version == "2"  # no weights: the newest
    canary = Routing(versions, weights=(("1", 0.9), ("2", 0.1)))
    assert canary.shares() == {"1": 0.9, "2": 0.1}
    picks = [canary.pick("tiny", f"client-{i}").spec.version for i in range(4000)]
    assert 0.08 < picks.count("2") / len(picks) < 0.12  # hashed keys spread by weight
    assert {canary.pick("tiny", "client-7").spec.version for _ in range(50)} == {picks[7]}


@pytest.mark.external
async def test_shadows_on_the_planes_hook_compare_unpinned_batches_only(specs):
    """Version 1 serves; version 2 shadows it with a different top-1: the comparison says
    so. A pinned request is never copied."""
    plane, backend = make_plane(specs, {"1": RISING, "2": FALLING})
    shadows = Shadows(plane.metrics, plane.models.get, lambda: plane.decoder.backlog, 5.0)
    plane.attach(shadows)
    plane.models["tiny"] = Routing(plane.routing("tiny").versions, (("1", 1.0),), shadow="2")
    try:
        await plane.classify(plane.plan("tiny"), IMAGES[:2])

        def compared() -> int:
            (pair,) = shadows.report("tiny", plane.routing("tiny"))["comparisons"]
            return pair["images_compared"]

        await asyncio.to_thread(wait_until, lambda: shadows._pairs and compared() == 2, 10, "none")
        await plane.classify(plane.plan("tiny", version="1"), IMAGES[:1])
    finally:
        await plane.close()  # the copies in flight finish first
    report = shadows.report("tiny", plane.routing("tiny"))
    (pair,) = report["comparisons"]
    assert report["shadow"] == "2" and (pair["primary"], pair["shadow"]) == ("1", "2")
    assert pair["images_compared"] == 2 and pair["top1_agreement"] == 0.0
    assert pair["top5_overlap"] == 0.0  # classes 9..5 against 0..4
    served = [v for v, _ in backend.batches]
    assert served.count("2") >= 1 and sum(n for v, n in backend.batches if v == "2") == 2
    assert sum(n for v, n in backend.batches if v == "1") == 3  # the pinned one is not copied


@pytest.mark.external
async def test_the_plane_tells_its_hooks_of_unpinned_batches_and_closes_them(specs):
    plane, _ = make_plane(specs, {"1": RISING, "2": FALLING})
    seen: list[tuple[str, int]] = []
    closed: list[bool] = []

    class Hook:
        def answered(self, served, batch, logits) -> None:
            assert logits.shape == (len(batch), 10)
            seen.append((served.spec.version, len(batch)))

        async def close(self) -> None:
            closed.append(True)

    plane.attach(Hook())
    await plane.classify(plane.plan("tiny"), IMAGES)
    await plane.classify(plane.plan("tiny", version="1"), IMAGES[:1])
    await plane.close()
    assert seen == [("2", 3)] and closed == [True]


LABELS = ('say "cheese"', "back\\slash", "tab\there", "ünïcödé 日本", "ctrl\x01", "🐈", "/", "x")


@pytest.mark.parametrize(
    "scores",
    [(0.123456789012345, 1e-10, 1.0), (5e-324, 0.5, 1 / 3), (0.0, 2.220446049250313e-16, 0.9)],
)
def test_the_rest_answer_is_the_json_of_its_classification_byte_for_byte(specs, scores):
    """REST's classify answer is written out from the labels encoded once; it is exactly
    what JSONResponse renders for the same classification, odd labels included."""
    from starlette.responses import JSONResponse

    from service.transports.http.rest_v1 import _body, _response

    spec = dataclasses.replace(specs[0], labels=LABELS + specs[0].labels[len(LABELS) :])
    rows = [
        [Prediction(i, spec.labels[i], s) for i, s in zip((0, 3, 5), scores, strict=True)],
        [Prediction(i, spec.labels[i], s) for i, s in zip((1, 2, 4), scores[::-1], strict=True)],
    ]
    result = Classification('m"odel', "7", rows)
    got, want = _response(result, spec.labels_json), JSONResponse(_body(result))
    assert got.body == want.body
    assert dict(got.headers) == dict(want.headers)
    result.predictions[1][0] = Prediction(1, spec.labels[1], float("nan"))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        _response(result, spec.labels_json)  # refused as JSONResponse refuses it


@pytest.mark.parametrize(
    ("setting", "cpus_per_batch", "cpus", "exclusive"),
    [
        (None, 1, 2, True),  # two single-threaded batches (OpenVINO's streams on 2 cores)
        (None, 4, 16, True),
        (None, 2, 2, False),  # one batch on all the cores (ONNX Runtime's default)
        (None, 1, 1, False),
        (None, 0, 2, False),  # batches on a GPU or a server hold no CPU here
        (True, 2, 2, True),  # set: as set
        (False, 1, 2, False),
    ],
)
def test_cpus_are_exclusive_where_a_batch_leaves_cores_for_decoding(
    setting, cpus_per_batch, cpus, exclusive
):
    assert exclusive_cpus(setting, cpus_per_batch, cpus) is exclusive
