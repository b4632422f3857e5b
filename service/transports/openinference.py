"""The Open Inference Protocol (KServe v2) without its wire format: what a request and a
response hold, and how one runs on the data plane. The HTTP adapter (JSON and the binary
tensor extension) and the gRPC adapter (``inference.GRPCInferenceService``) only convert
to and from these types, so both answer the same thing for the same tensor, and what
Triton answers: ``tritonclient`` works against either unchanged.

What a model takes and gives:

* one input: the model's own FP32 tensor ``[n, C, H, W]`` (named as in the contract), or a
  BYTES tensor ``[n]`` / ``[n, 1]`` of encoded image files (any name; ``images`` by
  convention), which the gateway decodes and preprocesses by the contract first;
* one output: the logits, FP32 ``[n, classes]``; with the classification extension
  (``class_count`` k), BYTES ``[n, k]`` of ``"value:index:label"`` strings, best first.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import __version__
from service.dataplane.plane import DataPlane, Plan
from service.dataplane.scores import top_indices
from service.errors import InvalidRequest, ValidationFailed, cut
from service.model.contract import DATATYPES
from service.model.repository import ModelSpec, TensorSig, contract_tensors

SERVER_NAME = "resnet-serving"
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
_FP32_MAX = float(np.finfo(np.float32).max)
#: The tensor datatypes a model's input may have (its contract's dtype), as they arrive
#: (the protocol's byte order: little-endian).
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype).newbyteorder("<") for dtype, name in DATATYPES.items()
}


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: list[int]
    #: BYTES: the elements, as a list. FP32 / UINT8: the values (an array, any layout;
    #: reshaped to ``shape``); an empty one where the datatype is unsupported.
    data: np.ndarray | list[bytes]


@dataclass
class RequestedOutput:
    name: str
    #: The classification extension: the k best classes instead of the logits (0: off).
    class_count: int = 0
    #: Wire-specific options (the HTTP binary extension's ``binary_data``).
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)

    def raw(self) -> bytes:
        """The tensor's bytes as the protocol's raw/binary form carries them."""
        if isinstance(self.data, np.ndarray):
            return np.ascontiguousarray(self.data, dtype="<f4").tobytes()
        return serialize_bytes(self.data)

    def values(self) -> list[Any]:
        """The tensor as JSON values (row-major, flat)."""
        if isinstance(self.data, np.ndarray):
            return list(self.data.ravel().tolist())
        return [b.decode() for b in self.data]


@dataclass
class InferRequest:
    model: str
    version: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    #: The request's own deadline (the protocol's ``timeout`` parameter, or the call's).
    timeout_s: float | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None


# --- from the wire ----------------------------------------------------------------------------


def parse_bytes(blob: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element a little-endian uint32 length + bytes."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise InvalidRequest("malformed BYTES tensor data")
        (size,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + size > len(blob):
            raise InvalidRequest("malformed BYTES tensor data")
        out.append(blob[pos : pos + size])
        pos += size
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def raw_input(name: str, datatype: str, shape: list[int], raw: bytes) -> InferInput:
    """An input whose data came in the raw/binary form."""
    if datatype == "BYTES":
        return InferInput(name, datatype, shape, parse_bytes(raw))
    dtype = TENSOR_DTYPES.get(datatype)
    if dtype is None:  # refused, by name, in infer()
        return InferInput(name, datatype, shape, np.empty(0, np.float32))
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(
            f"input {cut(name)}: {len(raw)} bytes is not a whole {datatype} tensor"
        )
    return InferInput(name, datatype, shape, np.frombuffer(raw, dtype=dtype))


def number_input(name: str, datatype: str, shape: list[int], values: list[Any]) -> InferInput:
    """An FP32 or UINT8 input whose data came as JSON numbers (flat or nested, row-major)."""
    not_numbers = InvalidRequest(f"input {cut(name)}: data must be a (nested) list of numbers")
    flat: list[Any] = values
    while flat and isinstance(flat[0], list):
        # A level mixing lists and numbers ([[1.0], 2.0]) is malformed, not to be cut short.
        if not all(isinstance(row, list) for row in flat):
            raise not_numbers
        flat = [v for row in flat for v in row]
    # bool is an int subclass, and json gives arbitrarily large ints: neither is an FP32.
    if any(type(v) not in (int, float) for v in flat):
        raise not_numbers
    try:
        arr = np.asarray(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond any float
        arr = np.array([_FP32_MAX * 2])
    if datatype == "UINT8":
        if any(type(v) is not int for v in flat) or ((arr < 0) | (arr > 255)).any():
            raise InvalidRequest(f"input {cut(name)}: UINT8 values are integers from 0 to 255")
        return InferInput(name, datatype, shape, arr.astype(np.uint8))
    if (np.abs(arr[np.isfinite(arr)]) > _FP32_MAX).any():  # NaN and inf: refused later
        raise InvalidRequest(f"input {cut(name)}: a value is out of FP32 range")
    return InferInput(name, datatype, shape, arr.astype(np.float32))


def timeout_from_us(value: Any) -> float | None:
    """The protocol's ``timeout`` parameter (microseconds) in seconds; None if absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValidationFailed(f"timeout must be a positive number of microseconds, got {value!r}")
    return float(value) / 1e6


# --- running it -------------------------------------------------------------------------------


async def _input_batch(plane: DataPlane, plan: Plan, inp: InferInput) -> tuple[np.ndarray, bool]:
    """The model's input batch, and whether it was decoded (then admitted) by the plane."""
    c = plan.spec.contract
    if isinstance(inp.data, list):  # BYTES: encoded images
        n = len(inp.data)
        if inp.shape not in ([n], [n, 1]):
            raise InvalidRequest(f"BYTES input shape {inp.shape} does not match its {n} elements")
        return await plane.decode(plan, inp.data), True
    if inp.name != c.input_name:
        raise InvalidRequest(
            f"unexpected input {cut(inp.name)}: model {cut(plan.spec.name)} takes "
            f"{c.input_name!r} ({c.datatype}) or a BYTES input of encoded images"
        )
    if inp.datatype != c.datatype:
        raise InvalidRequest(f"input {cut(inp.name)} must be {c.datatype}, got {cut(inp.datatype)}")
    want = list(c.input_shape)
    if len(inp.shape) != 4 or inp.shape[1:] != want or inp.shape[0] < 1:
        raise InvalidRequest(
            f"input {inp.name!r} has shape {inp.shape}; expected [n, {', '.join(map(str, want))}]"
        )
    plane.check_count(inp.shape[0])
    if inp.data.size != math.prod(inp.shape):
        raise InvalidRequest(f"input {inp.name!r}: {inp.data.size} values for shape {inp.shape}")
    batch = inp.data.reshape(inp.shape)
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise InvalidRequest(f"input {inp.name!r} holds NaN or infinite values")
    return batch, False


def _output(plan: Plan, logits: np.ndarray, out: RequestedOutput) -> InferOutput:
    if not out.class_count:
        return InferOutput(out.name, "FP32", list(logits.shape), logits, out.parameters)
    idx = top_indices(logits, out.class_count)
    vals = np.take_along_axis(logits, idx, axis=1)
    labels = plan.spec.labels
    strings = [
        f"{v:f}:{i}:{labels[i]}".encode()
        for row_v, row_i in zip(vals, idx, strict=True)
        for v, i in zip(row_v, row_i, strict=True)
    ]
    return InferOutput(out.name, "BYTES", [len(logits), out.class_count], strings, out.parameters)


async def infer(plane: DataPlane, req: InferRequest, arrived: float) -> InferResponse:
    """Run one inference request (everything checked before any work is done)."""
    plan = plane.plan(req.model, version=req.version, timeout_s=req.timeout_s, arrived=arrived)
    c = plan.spec.contract
    if len(req.inputs) != 1:
        raise InvalidRequest(
            f"model {cut(plan.spec.name)} takes exactly one input, got {len(req.inputs)}"
        )
    outputs = req.outputs or [RequestedOutput(c.output_name)]
    for out in outputs:
        if out.name != c.output_name:
            raise InvalidRequest(
                f"unknown output {cut(out.name)}; model {cut(plan.spec.name)} has {c.output_name!r}"
            )
        if out.class_count:  # the same rule as top_k everywhere: 1..num_classes
            plane.with_top_k(plan, out.class_count, "class_count")
    batch, decoded = await _input_batch(plane, plan, req.inputs[0])
    logits = await plane.infer(plan, batch, decoded=decoded)
    output_started = time.perf_counter()
    response = InferResponse(
        plan.spec.name, plan.spec.version, [_output(plan, logits, o) for o in outputs], req.id
    )
    plane.succeeded(plan, output_started)
    return response


# --- describing -------------------------------------------------------------------------------


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(plane: DataPlane, spec: ModelSpec) -> dict[str, Any]:
    """The version's name and versions as its summary says them, the platform and the
    tensors of its spec, and (as ``parameters``, which the protocol's REST schema allows in
    model metadata and KServe's and MLServer's servers answer) what runs it: the backend,
    the precision export proved and the one its batches are computed in, the kernels.
    Triton's gRPC ``ModelMetadataResponse`` has no parameters field: the gRPC transport
    leaves them out (the ``Classifier``'s ``ListModels`` says the same)."""
    summary = plane.summary(spec)
    inputs, outputs = contract_tensors(spec.contract)

    def tensors(sigs: list[TensorSig]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in sigs]

    return {
        "name": summary.name,
        "versions": summary.versions,
        "platform": spec.platform,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
        "parameters": {
            "backend": summary.backend,
            "precision": summary.precision,
            "served_precision": summary.served_precision,
            "kernels": summary.kernels,
        },
    }
