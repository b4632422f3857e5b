"""The preprocessing contract: ``preprocess.json`` in every model version of the repository.

Export writes it from the model's spec; the gateway (and anything else that feeds the
model) derives its whole input pipeline from it. This module is the one definition both
halves import, so a field cannot mean one thing to export and another to the gateway.

The pipeline it describes, in order (the same as torchvision's classic eval transform):

1. decode, apply EXIF orientation, convert to ``channels`` (see ``service.dataplane.preprocess``);
2. resize so the shorter side is ``resize`` pixels (aspect ratio kept, the longer side
   truncated to an integer the way torchvision does), with ``interpolation``;
3. center-crop ``crop`` x ``crop``;
4. scale to 0..1, subtract ``mean``, divide by ``std`` (per channel);
5. lay out as ``layout`` with ``dtype``; a batch axis of its own comes first.

With ``dtype`` uint8 (``layout`` NHWC) step 4 is the graph's: its input is the cropped
image's 8-bit pixels as decoded, and its first nodes normalize them with the same
``mean`` and ``std`` (export.onnx_export.PixelInput). The gateway then does no float work
per pixel, and a batch to Triton is a quarter of the bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: The class names file of a model (Triton's label_filename); see service.model.repository.
LABELS_FILENAME = "labels.txt"


class ContractError(ValueError):
    """A preprocess.json that cannot be read or does not describe a usable model."""


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as one line: ``field: message; field: message``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


#: The input's dtype -> its layout: normalized planes, or the pixels as decoded.
LAYOUTS = {"float32": "NCHW", "uint8": "NHWC"}
#: The input's dtype -> its KServe v2 / Triton datatype name.
DATATYPES = {"float32": "FP32", "uint8": "UINT8"}


def input_fields(dtype: str) -> dict[str, str]:
    """The contract fields of an input dtype: ``{"dtype": ..., "layout": ...}``."""
    return {"dtype": dtype, "layout": LAYOUTS[dtype]}


#: How an INT8 graph is quantized (export.quantize): activations x weights, 7-bit weights.
Int8Scheme = Literal["u8s8-reduce-range", "s8s8-reduce-range"]


class PreprocessContract(BaseModel):
    """What a model expects as input and what its output means."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    arch: str = Field(description="Registry name of the network, e.g. resnet50.")
    input_name: str = Field(description="Name of the ONNX/Triton input tensor.")
    output_name: str = Field(description="Name of the ONNX/Triton output tensor (logits).")
    layout: Literal["NCHW", "NHWC"] = Field(
        default="NCHW",
        description="NCHW: normalized planes (float32). NHWC: pixels as decoded (uint8).",
    )
    dtype: Literal["float32", "uint8"] = Field(
        default="float32",
        description="float32: the gateway normalizes. uint8: the graph normalizes the "
        "8-bit pixels with mean and std in its first nodes.",
    )
    channels: Literal["RGB", "L"] = Field(
        description="Colour model the network was trained on: RGB (3 planes) or L (1 plane)."
    )
    resize: int = Field(gt=0, le=4096, description="Shorter side after resizing, in pixels.")
    crop: int = Field(gt=0, le=4096, description="Side of the square center crop, in pixels.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, ...] = Field(description="Per-channel mean, in 0..1 units.")
    std: tuple[float, ...] = Field(description="Per-channel standard deviation, in 0..1 units.")
    num_classes: int = Field(gt=0)
    labels_file: str = LABELS_FILENAME
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        default="fp32",
        description="What the version's graph computes in. bf16: the FP32 graph, proved "
        "in BF16 against FP32, served in BF16 where the CPU has BF16 instructions (with "
        "OpenVINO) and exactly in FP32 elsewhere.",
    )
    int8_scheme: Int8Scheme | None = Field(
        default=None,
        description="INT8 only: activations x weights (u8s8: uint8 activations for ONNX "
        "Runtime's CPU kernels, s8s8: symmetric for TensorRT), weights in 7 bits (reduce "
        "range) so that every x86 kernel path computes the exact result. None for other "
        "precisions and for INT8 versions exported before the scheme was recorded.",
    )
    source_sha256: str | None = Field(
        default=None, description="sha256 of the checkpoint the model was exported from."
    )

    @model_validator(mode="after")
    def _check(self) -> PreprocessContract:
        n = len(self.channels)
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(
                f"mean and std need {n} value(s) for channels {self.channels!r}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.layout != LAYOUTS[self.dtype]:
            raise ValueError(
                f"dtype {self.dtype} goes with layout {LAYOUTS[self.dtype]}, not {self.layout}"
            )
        if self.int8_scheme is not None and self.precision != "int8":
            raise ValueError(f"int8_scheme is for INT8 models, not {self.precision}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) cannot exceed resize ({self.resize})")
        return self

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image tensor, without the batch axis."""
        if self.layout == "NHWC":
            return (self.crop, self.crop, self.num_channels)
        return (self.num_channels, self.crop, self.crop)

    @property
    def datatype(self) -> str:
        """The input's datatype as KServe v2 and Triton name it (FP32, UINT8)."""
        return DATATYPES[self.dtype]

    def same_io(self, other: PreprocessContract) -> bool:
        """Whether ``other`` takes the same input tensors from the same images and answers
        with the same classes (it may differ in weights, precision, architecture): what a
        shadow of this model must do to be fed its tensors and compared with it."""
        mine = {"arch", "precision", "int8_scheme", "source_sha256"}
        return self.model_dump(exclude=mine) == other.model_dump(exclude=mine)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> PreprocessContract:
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise ContractError(f"{path}: missing") from exc
        except OSError as exc:  # unreadable to the gateway's user, a directory...
            raise ContractError(f"{path}: {exc.strerror or exc}") from exc
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            raise ContractError(f"{path}: not a valid preprocessing contract ({detail})") from exc


def read_labels(path: Path) -> list[str]:
    """One class name per line; trailing blank lines are ignored, blank names are not allowed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: missing") from exc
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise ContractError(f"{path}: {exc.strerror or exc}") from exc
    labels = text.rstrip().splitlines()
    if any(not label.strip() for label in labels):
        raise ContractError(f"{path}: blank line (every class needs a name)")
    return labels
