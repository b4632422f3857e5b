"""ONNX Runtime in this process: the embedded backend's default engine, no server to run."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from service.backends.embedded import EmbeddedBackend, Runner, check_tensors, refusal
from service.errors import brief
from service.model.repository import ModelSpec, RepositoryError, TensorSig


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


class OnnxRuntimeBackend(EmbeddedBackend):
    name = "onnxruntime"
    engine = "ONNX Runtime"

    def __init__(
        self,
        intra_op_threads: int = 0,
        parallel_batches: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        """``parallel_batches`` runs of one session at once, each with ``intra_op_threads``
        (see :class:`EmbeddedBackend`; 0: one, on all the cores: the lowest latency, and
        throughput within the noise of two single-threaded runs, docs/benchmarks.md);
        ``providers``: ONNX Runtime's execution providers, in order of preference (default:
        its CPU kernels)."""
        super().__init__(intra_op_threads, parallel_batches)
        self._providers = providers or ["CPUExecutionProvider"]
        self._preloaded = False
        if self._providers[0] != "CPUExecutionProvider":
            self.cpus_per_batch = 0
            self.kernels = self._providers[0].removesuffix("ExecutionProvider")

    def _preload(self) -> None:
        """onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels (how the
        GPU image gets them: no CUDA toolkit in it) only once they are loaded; without those
        wheels it loads the system's. A no-op in the CPU package; once, before the first
        session."""
        if self._preloaded or not {
            "CUDAExecutionProvider",
            "TensorrtExecutionProvider",
        } & set(self._providers):
            return
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()
        self._preloaded = True

    def _open(self, spec: ModelSpec) -> Runner:
        self._preload()
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
            raise refusal(
                spec, self.engine, brief(exc).rpartition(" failed:")[2] or brief(exc)
            ) from exc
        # ORT falls back to the CPU, with only a log line, when a GPU provider fails to
        # start (no device, missing CUDA libraries): a GPU deployment must not run on the CPU.
        if self._providers[0] not in session.get_providers():
            raise RepositoryError(
                f"model {spec.name!r} version {spec.version}: ONNX Runtime could not start "
                f"{self._providers[0]} (it would run on {', '.join(session.get_providers())})"
                + (f": {why}" if (why := gpu_driver_missing()) else "")
            )
        check_tensors(spec, _sigs(session.get_inputs()), _sigs(session.get_outputs()))
        c = spec.contract

        def run(batch: np.ndarray) -> np.ndarray:
            return np.asarray(session.run([c.output_name], {c.input_name: batch})[0])

        return run
