"""FP32 ONNX -> INT8 (calibrated static quantization) or FP16, with ONNX Runtime's tools.

INT8 is QDQ static quantization (QuantizeLinear/DequantizeLinear pairs around each
quantized op): one file that ONNX Runtime runs with integer kernels on the CPU and that
TensorRT builds an explicitly quantized engine from. Weights are per-channel int8
(ResNet's filters differ in range by orders of magnitude within a layer; one scale per
tensor rounds the small ones away). Activations are calibrated on the user's real images,
preprocessed by the model's own contract, one batch at a time so that memory stays
bounded whatever the calibration count.

Activation types: uint8 with a zero point for ONNX Runtime on x86 (its u8s8 kernels are
the fast path, VNNI or not), symmetric int8 for TensorRT (which supports only symmetric
quantization).

FP16 converts weights and compute to float16 and keeps the graph's inputs and outputs
float32, so the contract (FP32 in, FP32 logits out) and every client stay unchanged.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.errors import ExportError
from export.images import progress
from service.contract import PreprocessContract

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
CalibrationMethod = Literal["percentile", "minmax", "entropy"]
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = ("percentile", "minmax", "entropy")
#: Percentile calibration clips activations at this percentile of |x|: ReLU networks have
#: rare large activations that min-max would spend most of the 256 levels on.
PERCENTILE = 99.999
DEFAULT_CALIBRATION_COUNT = 256
CALIBRATION_BATCH = 8


class _Batches:
    """ORT's CalibrationDataReader over preprocessed tensors, a batch per ``get_next``.

    ``set_range`` lets quantize_static collect one batch per pass (``CalibStridedMinMax``),
    which bounds the calibrator's memory for every method, histograms included."""

    def __init__(self, x: np.ndarray, input_name: str) -> None:
        self._batches = [
            {input_name: x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)
        ]
        self._next = self._end = 0
        self._shown = progress(range(len(self._batches)), "calibrating (batches)")

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        # A new pass: the previous one is done, so the progress line may count it.
        next(self._shown, None)
        self._next, self._end = start_index, min(end_index, len(self._batches))

    def finish(self) -> None:
        for _ in self._shown:  # the last pass, which no set_range follows
            pass

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return self._batches[self._next - 1]


def quantize_int8(
    src: Path,
    dst: Path,
    contract: PreprocessContract,
    calibration: np.ndarray,
    method: CalibrationMethod = "percentile",
    symmetric_activations: bool = False,
) -> dict[str, Any]:
    """Write the INT8 QDQ model of ``src`` to ``dst``; return the settings for the report."""
    from onnxruntime.quantization import CalibrationMethod as Method
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not len(calibration):
        raise ExportError("INT8 needs calibration images (--calibration-dir)")
    methods = {
        "percentile": Method.Percentile,
        "minmax": Method.MinMax,
        "entropy": Method.Entropy,
    }
    activation = QuantType.QInt8 if symmetric_activations else QuantType.QUInt8
    with tempfile.TemporaryDirectory(prefix="resnet-quant-") as tmp:
        # Shape inference and graph fusions first, as ORT's quantization guide asks: the
        # quantizer then sees the graph ORT will run.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        # ORT's calibrators print a line per collection pass; our progress line says more.
        with contextlib.redirect_stdout(io.StringIO()):
            reader = _Batches(calibration, contract.input_name)
            quantize_static(
                str(prepared),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={
                    "ActivationSymmetric": symmetric_activations,
                    "WeightSymmetric": True,
                    "CalibStridedMinMax": 1,  # one batch per collection pass: bounded memory
                    "CalibPercentile": PERCENTILE,
                },
            )
            reader.finish()
    return {
        "format": "QDQ",
        "weights": "int8 per-channel symmetric",
        "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
        "calibration_method": method,
        **({"percentile": PERCENTILE} if method == "percentile" else {}),
        "calibration_images": len(calibration),
    }


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` with FP16 weights and compute, FP32 inputs and outputs, to ``dst``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends the input Casts after the nodes that read them; the ONNX spec
    # (and onnx.checker) wants topological order.
    _sort_topologically(model.graph)
    onnx.save(model, str(dst))
    return {"weights": "fp16", "compute": "fp16", "inputs_outputs": "fp32"}


def _sort_topologically(graph: Any) -> None:
    """Reorder ``graph.node`` so that every node comes after the nodes it reads from."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ExportError("FP16 conversion produced a graph with a cycle")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
