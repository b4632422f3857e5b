"""The Open Inference Protocol without its wire format (service.transports.openinference):
Triton's BYTES serialization both ways, tensors from raw bytes and from JSON numbers, the
timeout parameter, outputs as either dialect writes them, and one request run on the data
plane: the outputs asked for, and every malformed request refused with the right error
before any work. The tiny model runs in the embedded backend, in process; the data plane
is not started (no decoding processes): tensors go straight to its batcher."""

from __future__ import annotations

import dataclasses
import math
import struct
import time

import numpy as np
import pytest

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.dataplane.plane import DataPlane
from service.errors import InvalidRequest, PayloadTooLarge, ServiceError, ValidationFailed
from service.model.repository import load_spec
from service.observability.metrics import Metrics
from service.settings import Settings
from service.transports.openinference import (
    InferInput,
    InferOutput,
    InferRequest,
    RequestedOutput,
    infer,
    number_input,
    parse_bytes,
    raw_input,
    serialize_bytes,
    timeout_from_us,
)

FP32_MAX = float(np.finfo(np.float32).max)

# --- BYTES ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items",
    [[], [b""], [b"", b""], [b"a"], [bytes(range(256)), "日本".encode(), b"\x00\x00\x00\x00"]],
)
def test_bytes_tensors_round_trip(items):
    assert parse_bytes(serialize_bytes(items)) == items


def test_bytes_elements_are_a_little_endian_uint32_length_then_the_bytes():
    assert serialize_bytes([b"ab", b"", b"xyz"]) == (
        b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x03\x00\x00\x00xyz"
    )
    big = b"x" * 300
    assert serialize_bytes([big])[:4] == struct.pack("<I", 300) == b"\x2c\x01\x00\x00"


@pytest.mark.parametrize(
    "blob",
    [
        b"\x05",  # a length cut short
        b"\x02\x00\x00",
        b"\x05\x00\x00\x00ab",  # fewer bytes than the length says
        b"\x02\x00\x00\x00ab\x01",  # a second element's length cut short
        b"\xff\xff\xff\xff",  # 4 GiB announced
    ],
)
def test_malformed_bytes_data_is_an_invalid_request(blob):
    with pytest.raises(InvalidRequest) as info:
        parse_bytes(blob)
    assert info.value.message == "malformed BYTES tensor data"
    assert (info.value.http_status, info.value.code) == (400, "invalid_request")


# --- inputs -----------------------------------------------------------------------------------


def test_raw_fp32_and_uint8_data_is_read_little_endian():
    values = np.array([1.5, -2.0, FP32_MAX], np.float32)
    fp32 = raw_input("input", "FP32", [1, 3], values.astype("<f4").tobytes())
    np.testing.assert_array_equal(fp32.data, values)
    assert not np.array_equal(
        raw_input("input", "FP32", [1, 3], values.astype(">f4").tobytes()).data, values
    )
    pixels = raw_input("input", "UINT8", [4], bytes([0, 1, 128, 255]))
    assert pixels.data.dtype == np.uint8 and pixels.data.tolist() == [0, 1, 128, 255]
    images = raw_input("images", "BYTES", [2], serialize_bytes([b"png1", b"png2"]))
    assert images.data == [b"png1", b"png2"]


def test_raw_data_that_is_not_whole_values_is_refused():
    with pytest.raises(InvalidRequest, match=r"input 'input': 7 bytes is not a whole FP32 tensor"):
        raw_input("input", "FP32", [1, 2], bytes(7))


def test_an_unsupported_raw_datatype_is_kept_for_infer_to_refuse_by_name():
    got = raw_input("input", "INT64", [1, 1], bytes(8))
    assert got.datatype == "INT64" and isinstance(got.data, np.ndarray) and got.data.size == 0


def test_json_numbers_nested_or_flat_are_read_row_major():
    nested = number_input("input", "FP32", [2, 2, 2], [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]])
    flat = number_input("input", "FP32", [2, 2, 2], [1, 2, 3, 4, 5, 6, 7, 8.5])
    assert nested.data.dtype == np.float32
    assert nested.data.tolist() == flat.data.tolist() == [1, 2, 3, 4, 5, 6, 7, 8.5]
    assert number_input("input", "FP32", [1], [FP32_MAX]).data.tolist() == [FP32_MAX]
    pixels = number_input("input", "UINT8", [3], [0, 17, 255])
    assert pixels.data.dtype == np.uint8 and pixels.data.tolist() == [0, 17, 255]


@pytest.mark.parametrize(
    ("datatype", "values", "message"),
    [
        ("FP32", [1.0, True], "data must be a (nested) list of numbers"),
        ("FP32", [1.0, "2"], "data must be a (nested) list of numbers"),
        ("FP32", [1.0, None], "data must be a (nested) list of numbers"),
        ("FP32", [1.0, [2.0]], "data must be a (nested) list of numbers"),
        ("FP32", [[1.0], [{"x": 1}]], "data must be a (nested) list of numbers"),
        ("FP32", [1.0, 3.5e38], "a value is out of FP32 range"),
        ("FP32", [-3.5e38], "a value is out of FP32 range"),
        ("FP32", [10**400], "a value is out of FP32 range"),  # beyond any float
        ("UINT8", [256], "UINT8 values are integers from 0 to 255"),
        ("UINT8", [-1], "UINT8 values are integers from 0 to 255"),
        ("UINT8", [1.0], "UINT8 values are integers from 0 to 255"),
        ("UINT8", [False], "data must be a (nested) list of numbers"),
    ],
)
def test_json_data_that_is_not_the_datatypes_numbers_is_refused(datatype, values, message):
    with pytest.raises(InvalidRequest) as info:
        number_input("input", datatype, [len(values)], values)
    assert info.value.message == f"input 'input': {message}"


@pytest.mark.parametrize("data", [[[1.0], 2.0], [[[1.0]], [2.0]]])
def test_a_ragged_nesting_is_refused_not_cut_short(data):
    """[[1.0], 2.0] once became [1.0]: a malformed tensor whose kept values fit its shape."""
    with pytest.raises(InvalidRequest, match="data must be a \\(nested\\) list of numbers"):
        number_input("input", "FP32", [1, 1], data)


@pytest.mark.parametrize(("value", "seconds"), [(None, None), (1, 1e-6), (2_500_000, 2.5)])
def test_the_timeout_parameter_is_in_microseconds(value, seconds):
    assert timeout_from_us(value) == seconds


@pytest.mark.parametrize("value", [0, -5, True, "1000", math.nan, [1000]])
def test_a_timeout_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(ValidationFailed) as info:
        timeout_from_us(value)
    assert info.value.message.startswith("timeout must be a positive number of microseconds, got")
    assert (info.value.http_status, info.value.code) == (422, "validation_failed")


# --- outputs ----------------------------------------------------------------------------------


def test_an_fp32_output_as_raw_bytes_and_as_json_values():
    data = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    out = InferOutput("logits", "FP32", [2, 2], data)
    assert out.raw() == data.astype("<f4").tobytes()
    assert out.values() == [1.5, -2.0, 0.25, 3.0]  # row-major, flat
    # Any layout it was computed in is sent row-major.
    assert InferOutput("logits", "FP32", [2, 2], np.asfortranarray(data)).raw() == out.raw()


def test_a_bytes_output_as_raw_bytes_and_as_json_strings():
    out = InferOutput("logits", "BYTES", [1, 2], [b"0.5:3:cat", "0.1:7:ünï".encode()])
    assert out.raw() == serialize_bytes([b"0.5:3:cat", "0.1:7:ünï".encode()])
    assert out.values() == ["0.5:3:cat", "0.1:7:ünï"]


# --- a request on the data plane -------------------------------------------------------------


@pytest.fixture
async def plane(tiny):
    spec = load_spec(tiny.model_dir)
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    await backend.start([spec])
    settings = Settings(repository=tiny.repository, max_images_per_request=4, max_batch_delay_ms=0)
    plane = DataPlane([spec], backend, settings, Metrics())
    for version in plane.served():
        version.batcher.start()
    yield plane
    await plane.close()
    await backend.close()


def tensor(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def fp32(x: np.ndarray, name: str = "input") -> InferInput:
    return raw_input(name, "FP32", list(x.shape), x.tobytes())


def statistics(plane: DataPlane) -> dict:
    (stats,) = plane.statistics("tiny", "1")
    return stats


async def test_a_tensor_is_answered_with_the_models_logits(plane):
    x = tensor(3)
    expected = await plane.backend.infer(plane.spec("tiny"), x, 5.0)
    request = InferRequest("tiny", None, [fp32(x)], id="req-7")
    response = await infer(plane, request, time.perf_counter())
    assert (response.model_name, response.model_version, response.id) == ("tiny", "1", "req-7")
    (out,) = response.outputs
    assert (out.name, out.datatype, out.shape) == ("logits", "FP32", [3, 10])
    np.testing.assert_allclose(out.data, expected, atol=1e-6)
    stats = statistics(plane)
    assert stats["inference_count"] == 3
    assert stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_stats"]["compute_output"]["count"] == 1
    assert stats["inference_stats"]["fail"]["count"] == 0


async def test_the_logits_and_the_best_classes_together_each_with_its_parameters(plane):
    x = tensor(2, seed=1)
    request = InferRequest(
        "tiny",
        "1",
        [fp32(x)],
        outputs=[
            RequestedOutput("logits", parameters={"binary_data": True}),
            RequestedOutput("logits", class_count=3, parameters={"binary_data": False}),
        ],
    )
    logits_out, classes_out = (await infer(plane, request, time.perf_counter())).outputs
    assert (logits_out.datatype, logits_out.shape) == ("FP32", [2, 10])
    assert logits_out.parameters == {"binary_data": True}
    assert (classes_out.datatype, classes_out.shape) == ("BYTES", [2, 3])
    assert classes_out.parameters == {"binary_data": False}
    logits = np.asarray(logits_out.data)
    labels = plane.spec("tiny").labels
    entries = classes_out.values()
    for row in range(2):
        best = np.argsort(-logits[row], kind="stable")[:3]
        parsed = [entries[row * 3 + k].split(":") for k in range(3)]  # "value:index:label"
        assert [int(i) for _, i, _ in parsed] == best.tolist()  # best first
        assert [label for _, _, label in parsed] == [labels[i] for i in best]
        assert [float(v) for v, _, _ in parsed] == pytest.approx(logits[row, best], abs=1e-6)


def infinite() -> np.ndarray:
    """One image with one infinite value (raw bytes carry it; JSON cannot)."""
    x = tensor(1)
    x[0, 1, 2, 3] = np.inf
    return x


def _bytes_input(shape: list[int]) -> InferInput:
    return InferInput("images", "BYTES", shape, [b"\x89PNG"])


REFUSED = {
    "no input": (dict(inputs=[]), InvalidRequest, "model 'tiny' takes exactly one input, got 0"),
    "two inputs": (
        dict(inputs=[fp32(tensor(1)), fp32(tensor(1))]),
        InvalidRequest,
        "model 'tiny' takes exactly one input, got 2",
    ),
    "unknown output": (
        dict(outputs=[RequestedOutput("probs")]),
        InvalidRequest,
        "unknown output 'probs'; model 'tiny' has 'logits'",
    ),
    "class_count above the classes": (
        dict(outputs=[RequestedOutput("logits", class_count=11)]),
        ValidationFailed,
        "class_count must be an integer between 1 and 10 for model 'tiny', got 11",
    ),
    "another input name": (
        dict(inputs=[fp32(tensor(1), name="pixels")]),
        InvalidRequest,
        "unexpected input 'pixels': model 'tiny' takes 'input' (FP32) or a BYTES input of "
        "encoded images",
    ),
    "another datatype": (
        dict(inputs=[raw_input("input", "INT64", [1, 3, 32, 32], bytes(8 * 3072))]),
        InvalidRequest,
        "input 'input' must be FP32, got 'INT64'",
    ),
    "no image in the batch": (
        dict(inputs=[raw_input("input", "FP32", [0, 3, 32, 32], b"")]),
        InvalidRequest,
        "input 'input' has shape [0, 3, 32, 32]; expected [n, 3, 32, 32]",
    ),
    "no batch dimension": (
        dict(inputs=[raw_input("input", "FP32", [3, 32, 32], tensor(1).tobytes())]),
        InvalidRequest,
        "input 'input' has shape [3, 32, 32]; expected [n, 3, 32, 32]",
    ),
    "more images than allowed": (
        dict(inputs=[fp32(tensor(5))]),
        PayloadTooLarge,
        "5 images in one request; the limit is 4",
    ),
    "fewer values than the shape": (
        dict(inputs=[raw_input("input", "FP32", [2, 3, 32, 32], tensor(1).tobytes())]),
        InvalidRequest,
        "input 'input': 3072 values for shape [2, 3, 32, 32]",
    ),
    "an infinite value": (
        dict(inputs=[fp32(infinite())]),
        InvalidRequest,
        "input 'input' holds NaN or infinite values",
    ),
    "BYTES shape of other elements": (
        dict(inputs=[_bytes_input([2])]),
        InvalidRequest,
        "BYTES input shape [2] does not match its 1 elements",
    ),
    "BYTES shape not a column": (
        dict(inputs=[_bytes_input([1, 2])]),
        InvalidRequest,
        "BYTES input shape [1, 2] does not match its 1 elements",
    ),
    "an endless timeout": (
        dict(timeout_s=math.inf),
        ValidationFailed,
        "the request timeout must be at least 0.001 seconds, got inf",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_a_malformed_request_is_refused_before_any_work(plane, case):
    changes, error, message = REFUSED[case]
    request = dataclasses.replace(InferRequest("tiny", None, [fp32(tensor(1))]), **changes)
    with pytest.raises(ServiceError) as info:
        await infer(plane, request, time.perf_counter())
    assert type(info.value) is error and info.value.message == message
    stats = statistics(plane)
    assert (stats["inference_count"], stats["execution_count"]) == (0, 0)  # nothing ran
