"""The data plane: one transport-neutral object that every API is a thin adapter over.

A request is resolved once into a :class:`Plan` (model version, ``top_k``, deadline), and
the plan travels: decoding and preprocessing in the decoding processes, off the event loop
(:mod:`service.dataplane.request_decoding`), the model's micro-batcher and backend, top-k.
REST ``/v1``, KServe v2 over HTTP and gRPC and the ``Classifier`` gRPC service only
translate their wire formats to and from these calls; none of them touches a batcher, a
backend or a spec's contract on its own.

It also keeps each model's inference statistics (:mod:`service.dataplane.statistics`),
says what it serves (:mod:`service.dataplane.summary`), and tells an attached
:class:`AnswerHook` (the shadows, :mod:`service.runtime.shadow`) of every unpinned batch
answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.backends.base import Backend
from service.dataplane.batching import Batcher
from service.dataplane.decode_scheduler import DecodePool
from service.dataplane.decode_workers import DecoderProcesses
from service.dataplane.preprocess import DecodeLimits
from service.dataplane.request_decoding import RequestDecoder
from service.dataplane.routing import Routing, Version
from service.dataplane.scores import probabilities, top_indices
from service.dataplane.statistics import ModelStatistics
from service.dataplane.summary import ModelSummary
from service.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ValidationFailed,
    cut,
)
from service.host.cpus import usable_cpus
from service.model.repository import ModelSpec
from service.observability import observe
from service.observability.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

#: The shortest timeout a caller may ask for (a shorter one is a mistake, not a deadline).
MIN_TIMEOUT_S = 0.001


class AnswerHook(Protocol):
    """Told of each unpinned batch once answered, with its logits, on the request's path
    (so it must return at once and not raise: the shadows only start a task), and closed
    with the data plane, before its decoder."""

    def answered(self, served: Version, batch: np.ndarray, logits: np.ndarray) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A request resolved once: which model version, how many classes, until when."""

    served: Version
    #: Classes per image for classification (validated against the model).
    top_k: int
    #: ``time.perf_counter()`` values: when the request arrived; past when it is a 504.
    arrived: float
    deadline: float
    #: Whether the caller named the version (pinned requests are not mirrored to a shadow).
    pinned: bool = False

    @property
    def spec(self) -> ModelSpec:
        return self.served.spec


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    model: str
    version: str
    predictions: list[list[Prediction]]


def exclusive_cpus(setting: bool | None, cpus_per_batch: int, cpus: int) -> bool:
    """Whether batches hold their threads' CPUs against decoding: as ``setting`` says, or
    unset, where a batch leaves some of the ``cpus`` free (parallel batches, OpenVINO's
    streams: decodes take the cores no batch holds). Not where one batch holds them all:
    every decode would wait for every batch. Not where batches run elsewhere (a GPU, a
    server: ``cpus_per_batch`` 0)."""
    if setting is not None:
        return setting
    return 0 < cpus_per_batch < cpus


class DataPlane:
    """The served versions of every model, and every request's way through them."""

    def __init__(
        self,
        specs: list[ModelSpec],
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        names = sorted({s.name for s in specs})
        self.default_model = settings.default_model or names[0]
        if self.default_model not in names:
            raise ValueError(f"default model {self.default_model!r} is not served")
        cpus = usable_cpus()
        workers = settings.preprocess_workers or cpus
        # EXCLUSIVE_CPUS: a batch holds its threads' CPUs, decodes the rest
        # (service.dataplane.decode_scheduler).
        exclusive = exclusive_cpus(settings.exclusive_cpus, backend.cpus_per_batch, cpus)
        self.decoder = DecodePool(DecoderProcesses(workers), cpus if exclusive else workers)
        limits = DecodeLimits(max_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft)
        self.request_decoder = RequestDecoder(self.decoder, limits, metrics)
        self._batch_cpus = backend.cpus_per_batch if exclusive else 0
        self._started = False
        self.models: dict[str, Routing] = {}
        for spec in specs:
            routing = self.models.get(spec.name, Routing({}))
            versions = {**routing.versions, spec.version: self.version(spec)}
            self.models[spec.name] = Routing(versions)
        self.hooks: list[AnswerHook] = []

    def attach(self, hook: AnswerHook) -> None:
        self.hooks.append(hook)

    def version(self, spec: ModelSpec) -> Version:
        """A version of a model, ready to be routed to (its batcher is started with the
        data plane, or at once if the plane runs already)."""
        stats = ModelStatistics(spec.name, spec.version)

        async def infer(x: np.ndarray, timeout: float) -> np.ndarray:
            start = time.perf_counter()
            async with self.decoder.cores(self._batch_cpus):
                logits = await self.backend.infer(spec, x, timeout)
            stats.batch(len(x), time.perf_counter() - start)
            return logits

        cap = self.settings.max_batch_size or spec.max_batch_size
        target_ms = self.settings.target_p99_ms
        batcher = Batcher(
            spec.name,
            infer,
            max_batch=min(cap, spec.max_batch_size),
            max_delay_s=self.settings.max_batch_delay_ms / 1000.0,
            max_queue=self.settings.max_queue_images,
            metrics=self.metrics,
            backend_name=self.backend.name,
            served_precision=self.backend.served_precision(spec),
            max_inflight=self.backend.max_inflight_batches,
            warm_costs=self.backend.warm_costs(spec),
            target_s=None if target_ms is None else target_ms / 1000.0,
            version=spec.version,
            tracer=self.tracer,
        )
        if self._started:
            batcher.start()
        return Version(spec, batcher, stats)

    def start(self) -> None:
        self._started = True
        self.decoder.start()
        for version in self.served():
            version.batcher.start()

    def served(self) -> list[Version]:
        """Every version routed to, of every model."""
        return [v for routing in self.models.values() for v in routing.versions.values()]

    async def close(self) -> None:
        await asyncio.gather(*(v.batcher.close() for v in self.served()))
        for hook in self.hooks:
            await hook.close()
        await self.decoder.close()

    # --- resolving a request ----------------------------------------------------------------

    def routing(self, model: str | None) -> Routing:
        """Where requests for ``model`` (the default model if None) go, or ModelNotFound."""
        name = model or self.default_model
        routing = self.models.get(name)
        if routing is None:
            raise ModelNotFound(f"model {cut(name)} is not served (GET /v1/models lists them)")
        return routing

    def served_version(
        self, model: str | None, version: str | None = None, client: str | None = None
    ) -> Version:
        """The version of ``model`` that answers: ``version`` if the caller names one (it must
        be served), else the routing's pick for ``client``."""
        routing = self.routing(model)
        if not version:
            return routing.pick(model or self.default_model, client)
        served = routing.versions.get(version)
        if served is None:
            raise ModelNotFound(
                f"model {cut(model or self.default_model)} version {cut(version)} is not served "
                f"(serving versions {', '.join(sorted(routing.versions, key=int))})"
            )
        return served

    def spec(self, model: str | None, version: str | None = None) -> ModelSpec:
        """The spec of ``model`` (default model if None) at ``version`` (newest if None)."""
        if not version:
            return self.routing(model).newest.spec
        return self.served_version(model, version).spec

    def plan(
        self,
        model: str | None,
        *,
        version: str | None = None,
        top_k: int | None = None,
        timeout_s: float | None = None,
        arrived: float | None = None,
    ) -> Plan:
        """Resolve a request once. ``timeout_s`` (the caller's own deadline) can only shorten
        the server's; the deadline counts from ``arrived`` (default: now). An unpinned
        request goes where the model's routing sends the caller's client key."""
        record = observe.current()
        served = self.served_version(model, version, record.client if record else None)
        spec = served.spec
        observe.serving(spec.name, spec.version)
        start = time.perf_counter() if arrived is None else arrived
        deadline = start + self.budget_s(timeout_s)
        served.last_deadline = max(served.last_deadline, deadline)
        return Plan(served, self._top_k(spec, top_k), start, deadline, pinned=bool(version))

    def budget_s(self, timeout_s: float | None) -> float:
        """A request's time: the server's deadline, or the caller's if that is shorter."""
        if timeout_s is None:
            return self.settings.request_timeout_s
        if not (math.isfinite(timeout_s) and timeout_s >= MIN_TIMEOUT_S):
            raise ValidationFailed(
                f"the request timeout must be at least {MIN_TIMEOUT_S} seconds, got {timeout_s}"
            )
        return min(self.settings.request_timeout_s, timeout_s)

    def shed(self, model: str | None, timeout_s: float | None, version: str | None = None) -> None:
        """Raise Overloaded if ``model`` could not take even one image now (the check a
        request gets before anything is read or routed: a refusal costs microseconds).
        Unpinned under a canary: refused only if its least loaded version would refuse."""
        deadline = time.perf_counter() + self.budget_s(timeout_s)
        if version:
            candidates = [self.served_version(model, version)]
        else:
            routing = self.routing(model)
            candidates = [routing.versions[v] for v in routing.shares()]
        min(candidates, key=lambda v: v.batcher.waiting).batcher.admissible(1, deadline)

    def with_top_k(self, plan: Plan, top_k: int | None, name: str = "top_k") -> Plan:
        """``plan`` with a ``top_k`` that arrived after it was made (in a body; as KServe's
        ``class_count``), validated against the same model."""
        return dataclasses.replace(plan, top_k=self._top_k(plan.spec, top_k, name))

    def _top_k(self, spec: ModelSpec, top_k: int | None, name: str = "top_k") -> int:
        n = spec.contract.num_classes
        if top_k is None:
            return min(self.settings.default_top_k, n)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
            raise ValidationFailed(
                f"{name} must be an integer between 1 and {n} for model {cut(spec.name)}, "
                f"got {top_k!r}"
            )
        return top_k

    def check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidRequest("no image in the request")
        if n > self.settings.max_images_per_request:
            raise PayloadTooLarge(
                f"{n} images in one request; the limit is {self.settings.max_images_per_request}"
            )

    # --- the work ---------------------------------------------------------------------------

    async def decode(self, plan: Plan, images: list[bytes]) -> np.ndarray:
        """Encoded images -> the model's input batch, by its contract, for :meth:`infer`:
        admitted before a byte is decoded, then decoded in the decoding processes
        (:class:`~service.dataplane.request_decoding.RequestDecoder`); 504 at the deadline."""
        self.check_count(len(images))
        return await self.request_decoder.decode(plan.served, plan.deadline, images)

    async def infer(self, plan: Plan, batch: np.ndarray, decoded: bool = False) -> np.ndarray:
        """The model's logits ``(n, num_classes)`` for an input batch, through its batcher.
        ``decoded``: the batch came from :meth:`decode`, which admitted it already."""
        spec = plan.spec
        observe.images(len(batch))
        start = time.perf_counter()
        try:
            done = await plan.served.batcher.submit(
                list(batch), plan.deadline, decoded, arrived=plan.arrived
            )
        except BaseException:
            plan.served.stats.durations["fail"].add(time.perf_counter() - start)
            raise
        stats = plan.served.stats
        stats.durations["queue"].add(done.queued_s)
        stats.durations["compute_infer"].add(done.computed_s)
        observe.stage("queue", done.queued_s)
        observe.stage("infer", done.computed_s)
        observe.past_span("queue", start, start + done.queued_s)
        stats.inference_count += len(batch)
        stats.last_inference_ms = int(time.time() * 1000)
        self.metrics.child(self.metrics.images, spec.name, spec.version).inc(len(batch))
        logits = np.stack(done.rows)
        if not plan.pinned:
            for hook in self.hooks:
                hook.answered(plan.served, batch, logits)
        return logits

    def succeeded(self, plan: Plan, output_started: float) -> None:
        """Count a request answered: its whole time, and the time spent shaping its output."""
        now = time.perf_counter()
        durations = plan.served.stats.durations
        durations["compute_output"].add(now - output_started)
        observe.stage("output", now - output_started)
        durations["success"].add(now - plan.arrived)

    async def classify(self, plan: Plan, images: list[bytes]) -> Classification:
        """Encoded images -> the ``plan.top_k`` best classes of each, with probabilities."""
        logits = await self.infer(plan, await self.decode(plan, images), decoded=True)
        output_started = time.perf_counter()
        with observe.span("top-k", **{"resnet_serve.top_k": plan.top_k}):
            idx = top_indices(logits, plan.top_k)
            probs = probabilities(logits, idx)
        labels = plan.spec.labels
        result = Classification(
            model=plan.spec.name,
            version=plan.spec.version,
            predictions=[
                [Prediction(int(i), labels[i], float(p)) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(idx, probs, strict=True)
            ],
        )
        self.succeeded(plan, output_started)
        return result

    # --- describing -------------------------------------------------------------------------

    def summary(self, spec: ModelSpec) -> ModelSummary:
        """What every API says about ``spec``'s version."""
        served = self.served_version(spec.name, spec.version)
        versions = sorted(self.routing(spec.name).versions, key=int)
        return ModelSummary.of(served, versions, self.backend, spec.name == self.default_model)

    def batch_costs_ms(self, spec: ModelSpec) -> dict[int, float]:
        """Milliseconds per batch size, 1..the batch cap, from the version's cost model."""
        batcher = self.served_version(spec.name, spec.version).batcher
        costs = batcher.policy.costs
        return {n: round(costs.cost(n) * 1000, 3) for n in range(1, batcher.max_batch + 1)}

    def summaries(self) -> list[ModelSummary]:
        """One per model, of its newest served version."""
        return [self.summary(self.spec(name)) for name in sorted(self.models)]

    def statistics(self, model: str | None = None, version: str | None = None) -> list[Any]:
        """Triton-shaped statistics of one version, of every served version of one model,
        or of all models (``model`` empty)."""
        if version:
            served = [self.served_version(model, version)]
        elif model:
            served = list(self.routing(model).versions.values())
        else:
            served = self.served()
        return [v.stats.as_dict() for v in served]
