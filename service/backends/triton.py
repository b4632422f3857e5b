"""The production backend: NVIDIA Triton over gRPC (tritonclient's asyncio client).

One long-lived channel; binary tensors; the request's remaining deadline becomes the RPC
deadline. Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried a bounded number
of times with jittered exponential backoff, and never past the deadline. Triton's own
dynamic batcher batches across gateway replicas; the gateway still coalesces what it sees
and keeps a few batches in flight per model.

Versions are served side by side: everything is per (model, version), and each request
names its version. Readiness follows Triton: a health loop asks Triton (is it live, is every
version served ready) once a second. While Triton is down requests fail at once with 503 (no
hang), and when it is back the gateway recovers by itself. Each version's metadata from
Triton must agree with its contract (tensor names, shapes, datatype, classes), or the
version is refused.

Which versions Triton serves is the gateway's decision (Triton's explicit model control,
``tritonserver --model-control-mode=explicit``): :meth:`TritonBackend.load` reloads the model
with its config.pbtxt and a ``specific`` version policy naming the versions served plus the
new one, :meth:`TritonBackend.unload` with the versions left. Measured with Triton 2.51: the
versions already served keep answering while Triton reloads (it starts every version of the
new set afresh, then swaps), and a reload that fails leaves them served. A Triton that lost
versions (a restarted one loads what config.pbtxt says) is asked for the served set again by
the health loop. In model control mode none Triton refuses load requests: ``load`` says so.

Model control fans out to every Triton behind the target (:func:`endpoints`: every pod of a
headless Service), each on a channel of its own; a version is loaded once every one of them
serves it, and the health loop keeps each one serving the versions served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from service import tracing
from service.backends.base import Backend
from service.errors import BackendUnavailable, DeadlineExceeded, InternalError, Overloaded, brief
from service.repository import ModelSpec, RepositoryError, TensorSig, tensor_problems

log = logging.getLogger(__name__)

TRANSIENT = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
#: The header Triton reads the key of a restricted gRPC protocol from (key name
#: "triton-admin-key", as the Helm chart restricts repository control).
ADMIN_HEADER = "triton-grpc-protocol-triton-admin-key"
#: What Triton answers a load or unload request in model control mode none (or poll).
NOT_EXPLICIT = "explicit model load / unload is not allowed"
_MB = 1024 * 1024
Key = tuple[str, str]  # (model, version)


def _key(spec: ModelSpec) -> Key:
    return spec.name, spec.version


def _reason(exc: InferenceServerException) -> str:
    """Triton's message in one line (a failed python-backend load appends a traceback)."""
    return brief(exc, limit=500)


def _code(exc: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE' (empty if the client raised it itself)."""
    return str(exc.status() or "").rsplit(".", 1)[-1]


def endpoints(url: str) -> list[str]:
    """The Triton servers behind the gateway's gRPC target, each as ``host:port``: every
    address ``dns:///name:port`` resolves to (a headless Service: every Triton pod), each
    address of an ``ipv4:``/``ipv6:`` list, or the one server a plain ``host:port`` names.
    Model control goes to each of them; inference is balanced over them by gRPC."""
    for scheme in ("ipv4:", "ipv6:"):
        if url.startswith(scheme):
            return sorted(set(url.removeprefix(scheme).split(",")))
    if not url.startswith("dns:"):
        return [url]
    target = url.removeprefix("dns:").lstrip("/").split("/")[-1]  # dns://[authority]/host:port
    host, _, port = target.rpartition(":")
    infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    addresses = {str(info[4][0]) for info in infos}
    return sorted(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)


def _input(name: str, batch: np.ndarray, datatype: str) -> InferInput:
    inp = InferInput(name, list(batch.shape), datatype)
    inp.set_data_from_numpy(batch)
    return inp


def metadata_problems(spec: ModelSpec, meta: dict[str, Any], max_batch: int) -> list[str]:
    """How Triton's model metadata disagrees with the model's contract."""

    def sigs(tensors: list[dict[str, Any]]) -> list[TensorSig]:
        return [
            TensorSig(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in tensors
        ]

    problems = ["Triton's config has max_batch_size 0 (no batch axis)"] if max_batch < 1 else []
    return problems + tensor_problems(
        spec.contract, sigs(meta.get("inputs", [])), sigs(meta.get("outputs", [])), "Triton"
    )


class Region:
    """One system shared memory region: a batch's input, then its logits."""

    def __init__(self, name: str, key: str, byte_size: int) -> None:
        from tritonclient.utils import shared_memory as shm

        self.name, self.key, self.byte_size = name, key, byte_size
        self.handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)

    def view(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        buf = self.handle._mpsm_handle.buf  # tritonclient's mapping of the region
        return np.ndarray(shape, dtype, buffer=buf, offset=offset)

    def destroy(self) -> None:
        from tritonclient.utils import shared_memory as shm

        shm.destroy_shared_memory_region(self.handle)


class SharedMemoryPool:
    """System shared memory for batches to and from a Triton on this host (the chart's
    sidecar mode: the gateway in Triton's pod, a memory-backed /dev/shm): one region per
    batch in flight, each sized for the largest batch of any model served, registered with
    Triton at start and again whenever Triton lost them (it restarted), unregistered and
    removed at close."""

    def __init__(self, count: int, byte_size: int) -> None:
        # A region's pages are allocated as they are written: one that does not fit in
        # /dev/shm (a tmpfs) would kill the gateway with SIGBUS mid-batch, so refuse now.
        fs = os.statvfs("/dev/shm")
        free, needed = fs.f_bavail * fs.f_frsize, count * byte_size
        if needed > free:
            raise RepositoryError(
                f"shared memory: {count} regions of {byte_size} bytes need {needed} bytes and "
                f"/dev/shm has {free} free: give it more (the chart: triton.sidecar.maxBatchSize "
                "and bytesPerImage) or set TRITON_SHARED_MEMORY=false"
            )
        prefix = f"resnet-serving-{os.getpid()}-{id(self):x}"
        self.byte_size = byte_size
        from tritonclient.utils.shared_memory import SharedMemoryException

        self.regions: list[Region] = []
        for i in range(count):
            try:
                self.regions.append(Region(f"{prefix}-{i}", f"/{prefix}-{i}", byte_size))
            except SharedMemoryException as exc:  # its cause (an OSError) says why
                self.destroy()
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                reason = getattr(cause, "strerror", None) or str(cause)
                raise RepositoryError(
                    f"shared memory: cannot create /dev/shm/{prefix}-{i} ({reason}): /dev/shm "
                    f"must be writable by uid {os.getuid()} (the chart's emptyDir is), or set "
                    "TRITON_SHARED_MEMORY=false"
                ) from None
        self._free: asyncio.Queue[Region] = asyncio.Queue()
        for region in self.regions:
            self._free.put_nowait(region)

    async def acquire(self) -> Region:
        return await self._free.get()

    def release(self, region: Region) -> None:
        self._free.put_nowait(region)

    def destroy(self) -> None:
        for region in self.regions:
            region.destroy()


def shared_memory_bytes(specs: list[ModelSpec]) -> int:
    """A region's size: the largest batch of any model, its input and its FP32 logits."""
    per_image = [
        math.prod(s.contract.input_shape) * np.dtype(s.contract.dtype).itemsize
        + 4 * s.contract.num_classes
        for s in specs
    ]
    return max(s.max_batch_size * b for s, b in zip(specs, per_image, strict=True))


class TritonBackend(Backend):
    name = "triton"
    max_inflight_batches = 4
    kernels = "triton"  # whatever Triton's node runs on; its own metrics say

    def __init__(
        self,
        url: str,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.05,
        health_interval_s: float = 1.0,
        max_message_bytes: int = 64 * _MB,
        load_timeout_s: float = 600.0,
        admin_key: str | None = None,
        shared_memory: bool = False,
    ) -> None:
        """``load_timeout_s``: how long a load or unload request may take (Triton starts
        every version of the model's new set, warm-up included). ``admin_key``: the key of
        Triton's restricted ``model-repository`` protocol (``--grpc-restricted-protocol=
        model-repository:triton-admin-key=KEY``), sent with load and unload requests, and
        with the shared-memory ones. ``shared_memory``: batches go through system shared
        memory (:class:`SharedMemoryPool`; Triton on this host, one server)."""
        super().__init__()
        self.url = url
        self.load_timeout_s = load_timeout_s
        self._admin = {ADMIN_HEADER: admin_key} if admin_key else None
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.health_interval_s = health_interval_s
        self._channel_args = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Spread calls over every address the target resolves to: with a headless
            # Service (dns:///triton-headless:8001, as the Helm chart sets it) that is every
            # Triton pod. One long-lived channel behind a ClusterIP would pin each gateway to
            # one Triton. A plain host:port resolves to one address: nothing changes.
            ("grpc.lb_policy_name", "round_robin"),
            # Reconnect quickly once Triton is back.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._client_: InferenceServerClient | None = None
        self.shared_memory = shared_memory
        self._shm: SharedMemoryPool | None = None
        # Model control goes to each Triton behind the target (endpoints): its own channel.
        self._pods: list[str] = []
        self._pod_clients: dict[str, InferenceServerClient] = {}
        # The versions served; per model, those Triton is asked to serve.
        self._specs: dict[Key, ModelSpec] = {}
        self._verified: set[tuple[str, Key]] = set()  # (pod, version) checked on that pod
        # Each model's config.pbtxt as last read: what a load request sends Triton, with the
        # version policy replaced by the versions served.
        self._configs: dict[str, mc.ModelConfig] = {}
        # One load request at a time: each names a model's complete set of versions, read
        # from _specs under this lock.
        self._control = asyncio.Lock()
        self._ready = False
        self._health: asyncio.Task[None] | None = None

    def _served(self, name: str) -> set[str]:
        return {v for n, v in self._specs if n == name}

    async def _verify(self, spec: ModelSpec, pod: str) -> None:
        name, version = _key(spec)
        client = self._pod(pod)
        meta = await client.get_model_metadata(name, version, as_json=True, client_timeout=5)
        cfg = (await client.get_model_config(name, version, as_json=True, client_timeout=5))[
            "config"
        ]
        problems = metadata_problems(spec, meta, int(cfg.get("max_batch_size", 0)))
        if problems:
            raise RepositoryError(
                f"model {name!r} version {version}: Triton at {pod} serves something "
                f"else than its contract describes: " + "; ".join(problems)
            )
        self._verified.add((pod, _key(spec)))
        log.info("triton: %s version %s verified against its contract at %s", name, version, pod)

    async def _warm_up(self, spec: ModelSpec, serving: bool) -> None:
        """Time batches through Triton for the batcher's cost model (``Backend.warm_up``: its
        sizes; Triton's own ``model_warmup`` in config.pbtxt has run every size by now, so
        these time a warm model, the gRPC transfer included, as live batches are)."""
        c = spec.contract

        async def run(batch: np.ndarray) -> object:
            return await self._client.infer(
                spec.name,
                [_input(c.input_name, batch, c.datatype)],
                model_version=spec.version,
                outputs=[InferRequestedOutput(c.output_name)],
                client_timeout=self.load_timeout_s,
            )

        await self.warm_up(spec, run, serving)

    async def _serve(self, name: str, versions: set[str], pods: list[str] | None = None) -> None:
        """Have every Triton (or those of ``pods``) serve exactly ``versions`` of ``name``
        (none: unload the model), one after another; RepositoryError if one takes no load
        requests (or none without the admin key the gateway lacks), else what it raised."""
        for pod in self._pods if pods is None else pods:
            try:
                await self._serve_on(pod, name, versions)
            except InferenceServerException as exc:
                if len(self._pods) < 2:
                    raise
                # Which of the Tritons refused, in the reason the caller reports.
                raise InferenceServerException(
                    f"Triton at {pod}: {exc.message()}", exc.status(), exc.debug_details()
                ) from exc

    async def _serve_on(self, pod: str, name: str, versions: set[str]) -> None:
        client = self._pod(pod)
        try:
            if versions:
                cfg = mc.ModelConfig()
                cfg.CopyFrom(self._configs[name])
                cfg.name = name
                cfg.version_policy.Clear()
                cfg.version_policy.specific.versions.extend(sorted(map(int, versions)))
                # Triton parses the override with protobuf's JSON parser (field names as in
                # config.pbtxt, int64 as strings: both accepted, measured with 2.51).
                await client.load_model(
                    name,
                    headers=self._admin,
                    config=json_format.MessageToJson(cfg, preserving_proto_field_name=True),
                    client_timeout=self.load_timeout_s,
                )
            else:
                await client.unload_model(
                    name, headers=self._admin, client_timeout=self.load_timeout_s
                )
        except InferenceServerException as exc:
            if NOT_EXPLICIT in str(exc):
                raise RepositoryError(
                    f"Triton at {pod} takes no load requests: start tritonserver with "
                    "--model-control-mode=explicit"
                ) from exc
            if "This protocol is restricted" in str(exc):
                # Triton 2.51 answers UNAVAILABLE (no key or another one), naming only its
                # header: say which setting holds the key.
                sent = "a key Triton does not accept" if self._admin else "none"
                raise RepositoryError(
                    f"model {name!r}: Triton at {pod} refused to "
                    f"{'load' if versions else 'unload'} it: its repository control needs "
                    f"its admin key, and the gateway sent {sent} (RESNET_SERVE_TRITON_ADMIN_KEY)"
                ) from exc
            raise

    @property
    def _client(self) -> InferenceServerClient:
        """The channel, opened on first use: on the event loop that serves (grpc.aio
        binds a channel to the loop it was made on)."""
        if self._client_ is None:
            self._client_ = InferenceServerClient(self.url, channel_args=self._channel_args)
        return self._client_

    def _pod(self, pod: str) -> InferenceServerClient:
        """One Triton's own channel (model control and health), opened on first use."""
        client = self._pod_clients.get(pod)
        if client is None:
            args = [a for a in self._channel_args if a[0] != "grpc.lb_policy_name"]
            client = self._pod_clients[pod] = InferenceServerClient(pod, channel_args=args)
        return client

    async def _resolve(self) -> None:
        """The Tritons behind the target now (pods come and go with scaling); the channels
        of those gone are closed."""
        try:
            pods = await asyncio.to_thread(endpoints, self.url)
        except (OSError, ValueError) as exc:
            # No pod ready yet (a headless Service without endpoints does not resolve):
            # not ready until one is.
            pods = []
            if self._pods:
                log.warning("triton: cannot resolve %s (%s)", self.url, exc)
        if pods != self._pods:
            log.info("triton: %s is %s", self.url, ", ".join(pods) or "nobody")
        for gone in set(self._pod_clients) - set(pods):
            await self._pod_clients.pop(gone).close()
        self._pods = pods

    async def _share_memory(self) -> None:
        """Register with Triton each region it does not hold: all of them at start, all
        again after Triton restarted (it forgets them)."""
        pool, pod = self._shm, self._pods[0] if self._pods else None
        if pool is None or pod is None:
            return
        client = self._pod(pod)
        try:
            status = await client.get_system_shared_memory_status(
                headers=self._admin, as_json=True, client_timeout=5
            )
            held = set(status.get("regions", {}))
            missing = [r for r in pool.regions if r.name not in held]
            for region in missing:
                await client.register_system_shared_memory(
                    region.name,
                    region.key,
                    region.byte_size,
                    headers=self._admin,
                    client_timeout=5,
                )
        except InferenceServerException as exc:
            if "This protocol is restricted" in str(exc):
                sent = "a key Triton does not accept" if self._admin else "none"
                raise RepositoryError(
                    f"Triton at {pod} restricts its shared-memory protocol to a key, and the "
                    f"gateway sent {sent} (RESNET_SERVE_TRITON_ADMIN_KEY)"
                ) from exc
            raise
        if missing:
            log.info(
                "triton: %d shared memory regions of %d bytes registered with Triton at %s",
                len(missing),
                pool.byte_size,
                pod,
            )

    async def start(self, specs: list[ModelSpec]) -> None:
        self._specs = {_key(s): s for s in specs}
        self._configs = {s.name: s.config for s in specs}
        if self.shared_memory:
            if self.url.startswith(("dns:", "ipv4:", "ipv6:")) or not specs:
                raise RepositoryError(
                    f"shared memory needs one Triton on this host (host:port), not {self.url}"
                )
            self._shm = SharedMemoryPool(self.max_inflight_batches, shared_memory_bytes(specs))
        try:
            await self._check()
        except InferenceServerException as exc:
            if _code(exc) in (
                "NOT_FOUND",
                "INVALID_ARGUMENT",
            ) or "Request for unknown model" in str(exc):
                raise RepositoryError(
                    f"Triton at {self.url} does not serve the models: {_reason(exc)}"
                ) from exc
            log.warning(
                "triton at %s not reachable yet (%s); not ready until it is", self.url, _code(exc)
            )
        else:
            for spec in specs if self._ready else []:
                try:
                    await self._warm_up(spec, serving=False)
                except InferenceServerException as exc:
                    log.warning(
                        "triton: %s version %s could not be timed at warm-up (%s); its "
                        "batcher starts from a guess and learns from live batches",
                        spec.name,
                        spec.version,
                        _reason(exc),
                    )
        self._health = asyncio.create_task(self._health_loop(), name="triton-health")

    async def load(self, spec: ModelSpec) -> None:
        name, version = key = _key(spec)
        async with self._control:
            if key in self._specs:
                return
            before = self._served(name)
            previous = self._configs.get(name)
            self._configs[name] = spec.config
            reloaded = False
            try:
                await self._resolve()
                if not self._pods:
                    raise RepositoryError(f"no Triton behind {self.url} to load it on")
                await self._serve(name, before | {version})
                reloaded = True
                # Every Triton serves it before any traffic goes to it (the caller switches
                # once this returns), and every version was started afresh with this
                # config: check them all, on each.
                for pod in self._pods:
                    if not await self._pod(pod).is_model_ready(name, version, client_timeout=5):
                        raise RepositoryError(
                            f"model {name!r} version {version}: Triton at {pod} loaded it "
                            "but does not report it ready"
                        )
                    for old in before:
                        self._verified.discard((pod, (name, old)))
                    for spec_ in [spec, *(self._specs[(name, old)] for old in sorted(before))]:
                        await self._verify(spec_, pod)
                await self._warm_up(spec, serving=True)
            except (InferenceServerException, RepositoryError) as exc:
                if previous is None:
                    self._configs.pop(name, None)
                else:
                    self._configs[name] = previous
                await self._restore(name, before, reloaded)
                if isinstance(exc, RepositoryError):
                    raise
                raise RepositoryError(
                    f"model {name!r} version {version}: Triton at {self.url} could not load "
                    f"it: {_reason(exc)}"
                ) from exc
            self._specs[key] = spec
        log.info("triton: serving %s version %s on %s", name, version, ", ".join(self._pods))

    async def _restore(self, name: str, versions: set[str], reloaded: bool) -> None:
        """After a failed load, make every Triton serve ``versions`` of ``name`` again. A
        failed reload leaves them served (measured, Triton 2.51), but one that Triton did
        and the gateway then refused must be undone."""
        for pod in self._pods:
            client = self._pod(pod)
            try:
                missing = [
                    v
                    for v in versions
                    if not await client.is_model_ready(name, v, client_timeout=5)
                ]
                if reloaded or missing:
                    await self._serve_on(pod, name, versions)
            except (InferenceServerException, RepositoryError) as exc:
                # The health loop keeps asking while a version served is missing.
                log.error(
                    "triton: could not restore %s versions %s in Triton at %s: %s",
                    name,
                    sorted(versions, key=int),
                    pod,
                    brief(exc),
                )

    async def unload(self, spec: ModelSpec) -> None:
        name, version = key = _key(spec)
        async with self._control:
            if self._specs.pop(key, None) is None:
                return
            self._verified = {(p, k) for p, k in self._verified if k != key}
            rest = self._served(name)
            try:
                await self._serve(name, rest)
            except (InferenceServerException, RepositoryError) as exc:
                # Nothing is sent to it any more either way; Triton keeping it costs only
                # memory, until the next load request names the versions served.
                log.warning(
                    "triton: %s version %s stays loaded in Triton at %s: %s",
                    name,
                    version,
                    self.url,
                    brief(exc),
                )
            else:
                log.info("triton: released %s version %s", name, version)
            if not rest:
                self._configs.pop(name, None)

    async def _check(self) -> None:
        # Not Triton's own readiness: with --strict-readiness it is false while any version
        # unloads, and stays false after a failed load until that version loads (measured,
        # Triton 2.51). What the gateway needs is every Triton live and serving its versions.
        await self._resolve()
        # The serving channel too: its calls are what must work, and asking it makes a
        # channel in reconnect backoff (Triton restarted) connect now.
        ready = bool(self._pods) and await self._client.is_server_live(client_timeout=2)
        for pod in self._pods:
            ready = ready and await self._pod(pod).is_server_live(client_timeout=2)
            for key in list(self._specs):
                if not ready:
                    break
                ready = await self._check_version(key, pod)
        if ready:
            await self._share_memory()
        if ready != self._ready:
            log.warning("triton at %s is %s", self.url, "ready" if ready else "NOT ready")
        self._ready = ready

    async def _check_version(self, key: Key, pod: str) -> bool:
        name, version = key
        client = self._pod(pod)
        if not await client.is_model_ready(name, version, client_timeout=2):
            async with self._control:
                # Unloaded meanwhile, or loaded by a concurrent check: fine.
                if key not in self._specs or await client.is_model_ready(
                    name, version, client_timeout=2
                ):
                    return True
                # Triton lost a version served (a restarted or new Triton loads what
                # config.pbtxt names, not what the gateway loaded since): ask it again.
                versions = self._served(name)
                self._ready = False  # fail fast meanwhile
                log.info(
                    "triton at %s does not serve %s version %s; asking it for versions %s",
                    pod,
                    name,
                    version,
                    sorted(versions, key=int),
                )
                try:
                    await self._serve_on(pod, name, versions)
                except RepositoryError as exc:
                    raise RepositoryError(
                        f"model {name!r} version {version}: not served by Triton at {pod}, "
                        f"which cannot be asked for it ({exc})"
                    ) from exc
                self._verified -= {(pod, (name, v)) for v in versions}
            if not await client.is_model_ready(name, version, client_timeout=2):
                return False
        spec = self._specs.get(key)
        if spec is not None and (pod, key) not in self._verified:
            await self._verify(spec, pod)
        return True

    async def _health_loop(self) -> None:
        problem = ""  # logged once, not every second
        while True:
            try:
                await self._check()
                problem = ""
            except (InferenceServerException, RepositoryError) as exc:
                self._ready = False
                if str(exc) != problem:
                    problem = str(exc)
                    log.warning("triton at %s is NOT ready: %s", self.url, brief(exc, limit=500))
            await asyncio.sleep(self.health_interval_s)

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        if _key(spec) not in self._specs:
            raise BackendUnavailable(f"model {spec.name!r} version {spec.version} is not loaded")
        if not self._ready:
            raise BackendUnavailable("the inference server is not ready; retry later")
        c = spec.contract
        out = InferRequestedOutput(c.output_name)
        shape = (len(batch), c.num_classes)
        out_bytes = shape[0] * shape[1] * 4  # FP32 logits (config.pbtxt's output)
        pool = self._shm
        if pool is None or batch.nbytes + out_bytes > pool.byte_size:
            inp = _input(c.input_name, batch, c.datatype)
            result = await self._infer(spec, inp, out, timeout_s)
            logits = result.as_numpy(c.output_name)
            if logits is None:
                raise InternalError()
            return logits
        # Shared memory: the batch, then the logits, in one region of this host's memory
        # that Triton maps too; the RPC carries only the request.
        region = await pool.acquire()
        try:
            region.view(batch.dtype, batch.shape)[:] = batch
            inp = InferInput(c.input_name, list(batch.shape), c.datatype)
            inp.set_shared_memory(region.name, batch.nbytes)
            out.set_shared_memory(region.name, out_bytes, offset=batch.nbytes)
            await self._infer(spec, inp, out, timeout_s)
            return region.view(np.float32, shape, offset=batch.nbytes).copy()
        finally:
            pool.release(region)

    async def _infer(
        self, spec: ModelSpec, inp: InferInput, out: InferRequestedOutput, timeout_s: float
    ) -> Any:
        """One batch through Triton, retried on transient failures within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("request deadline exceeded waiting for the inference server")
            try:
                result = await self._client.infer(
                    spec.name,
                    [inp],
                    model_version=spec.version,
                    outputs=[out],
                    client_timeout=remaining,
                    headers=tracing.inject() or None,  # traceparent: Triton's trace joins ours
                )
                return result
            except InferenceServerException as exc:
                code = _code(exc)
                if code == "DEADLINE_EXCEEDED":
                    raise DeadlineExceeded("the inference server did not answer in time") from exc
                if code not in TRANSIENT:
                    log.error("triton refused a batch of %s: %s %s", spec.name, code, exc.message())
                    raise BackendUnavailable(
                        f"the inference server failed the request ({code or 'error'})"
                    ) from exc
                backoff = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
                if attempt >= self.max_retries or loop.time() + backoff >= deadline:
                    if code == "UNAVAILABLE":
                        self._ready = False  # fail the next requests fast; health loop restores
                        raise BackendUnavailable(
                            "the inference server is unavailable; retry later"
                        ) from exc
                    raise Overloaded(
                        "the inference server is overloaded; retry later", retry_after=1
                    ) from exc
                attempt += 1
                await asyncio.sleep(backoff)

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._ready = False
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        if self._shm is not None:
            if self._pods:
                client = self._pod(self._pods[0])
                for region in self._shm.regions:
                    with contextlib.suppress(InferenceServerException):
                        await client.unregister_system_shared_memory(
                            region.name, headers=self._admin, client_timeout=5
                        )
            self._shm.destroy()
            self._shm = None
        if self._client_ is not None:
            await self._client_.close()
        for client in self._pod_clients.values():
            await client.close()
        self._pod_clients.clear()
