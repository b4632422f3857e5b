"""What the engines that run in this process (ONNX Runtime, OpenVINO) share: one compiled
model per served version, run on threads of its own, warmed up before it is routed to,
released when it retires; their thread counts from the CPUs the process may use; and
their refusal of a version they cannot run, in one line."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from service.backends.base import Backend
from service.errors import BackendUnavailable
from service.host.cpus import cpu_isa, usable_cpus
from service.model.repository import ModelSpec, RepositoryError, TensorSig, tensor_problems

log = logging.getLogger(__name__)

#: One batch through a version's compiled model, returning its logits; called on the
#: version's threads (the engines release the GIL while they compute).
Runner = Callable[[np.ndarray], np.ndarray]


def refusal(spec: ModelSpec, engine: str, reason: str) -> RepositoryError:
    """``model 'm' version 2: OpenVINO cannot load it (<reason>)``: how every embedded engine
    refuses a version's graph."""
    return RepositoryError(
        f"model {spec.name!r} version {spec.version}: {engine} cannot load it ({reason})"
    )


def check_tensors(spec: ModelSpec, inputs: list[TensorSig], outputs: list[TensorSig]) -> None:
    """RepositoryError unless the graph's tensors, as the engine reads them, are the
    contract's (names, datatypes, and a dynamic batch axis first)."""
    problems = tensor_problems(spec.contract, inputs, outputs, "graph")
    if problems:
        raise RepositoryError(f"model {spec.name!r} version {spec.version}: " + "; ".join(problems))


class EmbeddedBackend(Backend):
    """An engine in this process. A subclass compiles a version (:meth:`_open`); this class
    runs it: ``parallel_batches`` batches of one version at once, each on
    ``intra_op_threads`` threads."""

    #: The engine's name as messages give it ("ONNX Runtime").
    engine: ClassVar[str]

    def __init__(self, intra_op_threads: int = 0, parallel_batches: int = 0) -> None:
        """``intra_op_threads`` per batch (default: the usable CPUs,
        :func:`service.host.cpus.usable_cpus`, divided among the parallel batches).
        ``parallel_batches``: 0 is the engine's choice (:meth:`_size`); one batch on all
        cores gives the lowest latency; several batches on fewer threads each avoid stalling
        a whole batch whenever a decoding process takes one of its cores, which gives more
        throughput under load."""
        super().__init__()
        self._intra_op_threads = intra_op_threads
        #: The CPUs this process may use, read once: every sizing divides the same number.
        self.cpus = usable_cpus()
        self._size(parallel_batches or 1)
        self.kernels = cpu_isa()
        # Per (model, version): versions of one model are served side by side.
        self._runners: dict[tuple[str, str], Runner] = {}
        # Each version's threads, as many as its batches that may run at once.
        self._executors: dict[tuple[str, str], ThreadPoolExecutor] = {}
        self._ready = False

    def _size(self, parallel_batches: int) -> None:
        """Run ``parallel_batches`` batches at once, each on ``intra_op_threads`` threads
        or its share of the usable CPUs. An engine whose choice depends on the model
        (OpenVINO's) calls it again when it compiles its first version, before any batch."""
        self.max_inflight_batches = max(1, parallel_batches)
        self._threads = self._intra_op_threads or max(1, self.cpus // self.max_inflight_batches)
        self.cpus_per_batch = self._threads

    @abc.abstractmethod
    def _open(self, spec: ModelSpec) -> Runner:
        """Compile the version's model.onnx (on a thread of its own, not the event loop's);
        raise RepositoryError (:func:`refusal`, :func:`check_tensors`) if this engine
        cannot serve it."""

    def loaded(self, spec: ModelSpec) -> bool:
        return (spec.name, spec.version) in self._runners

    async def start(self, specs: list[ModelSpec]) -> None:
        for spec in specs:
            # A version loaded already was timed against another engine (service.backends.engines).
            if not self.loaded(spec):
                await self.load(spec)
        self._ready = True

    async def load(self, spec: ModelSpec) -> None:
        key = (spec.name, spec.version)
        runner = await asyncio.to_thread(self._open, spec)
        # After compiling: the first version may have sized the engine (_size).
        executor = ThreadPoolExecutor(
            self.max_inflight_batches, thread_name_prefix=f"{self.name}-{spec.name}-{spec.version}"
        )
        try:
            loop = asyncio.get_running_loop()

            def run(batch: np.ndarray) -> asyncio.Future[np.ndarray]:
                return loop.run_in_executor(executor, runner, batch)

            await self.warm_up(spec, run, serving=self._ready)
        except BaseException:
            executor.shutdown(wait=False)
            self._warm.pop(key, None)
            raise
        self._executors[key], self._runners[key] = executor, runner
        log.info(
            "%s: loaded %s version %s (%s), computing in %s on %s kernels, %s",
            self.name,
            spec.name,
            spec.version,
            spec.precision,
            self.served_precision(spec),
            self.kernels,
            self.sizing(),
        )

    def sizing(self) -> str:
        """How the engine splits the cores: ``2 batches at once, 1 thread each``."""
        n, t = self.max_inflight_batches, self._threads
        return f"{n} batch{'es' if n > 1 else ''} at once, {t} thread{'s' if t > 1 else ''} each"

    async def unload(self, spec: ModelSpec) -> None:
        key = (spec.name, spec.version)
        # Dropping the last reference frees the compiled model (its weights and arenas).
        self._runners.pop(key, None)
        self._warm.pop(key, None)
        executor = self._executors.pop(key, None)
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        log.info("%s: unloaded %s version %s", self.name, spec.name, spec.version)

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        key = (spec.name, spec.version)
        runner = self._runners.get(key)
        if runner is None or not self._ready:
            raise BackendUnavailable(f"model {spec.name!r} version {spec.version} is not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executors[key], runner, batch)

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._ready = False
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._runners.clear()
        self._executors.clear()
