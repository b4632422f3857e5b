"""The Triton backend's shared memory and one batch's request on their own, against a fake
of tritonclient's asyncio client: regions handed out one per batch in flight, registered
with Triton where it does not hold them (all again after it restarted), taken back at close;
a batch's input and logits laid out in one region; the retry policy's last word on an
unavailable Triton."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from service.backends.triton import inference
from service.backends.triton.channels import admin_headers
from service.backends.triton.inference import Inference
from service.backends.triton.shared_memory import SharedMemoryPool, shared_memory_bytes
from service.errors import BackendUnavailable
from service.model.repository import ModelSpec, RepositoryError
from tests.helpers.models import contract

CONTRACT = contract(
    arch="resnet18", channels="L", resize=8, crop=8, mean=(0.5,), std=(0.5,), num_classes=3
)
SPEC = ModelSpec(
    "m", "1", CONTRACT, ("a", "b", "c"), 8, Path("none"), "python", mc.ModelConfig(name="m")
)
POD = "127.0.0.1:8001"


@pytest.fixture
def pool():
    made = SharedMemoryPool(2, shared_memory_bytes([SPEC]))
    yield made
    made.destroy()


class FakeTriton:
    """tritonclient's asyncio client, as far as shared memory and inference call it: the
    regions Triton holds, and a batch's logits (each image's sum, its negation, 0)."""

    def __init__(self, pool: SharedMemoryPool | None = None) -> None:
        self.pool = pool
        self.held: dict[str, tuple[str, int]] = {}
        self.registrations = 0
        self.restricted = False
        self.failures: list[str] = []  # status codes of the next infer calls
        self.infers = 0

    def _check_key(self, headers: dict[str, str] | None) -> None:
        if self.restricted and headers != admin_headers("s3cret"):
            raise InferenceServerException(
                "This protocol is restricted, expecting header 'triton-grpc-protocol-...'",
                "StatusCode.UNAVAILABLE",
            )

    async def get_system_shared_memory_status(
        self, headers: dict[str, str] | None, as_json: bool, client_timeout: float
    ) -> dict[str, Any]:
        self._check_key(headers)
        return {"regions": {name: {"name": name} for name in self.held}}

    async def register_system_shared_memory(
        self,
        name: str,
        key: str,
        byte_size: int,
        headers: dict[str, str] | None,
        client_timeout: float,
    ) -> None:
        self._check_key(headers)
        self.registrations += 1
        self.held[name] = (key, byte_size)

    async def unregister_system_shared_memory(
        self, name: str, headers: dict[str, str] | None, client_timeout: float
    ) -> None:
        self._check_key(headers)
        if self.held.pop(name, None) is None:
            raise InferenceServerException(f"no region {name}", "StatusCode.NOT_FOUND")

    async def infer(
        self,
        model_name: str,
        inputs: list[InferInput],
        model_version: str,
        outputs: list[InferRequestedOutput],
        client_timeout: float,
        headers: dict[str, str] | None,
    ) -> None:
        self.infers += 1
        if self.failures:
            raise InferenceServerException("scripted", f"StatusCode.{self.failures.pop(0)}")
        assert self.pool is not None
        inp, out = inputs[0]._get_tensor(), outputs[0]._get_tensor()
        name = inp.parameters["shared_memory_region"].string_param
        (region,) = [r for r in self.pool.regions if r.name == name and name in self.held]
        n = inp.shape[0]
        x = region.view(np.float32, (n, *CONTRACT.input_shape)).reshape(n, -1)
        offset = out.parameters["shared_memory_offset"].int64_param
        logits = region.view(np.float32, (n, 3), offset=offset)
        logits[:] = np.stack([x.sum(1), -x.sum(1), np.zeros(n)], axis=1)


def test_a_region_holds_the_largest_batch_and_its_logits():
    pixels = 1 * 8 * 8 * 4  # FP32
    assert shared_memory_bytes([SPEC]) == 8 * (pixels + 3 * 4)


async def test_regions_are_handed_out_one_per_batch_in_flight(pool):
    first, second = await pool.acquire(), await pool.acquire()
    assert {first.name, second.name} == {r.name for r in pool.regions}
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)  # one turn of the loop: it waits for a region
    assert not waiting.done()
    pool.release(second)
    assert await waiting is second


async def test_regions_are_registered_where_triton_does_not_hold_them(pool):
    triton: Any = FakeTriton()
    await pool.register(triton, POD, None)
    assert set(triton.held) == {r.name for r in pool.regions} and triton.registrations == 2
    assert all(size == pool.byte_size for _, size in triton.held.values())
    await pool.register(triton, POD, None)
    assert triton.registrations == 2  # held already: nothing is sent
    triton.held.clear()  # Triton restarted: it forgets them
    await pool.register(triton, POD, None)
    assert len(triton.held) == 2 and triton.registrations == 4
    await pool.unregister(triton, None)
    assert triton.held == {}
    await pool.unregister(triton, None)  # refused (gone already): close goes on


@pytest.mark.parametrize(("key", "sent"), [(None, "none"), ("wrong", "a key Triton does not")])
async def test_a_triton_restricting_shared_memory_to_a_key_is_named(pool, key, sent):
    triton: Any = FakeTriton()
    triton.restricted = True
    with pytest.raises(RepositoryError) as info:
        await pool.register(triton, POD, admin_headers(key))
    message = str(info.value)
    assert f"Triton at {POD} restricts its shared-memory protocol to a key" in message
    assert f"the gateway sent {sent}" in message and "RESNET_SERVE_TRITON_ADMIN_KEY" in message
    await pool.register(triton, POD, admin_headers("s3cret"))
    assert len(triton.held) == 2


@pytest.fixture
def connect(monkeypatch):
    """Inference's channel made on the fake: ``connect(triton)``."""

    def on(triton: FakeTriton) -> None:
        monkeypatch.setattr(inference, "InferenceServerClient", lambda url, channel_args: triton)

    return on


def batches(unavailable: list[int], retries: int = 2) -> Inference:
    return Inference(
        POD, [], max_retries=retries, backoff_s=0.0, unavailable=lambda: unavailable.append(1)
    )


async def test_a_batch_goes_through_a_region_and_the_region_goes_back(pool, connect):
    triton: Any = FakeTriton(pool)
    connect(triton)
    await pool.register(triton, POD, None)
    batch = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    logits = await batches([]).logits(SPEC, batch, 5, pool)
    sums = batch.reshape(2, -1).sum(1)
    want = np.stack([sums, -sums, [0, 0]], axis=1)
    np.testing.assert_allclose(logits, want)
    regions = [await pool.acquire(), await pool.acquire()]  # both free again
    for region in regions:
        region.view(np.uint8, (pool.byte_size,))[:] = 0xFF  # the regions' next batches
        pool.release(region)
    np.testing.assert_allclose(logits, want)  # copied out of the region


async def test_an_unavailable_triton_after_every_retry_makes_the_backend_fail_fast(pool, connect):
    triton: Any = FakeTriton(pool)
    connect(triton)
    unavailable: list[int] = []
    await pool.register(triton, POD, None)
    triton.failures = ["UNAVAILABLE"] * 2
    batch = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(BackendUnavailable, match="unavailable; retry later"):
        await batches(unavailable, retries=1).logits(SPEC, batch, 5, pool)
    assert triton.infers == 2 and unavailable == [1]
    assert len([await pool.acquire(), await pool.acquire()]) == 2  # the region came back
