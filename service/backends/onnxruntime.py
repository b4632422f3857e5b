"""The embedded backend: ONNX Runtime in this process, no server to run (the default)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from service.backends.base import Backend
from service.errors import BackendUnavailable, brief
from service.host.cpus import cpu_isa, usable_cpus
from service.model.repository import ModelSpec, RepositoryError, TensorSig, tensor_problems

log = logging.getLogger(__name__)


def _sigs(args: list[ort.NodeArg]) -> list[TensorSig]:
    """ORT's view of a graph's tensors ("tensor(float)", symbolic dims) in protocol terms."""
    types = {
        "tensor(float)": "FP32",
        "tensor(float16)": "FP16",
        "tensor(double)": "FP64",
        "tensor(uint8)": "UINT8",
    }
    return [
        TensorSig(
            a.name,
            types.get(a.type, a.type),
            tuple(d if isinstance(d, int) else -1 for d in a.shape),
        )
        for a in args
    ]


def gpu_driver_missing() -> str | None:
    """Why no CUDA provider can start here, where that is the driver: ONNX Runtime only logs
    it (libcuda.so.1 comes from the host's NVIDIA driver, which the NVIDIA container
    toolkit mounts into a container that asks for a GPU)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return (
            "no NVIDIA driver here (libcuda.so.1 not found): run on a GPU node, with the "
            "NVIDIA container toolkit giving the container a GPU"
        )
    return None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        intra_op_threads: int = 0,
        parallel_batches: int = 1,
        providers: list[str] | None = None,
    ) -> None:
        """``parallel_batches`` runs of one session at once, each with ``intra_op_threads``
        (default: the usable CPUs, :func:`service.host.cpus.usable_cpus`, divided among them).
        One batch on all cores gives the lowest latency; several single-threaded batches
        avoid stalling a whole batch whenever a decoding process takes one of its cores,
        which gives more throughput under load."""
        super().__init__()
        self.max_inflight_batches = max(1, parallel_batches)
        self._providers = providers or ["CPUExecutionProvider"]
        self._threads = intra_op_threads or max(1, usable_cpus() // self.max_inflight_batches)
        if self._providers[0] == "CPUExecutionProvider":
            self.cpus_per_batch = self._threads
            self.kernels = cpu_isa()
        else:
            self.kernels = self._providers[0].removesuffix("ExecutionProvider")
        # Per (model, version): versions of one model are served side by side.
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}
        # Threads that call session.run (the GIL is released while ORT computes).
        self._executors: dict[tuple[str, str], ThreadPoolExecutor] = {}
        self._ready = False

    def _open(self, spec: ModelSpec) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default, stealing the cores that decode images.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(spec.model_path), opts, providers=self._providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            # "[ONNXRuntimeError] : 1 : FAIL : Load model from <path> failed:<reason>"
            reason = brief(exc).rpartition(" failed:")[2] or brief(exc)
            raise RepositoryError(
                f"model {spec.name!r} version {spec.version}: ONNX Runtime cannot load it "
                f"({reason})"
            ) from exc
        # ORT falls back to the CPU, with only a log line, when a GPU provider fails to
        # start (no device, missing CUDA libraries): a GPU deployment must not run on the CPU.
        if self._providers[0] not in session.get_providers():
            raise RepositoryError(
                f"model {spec.name!r} version {spec.version}: ONNX Runtime could not start "
                f"{self._providers[0]} (it would run on {', '.join(session.get_providers())})"
                + (f": {why}" if (why := gpu_driver_missing()) else "")
            )
        c = spec.contract
        problems = tensor_problems(
            c, _sigs(session.get_inputs()), _sigs(session.get_outputs()), "graph"
        )
        if problems:
            raise RepositoryError(
                f"model {spec.name!r} version {spec.version}: " + "; ".join(problems)
            )
        return session

    async def start(self, specs: list[ModelSpec]) -> None:
        loop = asyncio.get_running_loop()
        if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(self._providers):
            # onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels (how
            # the GPU image gets them: no CUDA toolkit in it) only once they are loaded;
            # without those wheels it loads the system's. A no-op in the CPU package.
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                await loop.run_in_executor(None, preload)
        for spec in specs:
            await self.load(spec)
        self._ready = True

    async def load(self, spec: ModelSpec) -> None:
        key = (spec.name, spec.version)
        executor = ThreadPoolExecutor(
            self.max_inflight_batches, thread_name_prefix=f"ort-{spec.name}-{spec.version}"
        )
        try:
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(executor, self._open, spec)
            c = spec.contract

            def run(batch: np.ndarray) -> asyncio.Future[object]:
                return loop.run_in_executor(
                    executor, session.run, [c.output_name], {c.input_name: batch}
                )

            await self.warm_up(spec, run, serving=self._ready)
        except BaseException:
            executor.shutdown(wait=False)
            self._warm.pop(key, None)
            raise
        self._executors[key], self._sessions[key] = executor, session
        log.info("onnxruntime: loaded %s version %s", spec.name, spec.version)

    async def unload(self, spec: ModelSpec) -> None:
        key = (spec.name, spec.version)
        # Dropping the last reference frees the session (its weights and arenas).
        self._sessions.pop(key, None)
        self._warm.pop(key, None)
        executor = self._executors.pop(key, None)
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        log.info("onnxruntime: unloaded %s version %s", spec.name, spec.version)

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        key = (spec.name, spec.version)
        session = self._sessions.get(key)
        if session is None or not self._ready:
            raise BackendUnavailable(f"model {spec.name!r} version {spec.version} is not loaded")
        c = spec.contract
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(
            self._executors[key], session.run, [c.output_name], {c.input_name: batch}
        )
        return np.asarray(outputs[0])

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._ready = False
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._sessions.clear()
        self._executors.clear()
