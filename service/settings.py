"""Every knob of the gateway, in one class. Environment: ``RESNET_SERVE_<FIELD>``.

The Helm chart's values map onto these fields one to one; the CLI's options override them.
List fields take comma-separated values (``RESNET_SERVE_MODELS=digits,resnet50``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
ENV_PREFIX = "RESNET_SERVE_"


def helm_key(field: str) -> str:
    """A setting's name among the Helm chart's ``gateway.config`` values:
    ``max_batch_delay_ms`` is ``maxBatchDelayMs`` (Helm's ``snakecase`` turns it back)."""
    head, *rest = field.split("_")
    return head + "".join(part.capitalize() for part in rest)


def describe_settings_error(exc: ValidationError) -> str:
    """pydantic's errors as one line, each naming the environment variable that sets it
    (``RESNET_SERVE_PORT=99999: Input should be ...``)."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        value = str(err.get("input", ""))[:80]
        parts.append(f"{ENV_PREFIX}{field.upper()}={value}: {msg}" if field else msg)
    return "; ".join(parts)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # --- what to serve -------------------------------------------------------------------
    repository: Path = Field(
        Path("model_repository"), description="Model repository written by resnet-export."
    )
    models: CommaList = Field(
        default_factory=list, description="Models to serve (default: every model found)."
    )
    default_model: str | None = Field(
        None, description="Model behind /v1/classify (default: the first model by name)."
    )
    backend: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime",
        description="onnxruntime: the embedded backend, an engine in this process (ENGINE "
        "picks it); triton: a Triton server over gRPC.",
    )
    engine: Literal["onnxruntime", "openvino", "auto"] = Field(
        "onnxruntime",
        description="The embedded backend's engine: ONNX Runtime; OpenVINO (the "
        "resnet-serving[openvino] extra; a bf16 version computed in BF16 where the CPU has "
        "it); or auto: at start, the first version timed on a warm-up batch with each "
        "installed engine, and the faster one kept for every version.",
    )
    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton gRPC endpoint: host:port, or any gRPC target; calls are balanced "
        "round-robin over every address it resolves to (dns:///triton-headless:8001).",
    )
    triton_admin_key: str | None = Field(
        None,
        description="The key Triton restricts repository control to (--grpc-restricted-"
        "protocol=model-repository:triton-admin-key=KEY), sent with the load and unload "
        "requests of a reload (default: none; Triton does not restrict it).",
    )
    triton_shared_memory: bool = Field(
        False,
        description="Pass batches to and from Triton through system shared memory, for a "
        "Triton on this host (the chart's sidecar mode): the gRPC call carries only the "
        "request. Needs one Triton (host:port); with a restricted shared-memory protocol, "
        "TRITON_ADMIN_KEY.",
    )
    triton_max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a batch after a transient Triton failure."
    )

    # --- network ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="REST bind address.")
    port: int = Field(8000, ge=0, le=65535, description="REST port.")
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="gRPC API port (default: no gRPC server)."
    )
    grpc_max_message_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent."
    )
    api_keys: CommaList = Field(
        default_factory=list,
        description="If set, classification and model routes require one of these keys "
        "(Authorization: Bearer KEY or X-API-Key: KEY). Health and metrics stay open.",
    )

    admin_keys: CommaList = Field(
        default_factory=list,
        description="Keys of the admin API (POST /v1/models/{m}/reload, gRPC ReloadModel; "
        "Authorization: Bearer KEY or X-API-Key: KEY). Unset: the admin API is off (403).",
    )
    poll_interval_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Seconds between looks at the model repository for new or removed "
        "versions and rollout changes, which are then loaded without a restart (0: off; "
        "reloads come only from the admin API).",
    )

    # --- bounds ----------------------------------------------------------------------------
    max_body_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Largest request body; larger is 413."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height, from its header); 413."
    )
    max_images_per_request: int = Field(64, ge=1, description="Most images in one request.")
    max_batch_size: int | None = Field(
        None, ge=1, description="Cap on the batch size (default: each model's max_batch_size)."
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0, le=1000, description="How long a partial batch waits for more images."
    )
    max_queue_images: int = Field(
        256, ge=1, description="Images waiting per model; past this, 503 + Retry-After."
    )
    target_p99_ms: float | None = Field(
        None,
        gt=0,
        le=600_000,
        description="Latency target: batches are sized so that requests finish within this "
        "many ms of arriving where a smaller batch can do it, and no batch costs more than "
        "half of it (default: no target; batches sized for throughput within deadlines).",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Per-request deadline (clients may ask for less); 504."
    )
    default_top_k: int = Field(5, ge=1, description="top_k when the request gives none.")

    # --- connections (service.transports.http.guard; an ingress in front may add its own) ---
    header_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Seconds a client has to send a request's headers; 408."
    )
    body_idle_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Longest pause allowed while a request body arrives."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds a client has to send a whole request body."
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this."
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="Largest request line + headers; larger is 431."
    )
    max_headers: int = Field(100, ge=8, description="Most header lines in a request; 431.")
    max_connections: int = Field(
        1000, ge=1, description="Open HTTP connections; past this, 503 and close at once."
    )

    # --- compute ---------------------------------------------------------------------------
    preprocess_workers: int = Field(
        0,
        ge=0,
        description="Processes decoding and preprocessing images (0: one per usable CPU "
        "(cgroup quota and affinity)).",
    )
    ort_intra_op_threads: int = Field(
        0,
        ge=0,
        description="Threads per batch of the embedded engine (ONNX Runtime's intra-op "
        "threads, OpenVINO's threads per stream; 0: the usable CPUs (cgroup quota and "
        "affinity) divided by ORT_PARALLEL_BATCHES).",
    )
    ort_providers: CommaList = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in order of preference, e.g. "
        "CUDAExecutionProvider,CPUExecutionProvider (needs onnxruntime-gpu in place of "
        "onnxruntime). One that is not available stops the gateway at start.",
    )
    ort_parallel_batches: int = Field(
        0,
        ge=0,
        le=64,
        description="Batches of one model the embedded engine runs at once (OpenVINO: its "
        "streams). 0: the engine's choice: ONNX Runtime one batch on all cores (lowest "
        "latency); OpenVINO the streams its THROUGHPUT hint picks (2 single-threaded ones on "
        "2 cores: more throughput when decoding competes for the cores, twice the latency of "
        "a lone request).",
    )
    openvino_cache_dir: Path | None = Field(
        None,
        description="A writable directory where OpenVINO keeps the models it compiled, so "
        "that the next load of a version skips compiling (default: none, every load "
        "compiles).",
    )
    exclusive_cpus: bool | None = Field(
        None,
        description="Decoding and the embedded engine never hold more of the usable CPUs "
        "than there are: a decode waits while batches hold their threads' cores. Unset: on "
        "where a batch holds fewer than all of them (parallel batches, OpenVINO's streams: "
        "decodes take the cores no batch holds), off where one batch holds all of them "
        "(a decode would wait for every batch; measured better on 2 cores).",
    )
    jpeg_draft: bool = Field(
        True,
        description="Decode large JPEGs at reduced DCT scale (1/2..1/8) when the "
        "result still has twice the pixels the resize needs.",
    )

    # --- lifecycle -------------------------------------------------------------------------
    drain_seconds: float = Field(
        0.0,
        ge=0,
        le=300,
        description="On SIGTERM, report not-ready but keep serving this long (lets load "
        "balancers stop sending), then finish in-flight work and exit.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the gateway and uvicorn."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: lines for people; json: one object per line (request id, trace "
        "id, model, version, images, outcome, stage timings on each request's line).",
    )

    # --- pages (service.transports.http.pages) --------------------------------------------
    try_page: bool = Field(
        True,
        description="Serve the page to try a model at / (pick a model and an image, see the "
        "top-k); off: / is a 404. /docs and /redoc are served either way.",
    )

    @field_validator("engine")
    @classmethod
    def _engine_installed(cls, value: str, info: ValidationInfo) -> str:
        if value != "openvino" or info.data.get("backend") != "onnxruntime":
            return value  # auto takes the engines that are installed
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"OpenVINO is not installed ({str(exc).splitlines()[0]}): install "
                "resnet-serving[openvino], or build the image with --build-arg OPENVINO=1"
            ) from None
        return value

    @field_validator("ort_providers")
    @classmethod
    def _providers_available(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("backend") != "onnxruntime":
            return value  # Triton runs the model: this process loads no ONNX Runtime session
        import onnxruntime

        available = onnxruntime.get_available_providers()
        missing = [p for p in value if p not in available]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not available in this onnxruntime "
                f"{onnxruntime.__version__} (available: {', '.join(available)}); a GPU "
                "provider needs the onnxruntime-gpu package in place of onnxruntime"
            )
        if not value:
            raise ValueError("name at least one provider, e.g. CPUExecutionProvider")
        return value

    @field_validator("models", "api_keys", "admin_keys", "ort_providers", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
