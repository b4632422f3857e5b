"""Model lifecycle: new versions without a restart or a dropped request.

The repository says what to serve (``service.model.repository.served_versions``: config.pbtxt's
version policy, plus the versions rollout.json names, and how unpinned traffic is split).
A reload makes the gateway serve that, one model at a time:

1. every version to serve that is not served yet is checked (layout, contract and
   tensors), loaded and warmed by the backend beside the versions serving, and run on its
   parity probe (the inputs export stored with it, whose outputs must come back as export
   verified them);
2. the model's routing is replaced in one assignment (``DataPlane.models``): requests
   planned before it finish on their version, requests after it see the new one;
3. versions no longer served are released once the last request planned on them is past
   its deadline (their batcher drains, the backend unloads them).

A version that fails any check is not routed to, and nothing is taken away: the versions
serving keep serving, readiness does not change, and the failure is logged, counted
(``resnet_serve_model_loads_total{outcome="failed"}``, ``resnet_serve_model_load_failing``)
and reported by ``GET /v1/models/{m}`` and the reload call.

Reloads come from the admin call (``POST /v1/models/{m}/reload``, gRPC ``ReloadModel``)
or from polling the repository every ``RESNET_SERVE_POLL_INTERVAL_S`` seconds: a model
is reloaded when its directory listing (names, sizes, times, inodes) changes, so a
version that failed is not retried until the repository changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import Backend
from service.dataplane.plane import DataPlane
from service.dataplane.routing import Routing, Version
from service.errors import LoadFailed, ServiceError, cut
from service.host import memory
from service.model.repository import (
    ModelSpec,
    RepositoryError,
    Rollout,
    layout_problems,
    load_probe,
    load_spec,
    parity_problem,
    served_versions,
)
from service.observability.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Reload:
    """What the newest reload of one model did."""

    model: str
    at: str = field(default_factory=_now)
    serving: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    #: Version -> why it is not served ("" for a problem of the whole model).
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def check(self) -> Reload:
        """Itself, or LoadFailed saying what is still served and why the rest is not."""
        if self.failed:
            raise LoadFailed(
                f"model {cut(self.model)}: still serving version {', '.join(self.serving)}; "
                + "; ".join(self.failed.values())
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "at": self.at,
            "ok": self.ok,
            "serving": self.serving,
            "added": self.added,
            "retired": self.retired,
            "failed": [{"version": v or None, "error": why} for v, why in self.failed.items()],
        }


def fingerprint(model_dir: Path) -> tuple[Any, ...] | None:
    """What a poll compares: every entry of the model directory and of its version
    directories (name, size, mtime, inode). Publishing swaps directories and rewrites
    config.pbtxt, so a new or removed version always changes it."""
    entries: list[Any] = []
    try:
        for path in sorted(model_dir.iterdir()):
            if path.name.startswith("."):
                continue  # staging trees, locks
            st = path.stat()
            entries.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
            if path.is_dir() and path.name.isdigit():
                for f in sorted(path.iterdir()):
                    st = f.stat()
                    entries.append((path.name, f.name, st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError:
        return None
    return tuple(entries)


class Lifecycle:
    def __init__(
        self, settings: Settings, plane: DataPlane, backend: Backend, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.plane = plane
        self.backend = backend
        self.metrics = metrics
        self.reloads: dict[str, Reload] = {}
        self._lock = asyncio.Lock()
        self._seen: dict[str, tuple[Any, ...] | None] = {}
        self._retiring: dict[Version, asyncio.Task[None]] = {}
        self._poll: asyncio.Task[None] | None = None

    def _dir(self, model: str) -> Path:
        return self.settings.repository / model

    # --- start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Route every model as its rollout says (RepositoryError if it cannot be), and poll
        the repository if asked to."""
        for name, routing in list(self.plane.models.items()):
            self._seen[name] = fingerprint(self._dir(name))
            _, rollout = served_versions(self._dir(name))
            new, problems = self._route(name, routing.versions, rollout)
            if problems:
                raise RepositoryError("; ".join(problems))
            self._switch(name, new)
            self.reloads[name] = Reload(name, serving=sorted(new.versions, key=int))
            self.metrics.model_load_failing.labels(name).set(0)  # a series from the start
        if self.settings.poll_interval_s > 0:
            self._poll = asyncio.create_task(self._polling(), name="repository-poll")

    async def close(self) -> None:
        """Stop polling; versions waiting to be released close now (their batchers drain)."""
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        retiring = dict(self._retiring)
        for task in retiring.values():
            task.cancel()
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        await asyncio.gather(*(v.batcher.close() for v in retiring))

    def states(self, model: str) -> list[dict[str, Any]]:
        """Every version of ``model`` the gateway knows of: serving (with its share of the
        unpinned traffic), retiring (finishing its last requests), failed (and why)."""
        routing = self.plane.models[model]
        share = routing.shares()
        states: dict[str, dict[str, Any]] = {}
        for v, served in routing.versions.items():
            states[v] = {
                "version": v,
                "state": "serving",
                "precision": served.spec.precision,
                "weight": round(share.get(v, 0.0), 6),
                "shadow": v == routing.shadow,
            }
        for served in self._retiring:
            if served.spec.name == model:
                v = served.spec.version
                states[v] = {"version": v, "state": "retiring", "precision": served.spec.precision}
        reload = self.reloads.get(model)
        for v, why in (reload.failed if reload else {}).items():
            if v and v not in states:
                states[v] = {"version": v, "state": "failed", "error": why}
        return [states[v] for v in sorted(states, key=int)]

    # --- reloading --------------------------------------------------------------------------

    async def reload(self, model: str | None = None) -> Reload:
        """Serve what the repository now says for ``model`` (the default model if None)."""
        name = model or self.plane.default_model
        self.plane.routing(name)  # ModelNotFound for a model that is not served
        async with self._lock:
            self._seen[name] = fingerprint(self._dir(name))
            result = await self._reload(name)
        self.reloads[name] = result
        self.metrics.model_load_failing.labels(name).set(len(result.failed))
        if result.ok:
            log.info(
                "reloaded %s: serving %s (added %s, retired %s)",
                name,
                ", ".join(result.serving),
                ", ".join(result.added) or "none",
                ", ".join(result.retired) or "none",
            )
        else:
            log.warning(
                "reload of %s: still serving %s; %s",
                name,
                ", ".join(result.serving),
                "; ".join(result.failed.values()),
            )
        return result

    async def _reload(self, name: str) -> Reload:
        result = Reload(name)
        routing = self.plane.models[name]
        model_dir = self._dir(name)
        try:
            wanted, rollout = served_versions(model_dir)
        except RepositoryError as exc:
            result.failed[""] = str(exc)
            result.serving = sorted(routing.versions, key=int)
            return result
        versions = dict(routing.versions)
        layout = layout_problems(model_dir)
        for v in (str(w) for w in wanted):
            if v in versions:
                continue
            if (back := await self._revive(name, v)) is not None:
                versions[v] = back  # retiring, still loaded: routed to again at once
                result.added.append(v)
                continue
            try:
                versions[v] = await self._load(model_dir, v, layout)
            except (RepositoryError, ServiceError) as exc:
                why = str(exc) if isinstance(exc, RepositoryError) else exc.message
                result.failed[v] = why
                self.metrics.model_loads.labels(name, v, "failed").inc()
                continue
            result.added.append(v)
            self.metrics.model_loads.labels(name, v, "ok").inc()
        # With a version missing, nothing is taken away: what served it keeps serving.
        if not result.failed:
            result.retired = sorted((v for v in versions if int(v) not in wanted), key=int)
        kept = {v: served for v, served in versions.items() if v not in result.retired}
        new, problems = self._route(name, kept, rollout)
        if problems:
            result.failed[""] = "; ".join(problems)
        self._switch(name, new)
        for v in result.retired:
            self._retire(routing.versions[v])
        result.serving = sorted(new.versions, key=int)
        return result

    async def _load(self, model_dir: Path, version: str, layout: list[str]) -> Version:
        """Check, load, warm and probe one version; raise RepositoryError if it cannot be
        served (the backend then holds nothing of it)."""
        # The layout check names a missing contract or graph too: nothing else to look at.
        mine = [p for p in layout if f": version {version}: " in p or ": version " not in p]
        if mine:
            raise RepositoryError("; ".join(mine))
        spec = load_spec(model_dir, int(version))
        await self.backend.load(spec)
        try:
            await self._probe(spec)
        except BaseException:
            await self.backend.unload(spec)
            raise
        return self.plane.version(spec)

    async def _probe(self, spec: ModelSpec) -> None:
        """The backend must compute, on the inputs stored with the version, the outputs
        export verified for them (a version without a probe: finite logits of the right
        shape for a blank image)."""
        where = f"model {spec.name!r} version {spec.version}: parity probe"
        probe = load_probe(spec)
        c = spec.contract
        if probe is None:
            inputs, expected = np.zeros((1, *c.input_shape), c.dtype), None
        else:
            inputs, expected = probe
        logits = await self.backend.infer(spec, inputs.astype(c.dtype), PROBE_TIMEOUT_S)
        if logits.shape != (len(inputs), c.num_classes) or not np.isfinite(logits).all():
            raise RepositoryError(
                f"{where}: the backend answered {list(logits.shape)} with non-finite or "
                f"misshapen logits (expected [{len(inputs)}, {c.num_classes}])"
            )
        if expected is None:
            return
        if problem := parity_problem(expected, logits):
            raise RepositoryError(f"{where} failed against what export verified: {problem}")

    def _route(
        self, name: str, versions: dict[str, Version], rollout: Rollout
    ) -> tuple[Routing, list[str]]:
        """The routing ``rollout`` asks for over the versions that could be loaded, and why
        any part of it is left out."""
        problems = []
        weights = tuple((v, w) for v, w in sorted(rollout.weights.items()) if w > 0)
        missing = [v for v, _ in weights if v not in versions]
        if missing:
            problems.append(
                f"model {name!r}: canary weights for version {', '.join(missing)}, which is "
                "not served; unpinned traffic goes to the newest served version"
            )
            weights = ()
        shadow = rollout.shadow
        if shadow is not None:
            if shadow not in versions:
                problems.append(f"model {name!r}: shadow version {shadow} is not served")
                shadow = None
            else:
                primaries = [versions[v] for v in Routing(versions, weights).shares()]
                contract = versions[shadow].spec.contract
                odd = [p.spec.version for p in primaries if not p.spec.contract.same_io(contract)]
                if odd:
                    problems.append(
                        f"model {name!r}: shadow version {shadow} does not take the same "
                        f"input as version {', '.join(odd)} (preprocess.json differs), so "
                        "it cannot be fed a copy of its requests; no shadow"
                    )
                    shadow = None
        return Routing(versions, weights, shadow), problems

    def _switch(self, name: str, routing: Routing) -> None:
        """Route ``name`` by ``routing`` from now on (one assignment: the switch)."""
        old = self.plane.models[name]
        self.plane.models[name] = routing
        m = self.metrics
        for v in set(old.versions) - set(routing.versions):
            m.traffic_weight.remove(name, v)
        share = routing.shares()
        for v, served in routing.versions.items():
            m.traffic_weight.labels(name, v).set(share.get(v, 0.0))
            s = served.spec
            m.model_info.labels(*self._info(s)).set(1)

    def _info(self, spec: ModelSpec) -> tuple[str, ...]:
        """The model-info metric's labels for ``spec``."""
        b, c = self.backend, spec.contract
        precisions = (spec.precision, b.served_precision(spec))
        return spec.name, spec.version, *precisions, c.arch, b.name, b.kernels

    def _retire(self, version: Version) -> None:
        self._retiring[version] = asyncio.create_task(
            self._release(version), name=f"retire-{version.spec.name}-{version.spec.version}"
        )

    async def _revive(self, name: str, version: str) -> Version | None:
        """A retiring version asked for again (a quick rollback): itself if it is still
        waiting for its last requests; else None once its release is done (it is loaded
        anew then: the backend holds one copy of a version at a time)."""
        for served, task in list(self._retiring.items()):
            if (served.spec.name, served.spec.version) != (name, version):
                continue
            if not served.releasing:
                task.cancel()
                del self._retiring[served]
                return served
            await asyncio.gather(task, return_exceptions=True)
        return None

    async def _release(self, version: Version) -> None:
        """Once every request planned on ``version`` is past its deadline, close its batcher
        (it drains) and unload it."""
        spec = version.spec
        me = asyncio.current_task()
        try:
            await asyncio.sleep(max(0.0, version.last_deadline - time.perf_counter()))
            version.releasing = True
            await version.batcher.close()
            version.batcher.forget_metrics()
            await self.backend.unload(spec)
            # The session's weights and arenas went back to malloc, which keeps them in its
            # arenas: hand them to the kernel (service.host.memory), or RSS grows by reloads.
            await asyncio.to_thread(memory.trim)
            self.metrics.model_info.remove(*self._info(spec))
            log.info("released %s version %s", spec.name, spec.version)
        finally:
            if self._retiring.get(version) is me:
                del self._retiring[version]

    async def _polling(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            for name in list(self.plane.models):
                if fingerprint(self._dir(name)) == self._seen.get(name):
                    continue
                try:
                    await self.reload(name)
                except Exception:  # the poll must outlive anything one reload does
                    log.exception("reload of %s failed", name)
