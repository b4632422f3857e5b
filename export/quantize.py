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

Weights use 7 of their 8 bits (``reduce_range``), for both activation types, so that one
file gives the same answers on every CPU. ONNX Runtime's u8s8 kernels on AVX2, and on
AVX-512 without VNNI, add pairs of u8 x s8 products in 16 bits with saturation
(VPMADDUBSW); VNNI and AMX accumulate exactly. With 8-bit weights a pair reaches
2 x 255 x 127 = 64770 and saturates at 32767: measured on the digits demo on AVX2, the
kernels' top-1 then agreed with the exact result on 98.4 % (u8s8) and 96.7 % (s8s8, which
ORT runs through the same u8 kernels) of the held-out images, with logits off by 36-49 %
of the largest. With 7-bit weights a pair is at most 2 x 255 x 64 = 32640: nothing
saturates, every path computes the exact result (100 % top-1, logits within 0.6-0.8 %), and
AVX2 runs ResNet-50 at 2.15x FP32 against 2.12x for the saturating file (ORT's quantization
guide names reduce_range as the remedy). u8u8 is exact too but only 1.49x. TensorRT
accumulates exactly with either range; 7-bit weights cost it a little resolution, which its
own accuracy gate measures, and keep its ONNX file servable by any CPU node.

FP16 converts weights and compute to float16 and keeps the graph's inputs and outputs as
they were (float32 planes or uint8 pixels in, float32 logits out), so the contract and
every client stay unchanged.
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
from service.model.contract import Int8Scheme, PreprocessContract

#: What an export publishes (the contract's ``precision``); bf16 is the FP32 graph, computed
#: in BF16 where the CPU can (export.precision).
Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "bf16", "int8")
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
    """Write the INT8 QDQ model of ``src`` to ``dst``; return the settings for the report
    (``scheme``: the contract's ``int8_scheme``)."""
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
                nodes_to_exclude=_before_first_conv(prepared, contract.input_name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: exact on every x86 kernel path
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
    scheme: Int8Scheme = "s8s8-reduce-range" if symmetric_activations else "u8s8-reduce-range"
    return {
        "scheme": scheme,
        "format": "QDQ",
        "weights": "int8 per-channel symmetric, 7-bit range (reduce_range)",
        "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
        "calibration_method": method,
        **({"percentile": PERCENTILE} if method == "percentile" else {}),
        "calibration_images": len(calibration),
    }


def _before_first_conv(path: Path, input_name: str) -> list[str]:
    """The nodes between the graph's input and its first convolution: a uint8 graph's
    normalization (export.onnx_export.PixelInput). They stay float: quantizing them with a
    calibrated scale would only round pixels that are exact integers. A float-input graph
    has none: its input goes straight to a Conv."""
    import onnx

    graph = onnx.load(str(path)).graph
    reached, names = {input_name}, []
    for node in graph.node:  # topological order
        if node.op_type == "Conv":
            break
        if reached.intersection(node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


def convert_fp16(src: Path, dst: Path, contract: PreprocessContract) -> dict[str, Any]:
    """Write ``src`` with FP16 weights and compute, its inputs and outputs unchanged (the
    contract's input, FP32 logits), to ``dst``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter appends the input Casts after the nodes that read them; the ONNX spec
    # (and onnx.checker) wants topological order.
    _sort_topologically(model.graph)
    onnx.save(model, str(dst))
    return {"weights": "fp16", "compute": "fp16", "inputs": contract.dtype, "outputs": "float32"}


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
