"""TritonBackend's failure policy: retries only transient codes, bounded, within the deadline.

A real Triton cannot be made to fail on cue, so this serves Triton's own gRPC protocol
(tritonclient's service definitions) from a scripted server on a real socket: it answers
ModelInfer with the status codes a test lines up, then with real logits.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from service.backends.triton.backend import TritonBackend
from service.errors import BackendUnavailable, DeadlineExceeded, Overloaded
from service.model.repository import RepositoryError
from tests.helpers.triton import SPEC, started

BATCH = np.ones((2, 1, 8, 8), np.float32)


async def test_transient_failures_are_retried(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=2)
    servicer.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    logits = await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 3
    np.testing.assert_allclose(logits[:, 0], [64, 64])
    await backend.close()


async def test_retries_are_bounded(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=1)
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 5
    with pytest.raises(BackendUnavailable):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 2
    assert not backend.is_ready()  # the next requests fail fast until health says otherwise
    await backend.close()


async def test_exhausted_is_overloaded(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=0)
    servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with pytest.raises(Overloaded):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    await backend.close()


async def test_other_errors_are_not_retried(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=3)
    servicer.failures = [grpc.StatusCode.INTERNAL]
    with pytest.raises(BackendUnavailable, match="INTERNAL"):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 1
    await backend.close()


async def test_deadline_is_the_rpc_deadline(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=3)
    servicer.hold.clear()  # the answer comes only when the test says so
    with pytest.raises(DeadlineExceeded):
        await backend.infer(SPEC, BATCH, timeout_s=0.2)
    # At the deadline: not when the answer comes (it has not, yet), and not after a retry,
    # which would have been a second call, waiting for another deadline.
    assert servicer.calls == 1 and not servicer.hold.is_set()
    servicer.hold.set()
    await backend.close()


async def test_metadata_disagreement_refused(scripted):
    servicer, url = scripted
    servicer.input_shape = [-1, 3, 8, 8]
    backend = TritonBackend(url)
    with pytest.raises(
        RepositoryError,
        match=r"Triton inputs \['input' FP32 \[-1, 3, 8, 8\]\] != preprocess.json "
        r"\['input' FP32 \[-1, 1, 8, 8\]\]",
    ):
        await backend.start([SPEC])
    await backend.close()


async def test_unreachable_at_start_is_not_ready_and_fails_fast(scripted):
    """Triton not up yet: the gateway starts not-ready and answers 503 at once (recovery: see
    tests/e2e/test_triton.py, which kills and restarts a real Triton)."""
    from service.host.processes import free_port

    backend = TritonBackend(f"127.0.0.1:{free_port()}", health_interval_s=0.1)
    await backend.start([SPEC])
    assert not backend.is_ready()
    with pytest.raises(BackendUnavailable):
        await backend.infer(SPEC, BATCH, timeout_s=1)
    await backend.close()
