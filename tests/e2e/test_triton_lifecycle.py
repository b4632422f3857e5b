"""TritonBackend's model lifecycle against a real Triton (the CPU tritonserver from
nvidia-pytriton) in explicit model control mode: a new version served beside the one
serving (which answers throughout), then the old one released; a version that cannot load
refused with Triton's reason while the others keep answering; a Triton that lost a version
asked for it again; a Triton that restricts repository control to a key (as the Helm chart
runs it), which loads only for a backend holding the key; and a Triton in mode none, which
takes no load requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from service.backends.triton.backend import TritonBackend
from service.errors import BackendUnavailable
from service.host.processes import wait_until
from service.model.repository import MODEL_FILENAME, ModelSpec, RepositoryError, load_spec
from tests.helpers.triton import registered, start_real_triton

pytestmark = pytest.mark.triton
BATCH = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    """The tiny model as flavor python-ort, alone in a repository this module publishes
    versions into."""
    from export.repository import republish

    repo = tmp_path_factory.mktemp("lifecycle") / "repo"
    republish(tiny.model_dir, repo, "python-ort")
    return repo / "tiny"


@pytest.fixture(scope="module")
def explicit(model_dir, tmp_path_factory):
    server = start_real_triton(
        model_dir.parent, tmp_path_factory.mktemp("tlog") / "triton.log", control="explicit"
    )
    yield server
    server.stop()


def publish_next(model_dir: Path, shift: float = 0.0) -> ModelSpec:
    """Publish the newest version again as the next one, its logits shifted by ``shift``
    (added to the classifier's bias) so that answers tell the versions apart."""
    import onnx
    from onnx import numpy_helper

    from export.repository import republish

    version = republish(model_dir, model_dir.parent, "python-ort")
    if shift:
        path = model_dir / str(version) / MODEL_FILENAME
        model = onnx.load(str(path))
        bias = next(n for n in model.graph.node if n.op_type == "Gemm").input[2]
        init = next(i for i in model.graph.initializer if i.name == bias)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + shift, bias))
        path.unlink()  # publishing hard-links files between versions: never write through
        onnx.save(model, str(path))
    return load_spec(model_dir, version)


def expected(spec: ModelSpec) -> np.ndarray:
    """What this version's graph answers, computed by ONNX Runtime here."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(spec.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {spec.contract.input_name: BATCH})[0]


async def answers(backend: TritonBackend, spec: ModelSpec, want: np.ndarray | None = None) -> None:
    """The backend answers this version's logits (``want``: computed already)."""
    logits = await backend.infer(spec, BATCH, timeout_s=30)
    np.testing.assert_allclose(
        logits, expected(spec) if want is None else want, rtol=1e-5, atol=1e-5
    )


@contextlib.asynccontextmanager
async def backend_on(
    triton, *specs: ModelSpec, admin_key: str | None = None
) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(triton.grpc_url, health_interval_s=0.1, admin_key=admin_key)
    try:
        await backend.start(list(specs))
        assert backend.is_ready()
        yield backend
    finally:
        await backend.close()


def version_states(triton, name: str) -> dict[str, str]:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    index = client.get_model_repository_index(as_json=True).get("models", [])
    client.close()
    return {m["version"]: m.get("state", "") for m in index if m["name"] == name}


def is_ready(triton, name: str, version: str) -> bool:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    ready = client.is_model_ready(name, version)
    client.close()
    return bool(ready)


def executions(triton, spec: ModelSpec) -> dict[int, int]:
    """Triton's count of executions per batch size of one version (its statistics)."""
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    stats = client.get_inference_statistics(spec.name, spec.version, as_json=True)
    client.close()
    return {
        int(b["batch_size"]): int(b["compute_infer"]["count"])
        for s in stats.get("model_stats", [])
        for b in s.get("batch_stats", [])
    }


def added(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}


def executions_reach(triton, spec: ModelSpec, want: Callable[[dict[int, int]], bool]) -> None:
    """Triton counts an execution once its response is on its way: the last one may land a
    moment after the client has it."""
    wait_until(lambda: want(executions(triton, spec)), 10, f"executions {executions(triton, spec)}")


async def test_the_warm_up_times_every_batch_size_through_triton(explicit, model_dir):
    """Triton warms every batch size up to max_batch_size as it loads a version
    (config.pbtxt's model_warmup: one execution of each, in its statistics). Then at start
    the backend times, through Triton, each size of its warm-up (powers of two up to the
    largest, and the largest; twice each: Backend.warm_up): exactly those executions more,
    and the batcher's cost model starts from their timings. A version loaded beside a
    serving one (a reload) is warmed by Triton alike and timed at sizes 1 and 2."""
    old = load_spec(model_dir)
    every = dict.fromkeys(range(1, old.max_batch_size + 1), 1)
    sizes = [1, 2, 4, 8]
    assert old.max_batch_size == 8
    before = executions(explicit, old)
    assert before == every  # the module's Triton has just started: its warm-up alone
    async with backend_on(explicit, old) as backend:
        executions_reach(explicit, old, lambda e: added(before, e) == dict.fromkeys(sizes, 2))
        costs = backend.warm_costs(old)
        assert sorted(costs) == sizes and all(t > 0 for t in costs.values())

        new = publish_next(model_dir)
        await backend.load(new)
        executions_reach(explicit, new, lambda e: e == {**every, 1: 3, 2: 3})
        assert sorted(backend.warm_costs(new)) == [1, 2]
        await backend.unload(new)  # the module's next tests start from the old one alone


async def test_a_new_version_serves_beside_the_old_then_the_old_is_released(explicit, model_dir):
    old = load_spec(model_dir)
    async with backend_on(explicit, old) as backend:
        new = publish_next(model_dir, shift=1.0)
        want = expected(old)
        assert not np.allclose(expected(new), want)  # the answers tell them apart

        # The old version answers all the while Triton loads the new one beside it.
        served, done = [], asyncio.Event()

        async def keep_asking() -> None:
            while not done.is_set():
                await answers(backend, old, want)
                served.append(1)

        asking = asyncio.create_task(keep_asking())
        try:
            await backend.load(new)
        finally:
            done.set()
            await asking  # raises if one request failed
        assert served

        await answers(backend, old)
        await answers(backend, new)
        assert is_ready(explicit, "tiny", old.version) and is_ready(explicit, "tiny", new.version)

        await backend.unload(old)
        assert not is_ready(explicit, "tiny", old.version)
        assert version_states(explicit, "tiny")[old.version] != "READY"
        with pytest.raises(BackendUnavailable, match="not loaded"):
            await backend.infer(old, BATCH, timeout_s=30)
        await answers(backend, new)
        assert backend.is_ready()


async def test_a_version_that_cannot_load_is_refused_and_the_others_keep_serving(
    explicit, model_dir
):
    serving = load_spec(model_dir)
    async with backend_on(explicit, serving) as backend:
        broken = publish_next(model_dir)
        try:
            data = broken.model_path.read_bytes()
            broken.model_path.unlink()
            broken.model_path.write_bytes(data[:16])
            with pytest.raises(RepositoryError) as info:
                await backend.load(broken)
            message = str(info.value)
            assert "\n" not in message, message  # Triton's reason ends with a traceback
            assert f"version {broken.version}" in message and "model.onnx failed" in message
            assert version_states(explicit, "tiny")[broken.version] == "UNAVAILABLE"
            await answers(backend, serving)
            with pytest.raises(BackendUnavailable, match="not loaded"):
                await backend.infer(broken, BATCH, timeout_s=30)
            # Triton's own (strict) readiness is false from now on, until that version loads;
            # the gateway's follows the versions it serves.
            await backend._check()  # the health loop's check, run now (it raises if not ready)
            assert backend.is_ready()
        finally:
            shutil.rmtree(broken.model_path.parent)


async def test_a_version_triton_lost_is_asked_for_again(explicit, model_dir):
    """A restarted Triton loads what config.pbtxt names, not what the gateway loaded since:
    the health loop asks for the versions served again."""
    spec = load_spec(model_dir)
    async with backend_on(explicit, spec) as backend:
        client = triton_grpc.InferenceServerClient(explicit.grpc_url)
        client.unload_model("tiny")
        client.close()
        assert not is_ready(explicit, "tiny", spec.version)  # only the gateway can bring it back
        await asyncio.to_thread(
            wait_until,
            lambda: backend.is_ready() and is_ready(explicit, "tiny", spec.version),
            60,
            "the version did not return",
        )
        await answers(backend, spec)


async def test_a_triton_restricting_repository_control_loads_only_with_its_key(tiny, tmp_path):
    """The Helm chart restricts Triton's repository control to an admin key (and gives it
    to the gateway): without it, or with another, a load is refused with one line that says
    so, and the versions serving keep answering; with it, the version loads."""
    from export.repository import republish

    republish(tiny.model_dir, tmp_path / "repo", "python-ort")
    model_dir = tmp_path / "repo" / "tiny"
    triton = start_real_triton(
        model_dir.parent,
        tmp_path / "triton.log",
        extra_args=("--grpc-restricted-protocol=model-repository:triton-admin-key=s3cret",),
        control="explicit",
    )
    try:
        serving = load_spec(model_dir)
        new = publish_next(model_dir, shift=1.0)
        for key, sent in ((None, "sent none"), ("wrong", "a key Triton does not accept")):
            async with backend_on(triton, serving, admin_key=key) as backend:
                with pytest.raises(RepositoryError) as info:
                    await backend.load(new)
                message = str(info.value)
                assert "\n" not in message, message
                assert "admin key" in message and sent in message, message
                assert "RESNET_SERVE_TRITON_ADMIN_KEY" in message, message
                assert not is_ready(triton, "tiny", new.version)
                await answers(backend, serving)
        async with backend_on(triton, serving, admin_key="s3cret") as backend:
            await backend.load(new)
            assert is_ready(triton, "tiny", new.version)
            await answers(backend, new)
            await answers(backend, serving)
    finally:
        triton.stop()


async def test_a_triton_in_mode_none_takes_no_load_request(tiny, tmp_path):
    from export.repository import republish

    republish(tiny.model_dir, tmp_path / "repo", "python-ort")
    model_dir = tmp_path / "repo" / "tiny"
    triton = start_real_triton(model_dir.parent, tmp_path / "triton.log")  # mode none
    try:
        serving = load_spec(model_dir)
        async with backend_on(triton, serving) as backend:
            with pytest.raises(RepositoryError, match="--model-control-mode=explicit"):
                await backend.load(publish_next(model_dir))
            await answers(backend, serving)
    finally:
        triton.stop()


async def test_a_new_version_reaches_every_triton_before_it_takes_traffic(model_dir, tmp_path):
    """Two real Tritons behind one gRPC target (an ipv4: address list; the chart's
    dns:///<headless Service> resolves to every pod the same way): a load is sent to each,
    and returns (the gateway switches when it does) only once both serve the new version;
    calls, balanced over both, are then all answered by it; a Triton that lost it (one
    restarted) is asked for it again; an unload releases it on both."""
    from service.backends.triton.model_control import endpoints

    first = start_real_triton(model_dir.parent, tmp_path / "a.log", control="explicit")
    second = start_real_triton(model_dir.parent, tmp_path / "b.log", control="explicit")
    both = (first, second)
    target = f"ipv4:{first.grpc_url},{second.grpc_url}"
    assert endpoints(target) == sorted(t.grpc_url for t in both)
    try:
        old = load_spec(model_dir)
        backend = TritonBackend(target, health_interval_s=0.1)
        await backend.start([old])
        try:
            assert backend.is_ready()
            new = publish_next(model_dir, shift=1.0)
            await backend.load(new)
            assert all(is_ready(t, "tiny", new.version) for t in both)
            want = expected(new)
            for _ in range(6):  # round-robin: each Triton answers some
                await answers(backend, new, want)
            # One Triton loses the version (as a restarted pod would: it loads what
            # config.pbtxt says): the health loop asks that one for it again.
            client = triton_grpc.InferenceServerClient(second.grpc_url)
            client.unload_model("tiny")
            client.close()
            await asyncio.to_thread(
                wait_until,
                lambda: is_ready(second, "tiny", new.version) and backend.is_ready(),
                60,
                "the health loop did not ask the second Triton for the version again",
            )
            await backend.unload(new)
            assert not any(is_ready(t, "tiny", new.version) for t in both)
            await answers(backend, old)
        finally:
            await backend.close()
    finally:
        for t in both:
            t.stop()


def test_the_tritons_behind_a_target():
    """dns:/// resolves to every address (a headless Service: each pod), an address list
    is each of its addresses, a plain host:port is the one Triton it names."""
    from service.backends.triton.model_control import endpoints

    assert endpoints("triton:8001") == ["triton:8001"]
    assert endpoints("ipv4:10.0.0.2:8001,10.0.0.1:8001") == ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert endpoints("dns:///127.0.0.1:8001") == ["127.0.0.1:8001"]
    assert endpoints("dns://8.8.8.8/127.0.0.1:8001") == ["127.0.0.1:8001"]  # an authority
    local = endpoints("dns:///localhost:8001")
    assert local and all(e.endswith(":8001") for e in local)
    assert set(local) <= {"127.0.0.1:8001", "[::1]:8001"}


async def test_batches_through_shared_memory_survive_a_triton_restart(model_dir, tmp_path):
    """The shared-memory transport against a real Triton on this host: a region per batch
    in flight, registered at start; batches answered through them (what ONNX Runtime
    answers here); registered again when Triton restarts (it forgets them); unregistered
    and removed at close."""
    triton = start_real_triton(model_dir.parent, tmp_path / "a.log", control="explicit")
    ports = (triton.http_port, triton.grpc_port, triton.metrics_port)
    spec = load_spec(model_dir)
    backend = TritonBackend(triton.grpc_url, health_interval_s=0.1, shared_memory=True)
    try:
        await backend.start([spec])
        assert backend._shm is not None
        names = {r.name for r in backend._shm.regions}
        assert len(names) == backend.max_inflight_batches
        assert registered(triton) == names
        used = []
        acquire = backend._shm.acquire

        async def counted():
            used.append(1)
            return await acquire()

        backend._shm.acquire = counted  # type: ignore[method-assign]
        want = expected(spec)
        await answers(backend, spec, want)
        assert used, "the batch did not go through shared memory"

        triton.stop()
        triton = start_real_triton(model_dir.parent, tmp_path / "b.log", ports, control="explicit")
        await asyncio.to_thread(
            wait_until,
            lambda: registered(triton) == names and backend.is_ready(),
            60,
            "the regions were not registered again after Triton restarted",
        )
        # Recovered by itself, as callers see it: a 503 (BackendUnavailable) until then.
        deadline = time.monotonic() + 30
        while True:
            try:
                await answers(backend, spec, want)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "no answer after Triton restarted"
                await asyncio.sleep(0.2)
    finally:
        await backend.close()
    try:
        assert registered(triton) == set()
        assert not [p for p in Path("/dev/shm").iterdir() if p.name in names]
    finally:
        triton.stop()


async def test_shared_memory_restricted_to_a_key_is_refused_without_it(model_dir, tmp_path):
    """With Triton's shared-memory protocol restricted to a key (as the chart runs it), a
    backend without the key is refused at start in one line; with it, it registers."""
    triton = start_real_triton(
        model_dir.parent,
        tmp_path / "t.log",
        extra_args=("--grpc-restricted-protocol=shared-memory:triton-admin-key=s3cret",),
    )
    spec = load_spec(model_dir)
    try:
        refused = TritonBackend(triton.grpc_url, shared_memory=True)
        with pytest.raises(RepositoryError) as info:
            await refused.start([spec])
        await refused.close()
        message = str(info.value)
        assert "\n" not in message
        assert "restricts its shared-memory protocol to a key, and the gateway sent none" in message
        async with contextlib.AsyncExitStack() as stack:
            backend = TritonBackend(triton.grpc_url, shared_memory=True, admin_key="s3cret")
            stack.push_async_callback(backend.close)
            await backend.start([spec])
            assert backend._shm is not None
            assert registered(triton, "s3cret") == {r.name for r in backend._shm.regions}
            await answers(backend, spec)
    finally:
        triton.stop()


def test_regions_that_do_not_fit_in_dev_shm_are_refused_before_any_is_made():
    """Pages of /dev/shm are allocated as they are written: regions larger than its free
    space would end in SIGBUS mid-batch, so the pool refuses them, in one line, up front."""
    from service.backends.triton.shared_memory import SharedMemoryPool

    before = set(os.listdir("/dev/shm"))
    fs = os.statvfs("/dev/shm")
    too_big = fs.f_bavail * fs.f_frsize // 2 + 1  # four of them cannot fit
    with pytest.raises(RepositoryError) as info:
        SharedMemoryPool(4, too_big)
    message = str(info.value)
    assert "\n" not in message and f"4 regions of {too_big} bytes" in message
    assert "/dev/shm has" in message and "triton.sidecar.maxBatchSize" in message
    assert set(os.listdir("/dev/shm")) == before
    pool = SharedMemoryPool(4, 4096)  # what fits is made
    try:
        assert len(set(os.listdir("/dev/shm")) - before) == 4
    finally:
        pool.destroy()


def test_a_region_that_cannot_be_made_is_refused_in_one_line_and_none_is_left(monkeypatch):
    """/dev/shm not writable by the gateway's uid (a volume mounted there root-owned, as
    podman's emptyDir is): one line naming the reason, and the regions already made are
    removed. The third region fails as tritonclient fails it, with the OSError inside."""
    from tritonclient.utils import shared_memory as shm

    from service.backends.triton.shared_memory import SharedMemoryPool

    real, made = shm.create_shared_memory_region, []

    def third_denied(name, key, byte_size, create_only=False):
        if len(made) == 2:
            try:
                raise PermissionError(13, "Permission denied", key)
            except PermissionError as exc:
                raise shm.SharedMemoryException(
                    "unable to create the shared memory region"
                ) from exc
        made.append(name)
        return real(name, key, byte_size, create_only=create_only)

    monkeypatch.setattr(shm, "create_shared_memory_region", third_denied)
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(RepositoryError) as info:
        SharedMemoryPool(4, 4096)
    message = str(info.value)
    assert "\n" not in message and "(Permission denied)" in message, message
    assert "must be writable by uid" in message and "TRITON_SHARED_MEMORY=false" in message
    assert len(made) == 2 and set(os.listdir("/dev/shm")) == before
