"""Inference backends. Everything above :class:`Backend` is backend-agnostic."""

from __future__ import annotations

from service.backends.base import Backend
from service.model.repository import ModelSpec
from service.settings import Settings


def make_backend(settings: Settings) -> Backend:
    """The backend ``settings`` names, not started (``ENGINE=auto`` is decided at start:
    :func:`start_backend`)."""
    if settings.backend == "onnxruntime":
        from service.backends.engines import make_engine

        return make_engine(settings.engine, settings)
    from service.backends.triton.backend import TritonBackend

    return TritonBackend(
        settings.triton_url,
        max_retries=settings.triton_max_retries,
        admin_key=settings.triton_admin_key,
        shared_memory=settings.triton_shared_memory,
    )


async def start_backend(settings: Settings, specs: list[ModelSpec]) -> Backend:
    """The backend ``settings`` names, started with ``specs`` (with ``ENGINE=auto``, the
    faster engine: service.backends.engines); on failure, closed again."""
    if settings.backend == "onnxruntime" and settings.engine == "auto":
        from service.backends.engines import installed_engines, make_engine, start_fastest

        engines = [make_engine(e, settings) for e in installed_engines()]
        return await start_fastest(engines, specs)
    backend = make_backend(settings)
    try:
        await backend.start(specs)
    except BaseException:
        await backend.close()
        raise
    return backend


__all__ = ["Backend", "make_backend", "start_backend"]
