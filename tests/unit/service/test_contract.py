from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.contract import PreprocessContract
from tests.conftest import TINY_CONTRACT


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
