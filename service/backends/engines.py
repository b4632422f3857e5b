"""The embedded backend's engine: the one ``ENGINE`` names, or with ``auto`` the faster of
those installed, measured at start.

``auto`` decides once per gateway, on the first version it serves: that version is
compiled and warmed up with each engine in turn, the same batch of the largest size
timed on each (service.backends.base.Backend.warm_up), and the engine with more images a
second (that batch's cost over the batches it runs at once) serves every version from then
on (the other is closed). Once per gateway, not per version: a reload
happens under live traffic, where a second compile and warm-up would take the cores the
served versions need and the timing would measure the traffic as much as the engine; and
one engine per process keeps one thread sizing and one ``backend`` label per gateway.
"""

from __future__ import annotations

import logging

from service.backends.embedded import EmbeddedBackend
from service.model.repository import ModelSpec, RepositoryError
from service.settings import Settings

log = logging.getLogger(__name__)

#: The engines of the embedded backend, as ENGINE names them.
ENGINES = ("onnxruntime", "openvino")


def installed_engines() -> list[str]:
    """The engines this environment can run: ONNX Runtime always (a dependency of the
    gateway), OpenVINO where its package imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["onnxruntime"]
    return list(ENGINES)


def make_engine(engine: str, settings: Settings) -> EmbeddedBackend:
    """The embedded backend running ``engine`` (one of :data:`ENGINES`), sized by ``settings``."""
    if engine == "openvino":
        from service.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(
            intra_op_threads=settings.ort_intra_op_threads,
            parallel_batches=settings.ort_parallel_batches,
            cache_dir=settings.openvino_cache_dir,
        )
    if engine != "onnxruntime":
        raise ValueError(f"no engine {engine!r} (engines: {', '.join(ENGINES)})")
    from service.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(
        intra_op_threads=settings.ort_intra_op_threads,
        parallel_batches=settings.ort_parallel_batches,
        providers=settings.ort_providers,
    )


async def start_fastest(
    candidates: list[EmbeddedBackend], specs: list[ModelSpec]
) -> EmbeddedBackend:
    """The candidate that ran the first version's largest warm-up batch fastest, started with
    every version; the others closed. A candidate that cannot load the version is left out
    (logged); if none can, the first one's RepositoryError."""
    first = specs[0]
    timed: list[EmbeddedBackend] = []
    refused: list[RepositoryError] = []
    for backend in candidates:
        try:
            await backend.load(first)
        except RepositoryError as exc:
            log.warning("engine auto: %s left out: %s", backend.name, exc)
            refused.append(exc)
            await backend.close()
            continue
        except BaseException:
            for started in (*timed, backend):
                await started.close()
            raise
        timed.append(backend)
    if not timed:
        raise refused[0]
    size = max(timed[0].warm_costs(first))

    def per_s(backend: EmbeddedBackend) -> float:
        # Images a second with every batch slot busy: engines may split the cores
        # differently (one batch on all of them, or streams of their own side by side).
        return backend.max_inflight_batches * size / backend.warm_costs(first)[size]

    fastest = max(timed, key=per_s)
    log.info(
        "engine auto: a batch of %d of %s version %s took %s: serving with %s",
        size,
        first.name,
        first.version,
        ", ".join(
            f"{b.name} {b.warm_costs(first)[size] * 1000:.1f} ms, {b.max_inflight_batches} "
            f"at once ({per_s(b):.1f} images/s)"
            for b in timed
        ),
        fastest.name,
    )
    for backend in timed:
        if backend is not fastest:
            await backend.close()
    try:
        await fastest.start(specs)
    except BaseException:
        await fastest.close()
        raise
    return fastest
