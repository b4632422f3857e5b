"""Request and response bodies of the HTTP APIs (REST /v1 and KServe v2), for parsing and
for the OpenAPI document. A model's summary is the data plane's own declaration
(:class:`~service.dataplane.summary.ModelSummary`), answered as it is."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.dataplane.summary import ModelSummary
from service.model.contract import PreprocessContract

# --- REST /v1 -----------------------------------------------------------------------------


class ImageB64(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(
        description="The encoded image file (JPEG, PNG, ...), base64.",
        json_schema_extra={"contentEncoding": "base64", "pattern": "^[A-Za-z0-9+/]*={0,2}$"},
    )


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


class VersionState(BaseModel):
    version: str
    state: str = Field(description="serving, retiring (finishing its last requests) or failed.")
    precision: str | None = None
    weight: float | None = Field(
        None, description="Share of the unpinned requests it gets (0..1); None if failed."
    )
    shadow: bool = Field(False, description="Gets a copy of unpinned traffic (not answered).")
    error: str | None = Field(None, description="Why the newest reload could not serve it.")


class FailedVersion(BaseModel):
    version: str | None = Field(description="None: a problem of the whole model.")
    error: str


class ReloadReport(BaseModel):
    model: str
    at: str = Field(description="When it ran (UTC, ISO 8601).")
    ok: bool = Field(description="Every version the repository asks for is served.")
    serving: list[str]
    added: list[str]
    retired: list[str] = Field(description="No longer routed to; released after their requests.")
    failed: list[FailedVersion]


class ModelDetail(ModelSummary):
    contract: PreprocessContract = Field(description="The newest served version's contract.")
    batch_cost_ms: dict[int, float] = Field(
        description="The backend's time per batch size (1..max_batch_size) as the batcher "
        "plans with it: measured at warm-up, learned from live batches, interpolated for "
        "sizes not seen yet (newest version)."
    )
    version_states: list[VersionState] = Field(
        description="Every version served, retiring or refused, with its traffic."
    )
    last_reload: ReloadReport


class ShadowComparison(BaseModel):
    primary: str
    shadow: str
    since: str
    images_compared: int
    images_dropped: int = Field(description="Not copied: the gateway was busy.")
    images_failed: int
    top1_agreement: float | None = Field(description="Share of images with the same top-1.")
    top5_overlap: float | None = Field(
        description="Mean share of the primary's top-5 classes in the shadow's top-5."
    )
    score_drift_mean: float | None = Field(
        description="Mean |probability of the primary's top-1 class, primary - shadow|."
    )
    score_drift_max: float | None


class ShadowReport(BaseModel):
    model: str
    shadow: str | None = Field(description="The shadow version now (None: no shadow).")
    comparisons: list[ShadowComparison] = Field(
        description="Every primary/shadow pair since the gateway started."
    )


class ModelList(BaseModel):
    models: list[ModelSummary]


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code (docs/api.md lists them).")
    message: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


# --- KServe v2 ----------------------------------------------------------------------------


class KServeError(BaseModel):
    error: str = Field(description="What went wrong.")
    code: str = Field(description="The same stable code as the /v1 envelope's.")


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class TensorOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestJSON(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[TensorOut] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str] = Field(
        description="What runs the version: backend (onnxruntime, openvino, triton), "
        "precision (as export proved it), served_precision (what its batches are computed "
        "in), kernels."
    )


class ModelStatisticsList(BaseModel):
    model_stats: list[dict[str, Any]] = Field(
        description="Triton's statistics extension: one entry per model version."
    )
