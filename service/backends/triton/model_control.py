"""Which versions every Triton behind the gateway's target serves, and the channels of each.

Which versions Triton serves is the gateway's decision (Triton's explicit model control,
``tritonserver --model-control-mode=explicit``): :meth:`ModelControl.load` reloads the model
with its config.pbtxt and a ``specific`` version policy naming the versions served plus the
new one, :meth:`ModelControl.unload` with the versions left. Measured with Triton 2.51: the
versions already served keep answering while Triton reloads (it starts every version of the
new set afresh, then swaps), and a reload that fails leaves them served. A Triton that lost
versions (a restarted one loads what config.pbtxt says) is asked for the served set again by
the health loop (:meth:`ModelControl.serving_everywhere`). In model control mode none Triton
refuses load requests: ``load`` says so.

Model control fans out to every Triton behind the target (:func:`endpoints`: every pod of a
headless Service), each on a channel of its own; a version is loaded once every one of them
serves it, and the health loop keeps each one serving the versions served.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from service.backends.triton.channels import RESTRICTED, Key, key_sent, reason, version_key
from service.backends.triton.metadata import verify_metadata
from service.errors import brief
from service.model.repository import ModelSpec, RepositoryError

log = logging.getLogger(__name__)

#: What Triton answers a load or unload request in model control mode none (or poll).
NOT_EXPLICIT = "explicit model load / unload is not allowed"


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


class ModelControl:
    """The versions served, and every Triton behind ``url`` made to serve exactly them.
    ``channel_args``: the serving channel's (each Triton's own channel takes them, less the
    balancing); ``headers``: what load and unload requests send along (the admin key);
    ``lost``: called when a Triton no longer serves a version, before it is asked for it
    again (the backend fails requests fast meanwhile)."""

    def __init__(
        self,
        url: str,
        channel_args: list[tuple[str, Any]],
        *,
        load_timeout_s: float,
        headers: dict[str, str] | None,
        lost: Callable[[], None],
    ) -> None:
        self.url = url
        self.load_timeout_s = load_timeout_s
        self._admin = headers
        self._lost = lost
        self._channel_args = [a for a in channel_args if a[0] != "grpc.lb_policy_name"]
        # Model control goes to each Triton behind the target (endpoints): its own channel.
        self.pods: list[str] = []
        self._clients: dict[str, InferenceServerClient] = {}
        # The versions served; per model, those Triton is asked to serve.
        self._specs: dict[Key, ModelSpec] = {}
        self._verified: set[tuple[str, Key]] = set()  # (pod, version) checked on that pod
        # Each model's config.pbtxt as last read: what a load request sends Triton, with the
        # version policy replaced by the versions served.
        self._configs: dict[str, mc.ModelConfig] = {}
        # One load request at a time: each names a model's complete set of versions, read
        # from _specs under this lock.
        self._lock = asyncio.Lock()

    def adopt(self, specs: list[ModelSpec]) -> None:
        """Serve ``specs`` from now on: the versions Triton loaded from config.pbtxt (at
        start, before any load or check)."""
        self._specs = {version_key(s): s for s in specs}
        self._configs = {s.name: s.config for s in specs}

    def serves(self, spec: ModelSpec) -> bool:
        return version_key(spec) in self._specs

    def _served(self, name: str) -> set[str]:
        return {v for n, v in self._specs if n == name}

    def client(self, pod: str) -> InferenceServerClient:
        """One Triton's own channel (model control and health), opened on first use."""
        client = self._clients.get(pod)
        if client is None:
            client = self._clients[pod] = InferenceServerClient(
                pod, channel_args=self._channel_args
            )
        return client

    async def resolve(self) -> None:
        """The Tritons behind the target now (pods come and go with scaling); the channels
        of those gone are closed."""
        try:
            pods = await asyncio.to_thread(endpoints, self.url)
        except (OSError, ValueError) as exc:
            # No pod ready yet (a headless Service without endpoints does not resolve):
            # not ready until one is.
            pods = []
            if self.pods:
                log.warning("triton: cannot resolve %s (%s)", self.url, exc)
        if pods != self.pods:
            log.info("triton: %s is %s", self.url, ", ".join(pods) or "nobody")
        for gone in set(self._clients) - set(pods):
            await self._clients.pop(gone).close()
        self.pods = pods

    async def serving_everywhere(self) -> bool:
        """Whether every Triton resolved is live and serves every version served; one that
        lost a version is asked for it again, and checked against its contract anew."""
        for pod in self.pods:
            if not await self.client(pod).is_server_live(client_timeout=2):
                return False
            for key in list(self._specs):
                if not await self._keep_serving(key, pod):
                    return False
        return True

    async def _keep_serving(self, key: Key, pod: str) -> bool:
        name, version = key
        client = self.client(pod)
        if not await client.is_model_ready(name, version, client_timeout=2):
            async with self._lock:
                # Unloaded meanwhile, or loaded by a concurrent check: fine.
                if key not in self._specs or await client.is_model_ready(
                    name, version, client_timeout=2
                ):
                    return True
                # Triton lost a version served (a restarted or new Triton loads what
                # config.pbtxt names, not what the gateway loaded since): ask it again.
                versions = self._served(name)
                self._lost()  # fail fast meanwhile
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

    async def _verify(self, spec: ModelSpec, pod: str) -> None:
        await verify_metadata(self.client(pod), spec, pod)
        self._verified.add((pod, version_key(spec)))

    async def load(self, spec: ModelSpec, prepare: Callable[[], Awaitable[None]]) -> None:
        """Have every Triton serve ``spec`` beside the versions served, each checked against
        its contract, then ``prepare`` it (the backend's warm-up) before it counts as
        served; RepositoryError, with the versions served restored, if any step fails."""
        name, version = key = version_key(spec)
        async with self._lock:
            if key in self._specs:
                return
            before = self._served(name)
            previous = self._configs.get(name)
            self._configs[name] = spec.config
            reloaded = False
            try:
                await self.resolve()
                if not self.pods:
                    raise RepositoryError(f"no Triton behind {self.url} to load it on")
                await self._serve(name, before | {version})
                reloaded = True
                # Every Triton serves it before any traffic goes to it (the caller switches
                # once this returns), and every version was started afresh with this
                # config: check them all, on each.
                for pod in self.pods:
                    if not await self.client(pod).is_model_ready(name, version, client_timeout=5):
                        raise RepositoryError(
                            f"model {name!r} version {version}: Triton at {pod} loaded it "
                            "but does not report it ready"
                        )
                    for old in before:
                        self._verified.discard((pod, (name, old)))
                    for spec_ in [spec, *(self._specs[(name, old)] for old in sorted(before))]:
                        await self._verify(spec_, pod)
                await prepare()
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
                    f"it: {reason(exc)}"
                ) from exc
            self._specs[key] = spec
        log.info("triton: serving %s version %s on %s", name, version, ", ".join(self.pods))

    async def _restore(self, name: str, versions: set[str], reloaded: bool) -> None:
        """After a failed load, make every Triton serve ``versions`` of ``name`` again. A
        failed reload leaves them served (measured, Triton 2.51), but one that Triton did
        and the gateway then refused must be undone."""
        for pod in self.pods:
            client = self.client(pod)
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
        """Stop serving ``spec``, and have every Triton serve the versions left."""
        name, version = key = version_key(spec)
        async with self._lock:
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

    async def _serve(self, name: str, versions: set[str]) -> None:
        """Have every Triton serve exactly ``versions`` of ``name`` (none: unload the
        model), one after another; RepositoryError if one takes no load requests (or none
        without the admin key the gateway lacks), else what it raised."""
        for pod in self.pods:
            try:
                await self._serve_on(pod, name, versions)
            except InferenceServerException as exc:
                if len(self.pods) < 2:
                    raise
                # Which of the Tritons refused, in the reason the caller reports.
                raise InferenceServerException(
                    f"Triton at {pod}: {exc.message()}", exc.status(), exc.debug_details()
                ) from exc

    async def _serve_on(self, pod: str, name: str, versions: set[str]) -> None:
        client = self.client(pod)
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
            if RESTRICTED in str(exc):
                # Say which setting holds the key (Triton names only its header).
                raise RepositoryError(
                    f"model {name!r}: Triton at {pod} refused to "
                    f"{'load' if versions else 'unload'} it: its repository control needs "
                    f"its admin key, and the gateway sent {key_sent(self._admin)} "
                    "(RESNET_SERVE_TRITON_ADMIN_KEY)"
                ) from exc
            raise

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
