"""Inference backends. Everything above :class:`Backend` is backend-agnostic."""

from __future__ import annotations

from service.backends.base import Backend
from service.settings import Settings


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "onnxruntime":
        from service.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            intra_op_threads=settings.ort_intra_op_threads,
            parallel_batches=settings.ort_parallel_batches,
            providers=settings.ort_providers,
        )
    from service.backends.triton.backend import TritonBackend

    return TritonBackend(
        settings.triton_url,
        max_retries=settings.triton_max_retries,
        admin_key=settings.triton_admin_key,
        shared_memory=settings.triton_shared_memory,
    )


__all__ = ["Backend", "make_backend"]
