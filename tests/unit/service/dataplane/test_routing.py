"""Where a model's requests go (service.dataplane.routing, and the data plane's pinned and
unknown versions): the newest version by number, canary weights, the split of unpinned
traffic (sticky per client key, stable as a canary ramps up, never off the end), and the
errors that name what is served. The versions are real (the data plane makes them); no
request runs, so no model file is needed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.dataplane.plane import DataPlane
from service.dataplane.routing import Routing
from service.errors import ModelNotFound
from service.model.repository import ModelSpec
from service.observability.metrics import Metrics
from service.settings import Settings
from tests.helpers.models import contract

CONTRACT = contract(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=3)


def spec(name: str, version: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        contract=CONTRACT,
        labels=("cat", "dog", "fish"),
        max_batch_size=4,
        model_path=Path(name, version, "model.onnx"),
        platform="onnxruntime_onnx",
        config=mc.ModelConfig(name=name, max_batch_size=4),
    )


@pytest.fixture
def plane(tmp_path) -> DataPlane:
    """Model "tiny" at versions 2, 9 and 10, model "alpha" at 1 (the default: first by
    name). Never started: routing needs no running batcher or decoder."""
    specs = [spec("tiny", v) for v in ("2", "9", "10")] + [spec("alpha", "1")]
    return DataPlane(specs, OnnxRuntimeBackend(), Settings(repository=tmp_path), Metrics())


def picked(routing: Routing, client: str | None, model: str = "tiny") -> str:
    return routing.pick(model, client).spec.version


CLIENTS = [f"client-{i}" for i in range(4000)]


def test_the_newest_version_is_the_highest_number_not_the_last_string(plane):
    routing = plane.routing("tiny")
    assert routing.newest.spec.version == "10"  # "9" > "10" as strings
    assert routing.shares() == {"10": 1.0}
    assert {picked(routing, c) for c in (None, "", "alice", "bob")} == {"10"}
    assert plane.spec("tiny").version == "10"


@pytest.mark.parametrize(
    ("weights", "shares"),
    [
        ((("2", 3.0), ("10", 1.0)), {"2": 0.75, "10": 0.25}),
        ((("2", 0.2), ("9", 0.2), ("10", 0.6)), {"2": 0.2, "9": 0.2, "10": 0.6}),
        ((("9", 5.0),), {"9": 1.0}),
    ],
)
def test_weights_are_relative_shares_of_the_unpinned_requests(plane, weights, shares):
    got = Routing(plane.routing("tiny").versions, weights).shares()
    assert got == pytest.approx(shares) and list(got) == list(shares)
    assert sum(got.values()) == pytest.approx(1.0)


def test_all_the_weight_on_an_older_version_sends_every_unpinned_request_there(plane):
    routing = Routing(plane.routing("tiny").versions, (("2", 1.0),))
    assert {picked(routing, c) for c in [None, "", *CLIENTS[:200]]} == {"2"}


def test_a_client_key_always_gets_the_same_version_across_reloads(plane):
    versions = plane.routing("tiny").versions
    weights = (("9", 1.0), ("10", 1.0))
    first = [picked(Routing(versions, weights), c) for c in CLIENTS[:500]]
    again = [picked(Routing(dict(versions), weights), c) for c in CLIENTS[:500]]
    assert first == again  # a new routing with the same weights: nobody moves
    assert set(first) == {"9", "10"}


def test_a_client_key_lands_independently_on_each_model(plane):
    """The key is hashed with the model's name: the clients in one model's canary are not
    those of every other model's."""
    versions = plane.routing("tiny").versions
    routing = Routing(versions, (("9", 1.0), ("10", 1.0)))
    tiny = [picked(routing, c, "tiny") for c in CLIENTS[:500]]
    other = [picked(routing, c, "other") for c in CLIENTS[:500]]
    assert tiny != other
    both = sum(a == b == "10" for a, b in zip(tiny, other, strict=True))
    assert 0.15 < both / 500 < 0.35  # about a quarter: independent halves


def test_raising_a_canarys_weight_only_moves_clients_onto_it(plane):
    """A ramp-up (10%, 50%, 90%) never sends a client that was on the canary back to the
    primary, and each step gets about its share of the keys."""
    versions = plane.routing("tiny").versions
    on_canary = []
    for share in (0.1, 0.5, 0.9):
        routing = Routing(versions, (("9", 1 - share), ("10", share)))
        canary = {c for c in CLIENTS if picked(routing, c) == "10"}
        assert abs(len(canary) / len(CLIENTS) - share) < 0.03, share
        on_canary.append(canary)
    assert on_canary[0] <= on_canary[1] <= on_canary[2]


@pytest.mark.parametrize(
    ("point", "version"),
    [(0.0, "2"), (0.7499, "2"), (0.75, "10"), (1 - 2**-53, "10")],
)
@pytest.mark.parametrize("client", [None, ""])
def test_without_a_client_key_a_random_point_picks_by_weight(
    plane, monkeypatch, client, point, version
):
    monkeypatch.setattr(random, "random", lambda: point)
    routing = Routing(plane.routing("tiny").versions, (("2", 3.0), ("10", 1.0)))
    assert picked(routing, client) == version


def test_the_top_of_the_range_goes_to_the_last_version_never_off_the_end(plane, monkeypatch):
    """Ten shares of 0.1 add up to less than 1 in floating point: a point above their sum
    still gets a version."""
    versions = {str(v): plane.version(spec("tiny", str(v))) for v in range(1, 11)}
    routing = Routing(versions, tuple((str(v), 0.1) for v in range(1, 11)))
    monkeypatch.setattr(random, "random", lambda: 1 - 2**-53)
    assert picked(routing, None) == "10"


def test_a_pinned_version_is_served_whatever_the_weights(plane):
    plane.models["tiny"] = Routing(plane.routing("tiny").versions, (("10", 1.0),))
    for version in ("2", "9", "10"):
        served = plane.served_version("tiny", version, client="alice")
        assert served is plane.routing("tiny").versions[version]
        plan = plane.plan("tiny", version=version)
        assert plan.pinned and plan.spec.version == version
    assert not plane.plan("tiny").pinned


def test_an_unknown_version_is_refused_naming_the_served_ones_by_number(plane):
    with pytest.raises(ModelNotFound) as info:
        plane.served_version("tiny", "7")
    assert info.value.message == (
        "model 'tiny' version '7' is not served (serving versions 2, 9, 10)"
    )
    assert (info.value.http_status, info.value.code) == (404, "model_not_found")


def test_an_unknown_model_is_refused_and_its_name_cut_short(plane):
    with pytest.raises(ModelNotFound) as info:
        plane.routing("nope")
    assert info.value.message == "model 'nope' is not served (GET /v1/models lists them)"
    with pytest.raises(ModelNotFound) as info:
        plane.served_version("x" * 1000, "1")
    assert "... (1000 chars)" in info.value.message and "x" * 65 not in info.value.message


def test_no_model_named_means_the_default_model(plane):
    assert plane.default_model == "alpha"  # the first by name
    assert plane.served_version(None).spec.name == "alpha"
    assert plane.routing(None) is plane.routing("alpha")
    with pytest.raises(ModelNotFound, match=r"model 'alpha' version '2' is not served"):
        plane.served_version(None, "2")
