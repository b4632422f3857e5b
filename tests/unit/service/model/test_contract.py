from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.model.contract import PreprocessContract
from tests.helpers.models import TINY_CONTRACT


def test_an_int8_scheme_belongs_to_int8_models_only():
    int8 = TINY_CONTRACT.model_copy(update={"precision": "int8"}).model_dump()
    scheme = PreprocessContract.model_validate({**int8, "int8_scheme": "u8s8-reduce-range"})
    assert scheme.int8_scheme == "u8s8-reduce-range"
    # An INT8 version exported before the scheme was recorded still reads.
    assert PreprocessContract.model_validate(int8).int8_scheme is None
    with pytest.raises(ValidationError, match="int8_scheme is for INT8 models, not fp32"):
        PreprocessContract.model_validate(
            {**TINY_CONTRACT.model_dump(), "int8_scheme": "u8s8-reduce-range"}
        )
    with pytest.raises(ValidationError, match="int8_scheme"):
        PreprocessContract.model_validate({**int8, "int8_scheme": "u8s8"})  # 8-bit: not ours
    # A shadow may differ from its primary in how it is quantized, not in what it takes.
    assert TINY_CONTRACT.same_io(scheme)


def test_an_input_dtype_goes_with_its_layout():
    pixels = PreprocessContract.model_validate(
        {**TINY_CONTRACT.model_dump(), "dtype": "uint8", "layout": "NHWC"}
    )
    assert (pixels.input_shape, pixels.datatype) == ((32, 32, 3), "UINT8")
    assert (TINY_CONTRACT.input_shape, TINY_CONTRACT.datatype) == ((3, 32, 32), "FP32")
    # A version published before the fields' second values existed reads as float planes.
    old = {k: v for k, v in TINY_CONTRACT.model_dump().items() if k not in ("dtype", "layout")}
    assert PreprocessContract.model_validate(old) == TINY_CONTRACT
    for dtype, layout, pair in (("uint8", "NCHW", "NHWC"), ("float32", "NHWC", "NCHW")):
        with pytest.raises(ValidationError, match=f"dtype {dtype} goes with layout {pair}"):
            PreprocessContract.model_validate(
                {**TINY_CONTRACT.model_dump(), "dtype": dtype, "layout": layout}
            )
    # Pixels and planes are different inputs: no shadow between them.
    assert not TINY_CONTRACT.same_io(pixels)


def test_bf16_is_a_precision_of_its_own():
    """A bf16 version (the FP32 graph, served in BF16 where the CPU has it) says so in its
    contract; it has no INT8 scheme, and a precision the gateway does not know is refused."""
    bf16 = PreprocessContract.model_validate({**TINY_CONTRACT.model_dump(), "precision": "bf16"})
    assert PreprocessContract.model_validate_json(bf16.to_json()).precision == "bf16"
    # Only what the weights compute in differs: a bf16 version may shadow an fp32 one.
    assert TINY_CONTRACT.same_io(bf16)
    with pytest.raises(ValidationError, match="int8_scheme is for INT8 models, not bf16"):
        PreprocessContract.model_validate({**bf16.model_dump(), "int8_scheme": "u8s8-reduce-range"})
    with pytest.raises(ValidationError, match="precision"):
        PreprocessContract.model_validate({**TINY_CONTRACT.model_dump(), "precision": "fp8"})
