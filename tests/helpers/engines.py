"""The embedded backend's engines, for the tests that must pass with each of them:
``@pytest.mark.parametrize("engine", ENGINES)``, then :func:`embedded` or
``Settings(engine=engine)``."""

from __future__ import annotations

import pytest

from service.backends.embedded import EmbeddedBackend
from service.backends.engines import installed_engines

#: What a test of OpenVINO alone is marked with: skipped, saying why, where its extra is
#: not installed (make setup installs it).
NEEDS_OPENVINO = pytest.mark.skipif(
    "openvino" not in installed_engines(),
    reason="OpenVINO is not installed (the resnet-serving[openvino] extra)",
)

#: Every engine (OpenVINO marked NEEDS_OPENVINO).
ENGINES = [pytest.param("onnxruntime"), pytest.param("openvino", marks=NEEDS_OPENVINO)]


def embedded(engine: str, **options: object) -> EmbeddedBackend:
    """The embedded backend running ``engine``, built with ``options``
    (``intra_op_threads``, ``parallel_batches``...)."""
    if engine == "openvino":
        from service.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(**options)  # type: ignore[arg-type]
    from service.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(**options)  # type: ignore[arg-type]
