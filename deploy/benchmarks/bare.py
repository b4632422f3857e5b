"""The ceiling: a plain engine on the same model file, no HTTP, no decoding: an ONNX Runtime
session (default options), or an OpenVINO model compiled for throughput (what OpenVINO Model
Server and Triton's OpenVINO backend run) fed by an ``AsyncInferQueue`` of its optimal size."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.host.cpus import usable_cpus

#: A bare engine kept warm: (batch, seconds) to the images/s it ran at that batch for that
#: long. Phases that interleave rounds keep one per engine, compiled once.
Rate = Callable[[int, float], float]


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)


def ort_rate(onnx_path: Path) -> Rate:
    """A plain ORT session (all usable CPUs, default options) on ``onnx_path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = usable_cpus()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def rate(batch: int, seconds: float) -> float:
        x = _images(batch)
        for _ in range(2):
            session.run(None, {"input": x})
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {"input": x})
            n += batch
        return n / (time.perf_counter() - start)

    return rate


def openvino_rate(onnx_path: Path, precision: str) -> Rate:
    """OpenVINO's CPU plugin on ``onnx_path`` with ``PERFORMANCE_HINT=THROUGHPUT`` (its
    streams over the usable CPUs) and ``INFERENCE_PRECISION_HINT=precision`` (``f32``:
    exact FP32, INT8 ops staying INT8; ``bf16``: what it runs an FP32 graph in by default on
    a CPU with BF16), every infer request of its optimal number kept busy."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(onnx_path),
        "CPU",
        {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": usable_cpus(),
        },
    )
    jobs = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def rate(batch: int, seconds: float) -> float:
        x = _images(batch)
        for _ in range(2 * len(jobs)):
            jobs.start_async({"input": x})
        jobs.wait_all()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            jobs.start_async({"input": x})  # waits for a free request
            n += batch
        jobs.wait_all()
        return n / (time.perf_counter() - start)

    return rate


def bare_ort(onnx_path: Path, batch: int, seconds: float) -> float:
    """Images/s of a plain ORT session (all usable CPUs, default options) at a fixed batch."""
    return ort_rate(onnx_path)(batch, seconds)
