"""The ceiling: a plain ONNX Runtime session on the same model file, no HTTP, no decoding."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.host.cpus import usable_cpus


def bare_ort(onnx_path: Path, batch: int, seconds: float) -> float:
    """Images/s of a plain ORT session (all usable CPUs, default options) at a fixed batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = usable_cpus()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    for _ in range(2):
        session.run(None, {"input": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        n += batch
    return n / (time.perf_counter() - start)
