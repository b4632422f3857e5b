"""Request and response bodies of the REST API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.contract import PreprocessContract


class ImageB64(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(description="The encoded image file (JPEG, PNG, ...), base64.")


class ClassifyJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageB64] = Field(min_length=1, description="One or more images.")
    top_k: int | None = Field(None, description="Classes per image (default 5).")


class PredictionOut(BaseModel):
    index: int = Field(description="Class index (row of labels.txt).")
    label: str
    score: float = Field(description="Softmax probability.")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[list[PredictionOut]] = Field(
        description="One list per image, in request order, best class first."
    )


class ModelSummary(BaseModel):
    name: str
    version: str
    arch: str
    num_classes: int
    labels_count: int
    max_batch_size: int
    precision: str
    backend: str
    default: bool


class ModelDetail(ModelSummary):
    contract: PreprocessContract


class ModelList(BaseModel):
    models: list[ModelSummary]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody
