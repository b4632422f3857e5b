"""The Triton backend's model control on its own: the versions served, fanned out to every
Triton behind the target, against in-memory Tritons (a fake of tritonclient's asyncio
client, one per address): each load names the complete set of versions, a version counts
as served only once every Triton serves it and matches its contract, a refusal restores
what was served, and a Triton that lost a version is asked for it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from service.backends.triton import model_control
from service.backends.triton.channels import channel_args
from service.backends.triton.model_control import NOT_EXPLICIT, ModelControl
from service.model.repository import ModelSpec, RepositoryError
from tests.helpers.models import contract

CONTRACT = contract(
    arch="resnet18", channels="L", resize=8, crop=8, mean=(0.5,), std=(0.5,), num_classes=3
)
A, B = "10.0.0.1:8001", "10.0.0.2:8001"
TARGET = f"ipv4:{B},{A}"


def spec(version: str) -> ModelSpec:
    config = mc.ModelConfig(name="m", max_batch_size=8)
    return ModelSpec("m", version, CONTRACT, ("a", "b", "c"), 8, Path("none"), "python", config)


class FakeTriton:
    """One Triton in explicit model control mode: the versions it serves, the load
    requests it took, and a refusal lined up for the next one."""

    def __init__(self) -> None:
        self.served: set[str] = set()
        self.requests: list[list[int]] = []  # each load's versions ([]: an unload)
        self.refusal: str | None = None
        self.input_shape = ["-1", "1", "8", "8"]
        self.channel_args: list[tuple[str, Any]] = []
        self.closed = False


class FakeClient:
    """tritonclient.grpc.aio.InferenceServerClient, as far as model control calls it."""

    def __init__(self, triton: FakeTriton) -> None:
        self.triton = triton

    async def is_server_live(self, client_timeout: float) -> bool:
        return True

    async def is_model_ready(self, name: str, version: str, client_timeout: float) -> bool:
        return version in self.triton.served

    async def load_model(self, name: str, headers: Any, config: str, client_timeout: float) -> None:
        versions = [int(v) for v in json.loads(config)["version_policy"]["specific"]["versions"]]
        self._request(versions)

    async def unload_model(self, name: str, headers: Any, client_timeout: float) -> None:
        self._request([])

    def _request(self, versions: list[int]) -> None:
        self.triton.requests.append(versions)
        if self.triton.refusal is not None:
            refusal, self.triton.refusal = self.triton.refusal, None
            raise InferenceServerException(refusal, "StatusCode.INVALID_ARGUMENT")
        self.triton.served = {str(v) for v in versions}

    async def get_model_metadata(
        self, name: str, version: str, as_json: bool, client_timeout: float
    ) -> dict[str, Any]:
        return {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": self.triton.input_shape}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": ["-1", "3"]}],
        }

    async def get_model_config(
        self, name: str, version: str, as_json: bool, client_timeout: float
    ) -> dict[str, Any]:
        return {"config": {"max_batch_size": 8}}

    async def close(self) -> None:
        self.triton.closed = True


@pytest.fixture
def tritons(monkeypatch) -> dict[str, FakeTriton]:
    """The two Tritons behind TARGET, each serving version 1 (as config.pbtxt loads it)."""
    fakes = {A: FakeTriton(), B: FakeTriton()}
    for fake in fakes.values():
        fake.served = {"1"}

    def connect(url: str, channel_args: list[tuple[str, Any]]) -> FakeClient:
        fakes[url].channel_args = channel_args
        return FakeClient(fakes[url])

    monkeypatch.setattr(model_control, "InferenceServerClient", connect)
    return fakes


class Lost:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def control(lost: Lost | None = None) -> ModelControl:
    made = ModelControl(
        TARGET, channel_args(1024), load_timeout_s=5, headers=None, lost=lost or Lost()
    )
    made.adopt([spec("1")])
    return made


async def test_a_version_counts_as_served_once_every_triton_serves_it(tritons):
    ctl = control()
    prepared: list[dict[str, set[str]]] = []

    async def prepare() -> None:  # the backend's warm-up: every Triton serves it by then
        prepared.append({url: set(t.served) for url, t in tritons.items()})
        assert not ctl.serves(spec("2"))

    await ctl.load(spec("2"), prepare)
    assert ctl.serves(spec("2")) and ctl.serves(spec("1"))
    assert ctl.pods == [A, B]
    assert prepared == [{A: {"1", "2"}, B: {"1", "2"}}]
    for triton in tritons.values():
        assert triton.requests == [[1, 2]]  # the complete set, in one request
        # Each Triton has a channel of its own: not balanced over the others.
        assert "grpc.lb_policy_name" not in dict(triton.channel_args)
    await ctl.load(spec("2"), prepare)  # served already: nothing is asked
    assert len(prepared) == 1 and tritons[A].requests == [[1, 2]]
    await ctl.close()
    assert all(t.closed for t in tritons.values())


async def test_a_version_one_triton_refuses_leaves_every_triton_serving_the_others(tritons):
    tritons[B].refusal = "failed to load 'm' version 2: model.onnx failed\nTraceback ..."
    ctl = control()
    with pytest.raises(RepositoryError) as info:
        await ctl.load(spec("2"), _never)
    message = str(info.value)
    assert "\n" not in message and f"Triton at {B}: failed to load" in message, message
    assert not ctl.serves(spec("2"))
    # Version 1 kept answering on both (a reload that fails leaves the versions served);
    # the first Triton keeps version 2 loaded, unused, until the next load request.
    assert tritons[A].requests == [[1, 2]] and "1" in tritons[A].served
    assert tritons[B].requests == [[1, 2]] and tritons[B].served == {"1"}


async def test_a_version_that_fails_its_preparation_is_undone_everywhere(tritons):
    ctl = control()

    async def prepare() -> None:
        raise RepositoryError("warm-up failed")

    with pytest.raises(RepositoryError, match="warm-up failed"):
        await ctl.load(spec("2"), prepare)
    assert not ctl.serves(spec("2"))
    assert all(t.requests == [[1, 2], [1]] and t.served == {"1"} for t in tritons.values())


async def test_a_triton_serving_something_else_than_the_contract_is_refused(tritons):
    tritons[B].input_shape = ["-1", "3", "8", "8"]
    ctl = control()
    with pytest.raises(RepositoryError, match=f"Triton at {B} serves something else"):
        await ctl.load(spec("2"), _never)
    assert not ctl.serves(spec("2")) and tritons[B].served == {"1"}


@pytest.mark.parametrize(
    ("refusal", "says"),
    [
        (NOT_EXPLICIT, "takes no load requests: start tritonserver with --model-control-mode"),
        (
            "This protocol is restricted, expecting header 'triton-grpc-protocol-...'",
            "needs its admin key, and the gateway sent none (RESNET_SERVE_TRITON_ADMIN_KEY)",
        ),
    ],
)
async def test_a_triton_that_takes_no_load_request_is_named_with_the_fix(tritons, refusal, says):
    tritons[A].refusal = refusal
    with pytest.raises(RepositoryError, match=r"Triton at 10\.0\.0\.1:8001") as info:
        await control().load(spec("2"), _never)
    assert says in str(info.value)


async def test_an_unload_leaves_every_triton_serving_the_versions_left(tritons):
    ctl = control()
    await ctl.load(spec("2"), _nothing)
    await ctl.unload(spec("1"))
    assert not ctl.serves(spec("1"))
    assert all(t.served == {"2"} for t in tritons.values())
    await ctl.unload(spec("2"))  # the last one: the model is unloaded
    assert all(t.requests[-1] == [] and not t.served for t in tritons.values())
    await ctl.unload(spec("2"))  # not served any more: nothing is asked
    assert all(len(t.requests) == 3 for t in tritons.values())


async def test_a_triton_that_lost_a_version_is_asked_for_the_versions_served(tritons):
    lost = Lost()
    ctl = control(lost)
    await ctl.load(spec("2"), _nothing)
    await ctl.resolve()
    assert await ctl.serving_everywhere() and lost.calls == 0
    tritons[B].served = {"1"}  # restarted: it loads what config.pbtxt names
    assert await ctl.serving_everywhere()
    assert lost.calls == 1  # the backend fails fast meanwhile
    assert tritons[B].requests[-1] == [1, 2] and tritons[B].served == {"1", "2"}
    assert tritons[A].requests == [[1, 2]]  # the other one is left alone


async def _nothing() -> None:
    return None


async def _never() -> None:
    pytest.fail("prepared a version that not every Triton serves")
