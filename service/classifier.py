"""Classification, independent of transport: bytes in, top-k classes out.

REST and gRPC both call :meth:`Classifier.classify`; preprocessing runs in a thread pool
off the event loop, batching and the backend are shared.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.backends.base import Backend
from service.batching import Batcher
from service.errors import (
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServiceError,
    ValidationFailed,
)
from service.metrics import Metrics
from service.model_store import ModelSpec
from service.preprocess import DecodeLimits, preprocess
from service.settings import Settings


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    model: str
    version: str
    predictions: list[list[Prediction]]


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, softmax probabilities) of the k best classes per row, best first."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)


class Classifier:
    def __init__(
        self,
        specs: list[ModelSpec],
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.default_model = settings.default_model or sorted(self.specs)[0]
        if self.default_model not in self.specs:
            raise ValueError(f"default model {self.default_model!r} is not served")
        self.limits = DecodeLimits(
            max_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft
        )
        self._executor = ThreadPoolExecutor(
            settings.preprocess_workers or None, thread_name_prefix="preprocess"
        )
        self.batchers: dict[str, Batcher] = {}
        for spec in specs:
            cap = settings.max_batch_size or spec.max_batch_size

            async def infer(x: np.ndarray, timeout: float, spec: ModelSpec = spec) -> np.ndarray:
                return await backend.infer(spec, x, timeout)

            self.batchers[spec.name] = Batcher(
                spec.name,
                infer,
                max_batch=min(cap, spec.max_batch_size),
                max_delay_s=settings.max_batch_delay_ms / 1000.0,
                max_queue=settings.max_queue_images,
                metrics=metrics,
                backend_name=backend.name,
                max_inflight=backend.max_inflight_batches,
            )

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        self._executor.shutdown(wait=True)

    def spec(self, name: str | None) -> ModelSpec:
        name = name or self.default_model
        spec = self.specs.get(name)
        if spec is None:
            raise ModelNotFound(
                f"model {name!r} is not served (GET /v1/models or ListModels lists them)"
            )
        return spec

    def resolve_top_k(self, spec: ModelSpec, top_k_: int | None) -> int:
        k = self.settings.default_top_k if top_k_ is None else top_k_
        n = spec.contract.num_classes
        if top_k_ is None:
            return min(k, n)
        if not 1 <= k <= n:
            raise ValidationFailed(f"top_k must be between 1 and {n} for model {spec.name!r}")
        return k

    def _preprocess_one(self, spec: ModelSpec, data: bytes) -> np.ndarray:
        start = time.perf_counter()
        tensor = preprocess(data, spec.contract, self.limits)
        self.metrics.preprocess.labels(spec.name).observe(time.perf_counter() - start)
        return tensor

    def deadline(self, timeout_s: float | None) -> float:
        budget = self.settings.request_timeout_s
        if timeout_s is not None:
            budget = min(budget, timeout_s)
        return time.perf_counter() + budget

    def check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidRequest("no image in the request")
        if n > self.settings.max_images_per_request:
            raise PayloadTooLarge(
                f"{n} images in one request; the limit is {self.settings.max_images_per_request}"
            )

    async def preprocess_images(self, spec: ModelSpec, images: list[bytes]) -> list[np.ndarray]:
        """Decode and preprocess in the thread pool; the first bad image is the error."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._preprocess_one, spec, d) for d in images),
            return_exceptions=True,
        )
        for n, res in enumerate(results):
            if isinstance(res, ServiceError):
                if len(images) > 1:
                    res.message = f"image {n + 1}: {res.message}"
                raise res
            if isinstance(res, BaseException):
                raise res
        return [r for r in results if isinstance(r, np.ndarray)]

    async def logits(
        self, spec: ModelSpec, tensors: list[np.ndarray], deadline: float
    ) -> np.ndarray:
        """Run preprocessed tensors through the model's batcher; (n, num_classes) logits."""
        out = np.stack(await self.batchers[spec.name].submit(tensors, deadline))
        self.metrics.images.labels(spec.name).inc(len(tensors))
        return out

    async def classify(
        self,
        model: str | None,
        images: list[bytes],
        top_k_: int | None = None,
        timeout_s: float | None = None,
    ) -> Classification:
        spec = self.spec(model)
        k = self.resolve_top_k(spec, top_k_)
        self.check_count(len(images))
        deadline = self.deadline(timeout_s)
        logits = await self.logits(spec, await self.preprocess_images(spec, images), deadline)
        idx, probs = top_k(logits, k)
        labels = spec.labels
        return Classification(
            model=spec.name,
            version=spec.version,
            predictions=[
                [Prediction(int(i), labels[i], float(p)) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(idx, probs, strict=True)
            ],
        )
