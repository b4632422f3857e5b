"""The interface both backends implement: load models, run a batch, say if ready."""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

import numpy as np

from service.model.repository import ModelSpec


class Backend(abc.ABC):
    """Runs batches of preprocessed tensors through models; knows nothing of HTTP or images.

    ``infer`` receives a batch of the contract's dtype shaped
    ``(n, *spec.contract.input_shape)`` and returns the logits ``(n, num_classes)``. It raises :class:`service.errors.ServiceError`
    subclasses (``BackendUnavailable``, ``DeadlineExceeded``...) for failures a caller
    should see; anything else is a bug and becomes a generic 500.
    """

    name: ClassVar[str]
    #: How many batches of one model may be in the backend at once.
    max_inflight_batches: int = 1
    #: CPUs of this process one batch keeps busy (its inference threads; 0: it runs on a
    #: server or a GPU). The data plane holds that many while the batch runs.
    cpus_per_batch: int = 0
    #: What computes a batch: the instruction set of this CPU's kernels (``AVX2``,
    #: ``AVX-512 VNNI``, ``AMX``: service.host.cpus.cpu_isa), an accelerator, or a server.
    kernels: str = "unknown"

    def __init__(self) -> None:
        # Per (model, version): seconds per batch size, timed at warm-up (warm_up).
        self._warm: dict[tuple[str, str], dict[int, float]] = {}

    def served_precision(self, spec: ModelSpec) -> str:
        """What the version's batches are computed in (``fp32``, ``bf16``, ``fp16``,
        ``int8``): its contract's precision, except that a BF16 version is computed exactly
        in FP32 by an engine that does not run it in BF16 (as ONNX Runtime, whose CPU
        kernels have no BF16 convolution, and Triton's ONNX Runtime backend)."""
        return "fp32" if spec.precision == "bf16" else spec.precision

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        """Seconds a batch of each size took at warm-up, for the sizes the backend timed
        (the batcher's estimates before any live batch)."""
        return dict(self._warm.get((spec.name, spec.version), {}))

    async def warm_up(
        self, spec: ModelSpec, run: Callable[[np.ndarray], Awaitable[object]], serving: bool
    ) -> None:
        """Time ``run`` (one batch through the backend) on zeros of the contract's input, twice for each size (first runs
        allocate arenas and pick kernels; the second, timed, starts the batcher's cost
        model): powers of two up to the largest batch, and the largest (the sizes between
        are interpolated, then learned from live batches). A version loaded beside others
        that ``serving`` (a reload) times batches of 1 and 2 only: the full warm-up of
        ResNet-50 at batch 32 is seconds of every core, taken from live traffic (measured,
        embedded backend: p99 5x while it ran); larger sizes are extrapolated, then
        learned."""
        c = spec.contract
        most = min(2, spec.max_batch_size) if serving else spec.max_batch_size
        sizes = sorted({*(2**k for k in range(most.bit_length())), most})
        costs = self._warm.setdefault((spec.name, spec.version), {})
        for n in (*sizes, *sizes):
            batch = np.zeros((n, *c.input_shape), c.dtype)
            start = time.perf_counter()
            await run(batch)
            costs[n] = time.perf_counter() - start

    @abc.abstractmethod
    async def start(self, specs: list[ModelSpec]) -> None:
        """Load and warm up every model version; raise RepositoryError if one cannot be
        served."""

    @abc.abstractmethod
    async def load(self, spec: ModelSpec) -> None:
        """Load and warm up one more version beside those served (a reload); raise
        RepositoryError, leaving what is served untouched, if it cannot be served."""

    @abc.abstractmethod
    async def unload(self, spec: ModelSpec) -> None:
        """Release one version (no batch of it is running any more)."""

    @abc.abstractmethod
    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        """Logits for ``batch`` from version ``spec.version`` of the model."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True while every model can take requests."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sessions, channels and threads."""
