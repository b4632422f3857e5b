"""OpenVINO in this process: the embedded backend's other engine (``ENGINE=openvino``), on
the same model.onnx as ONNX Runtime (an optional extra: ``resnet-serving[openvino]``).

What it computes in is set for every version, never left to OpenVINO: on a CPU with BF16
instructions OpenVINO's default runs an FP32 graph in BF16, which would make a version's
answers depend on the node it lands on. A version is computed in FP32
(``INFERENCE_PRECISION_HINT=f32``; INT8 versions keep their INT8 kernels, the rest of
their graph FP32), except a BF16 version (``precision: bf16`` in its contract: the FP32
graph, proved in BF16 at export) on a CPU with BF16 instructions
(service.host.cpus.has_bf16), which is computed in BF16; on any other CPU it is served
exactly in FP32, and says so (:meth:`OpenVinoBackend.served_precision`).
"""

from __future__ import annotations

import queue
import re
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from service.backends.embedded import EmbeddedBackend, Runner, check_tensors, refusal
from service.host.cpus import cpu_isa, has_bf16
from service.model.repository import ModelSpec, TensorSig

#: OpenVINO's element types in protocol terms.
_DATATYPES = {"f32": "FP32", "f16": "FP16", "f64": "FP64", "u8": "UINT8", "bf16": "BF16"}

#: The source locations OpenVINO puts before its messages ("Exception from src/...:84:",
#: "Check 'x' failed at src/...:563:").
_LOCATION = re.compile(r"^(Exception from \S+|Check '.*' failed at \S+)$")


def _reason(exc: BaseException) -> str:
    """OpenVINO's error as one line, without its source locations: ``FrontEnd API failed
    with OpConversionFailure: Model wasn't fully converted. ... No conversion rule found for
    operations: StringNormalizer-17``."""
    lines = (line.strip() for line in str(exc).splitlines())
    text = " ".join(line for line in lines if line and not _LOCATION.match(line))
    return text[:300] or type(exc).__name__


def _sigs(ports: list[Any]) -> list[TensorSig]:
    """A graph's tensors as OpenVINO reads them (f32, dynamic dims) in protocol terms."""
    sigs = []
    for port in ports:
        dtype = port.get_element_type().get_type_name()
        shape = port.get_partial_shape()
        dims = (
            ()
            if shape.rank.is_dynamic
            else tuple(-1 if d.is_dynamic else d.get_length() for d in shape)
        )
        sigs.append(TensorSig(port.get_any_name(), _DATATYPES.get(dtype, dtype), dims))
    return sigs


class OpenVinoBackend(EmbeddedBackend):
    name = "openvino"
    engine = "OpenVINO"

    def __init__(
        self,
        intra_op_threads: int = 0,
        parallel_batches: int = 0,
        cache_dir: Path | None = None,
        cpuinfo: Path = Path("/proc/cpuinfo"),
    ) -> None:
        """``parallel_batches`` are OpenVINO's streams (one infer request each), each
        batch on ``intra_op_threads`` threads (see :class:`EmbeddedBackend`). 0: as many as
        OpenVINO's THROUGHPUT hint picks for the first version over the usable CPUs (one
        single-threaded stream per core on 2 cores): a batch split over several threads in
        OpenVINO waits for the one a decoding process holds up, streams of their own do not
        (measured on 2 cores: docs/benchmarks.md, "Engines").
        ``cache_dir``: where OpenVINO keeps compiled models (a writable directory; None: every
        load compiles). ``cpuinfo``: where the CPU's flags are read."""
        super().__init__(intra_op_threads, parallel_batches)
        self._streams_from_hint = parallel_batches == 0
        self.kernels = cpu_isa(cpuinfo)
        self._bf16 = has_bf16(cpuinfo)
        self._cache_dir = cache_dir
        self._core = ov.Core()

    def served_precision(self, spec: ModelSpec) -> str:
        if spec.precision == "bf16" and self._bf16:
            return "bf16"
        return super().served_precision(spec)

    def _config(self, spec: ModelSpec, hint: bool = False) -> dict[str, Any]:
        """How a version is compiled: its precision, and this engine's streams and threads
        (``hint``: the streams left to OpenVINO's THROUGHPUT hint over the usable CPUs)."""
        sizing: dict[str, Any] = (
            {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": self.cpus}
            if hint
            else {
                "NUM_STREAMS": self.max_inflight_batches,
                "INFERENCE_NUM_THREADS": self._threads * self.max_inflight_batches,
            }
        )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.served_precision(spec) == "bf16" else "f32",
            **sizing,
            # A pinned thread waits while a decoding process holds its core; unpinned, the
            # scheduler moves it (ONNX Runtime's threads are not pinned either; pinned
            # streams measured no faster here).
            "ENABLE_CPU_PINNING": False,
            # A batch on several threads: its work handed out as the threads come free, not
            # in equal parts up front, so that a thread a decoding process holds up does not
            # stall the whole batch (measured on 2 cores: docs/benchmarks.md, "Engines").
            "TBB_PARTITIONER": "AUTO",
        }
        if self._cache_dir is not None:
            config["CACHE_DIR"] = str(self._cache_dir)
        return config

    def _compile(self, spec: ModelSpec, model: ov.Model) -> ov.CompiledModel:
        """The version compiled, the engine sized first where OpenVINO chooses its streams
        (the first version only: every later one gets the same streams and threads)."""
        try:
            if self._streams_from_hint:
                compiled = self._core.compile_model(model, "CPU", self._config(spec, hint=True))
                self._size(int(compiled.get_property("NUM_STREAMS")))
                self._streams_from_hint = False
                if self._threads * self.max_inflight_batches == int(
                    compiled.get_property("INFERENCE_NUM_THREADS")
                ):
                    return compiled  # as sized: ORT_INTRA_OP_THREADS unset
            return self._core.compile_model(model, "CPU", self._config(spec))
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for every failure
            raise refusal(spec, self.engine, _reason(exc)) from exc

    def _open(self, spec: ModelSpec) -> Runner:
        try:
            model = self._core.read_model(spec.model_path)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for every failure
            raise refusal(spec, self.engine, _reason(exc)) from exc
        check_tensors(spec, _sigs(model.inputs), _sigs(model.outputs))
        compiled = self._compile(spec, model)
        # One infer request per stream: each batch takes one that is free. The version has
        # as many threads as streams, so one is always free for the thread that asks.
        requests: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
        for _ in range(self.max_inflight_batches):
            requests.put(compiled.create_infer_request())
        c = spec.contract

        def run(batch: np.ndarray) -> np.ndarray:
            request = requests.get()
            try:
                # The logits are copied out (infer's share_outputs is off): the request's
                # buffers serve its next batch.
                return np.asarray(request.infer({c.input_name: batch})[0])
            finally:
                requests.put(request)

        return run
