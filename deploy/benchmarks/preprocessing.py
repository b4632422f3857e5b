"""Image preprocessing alone, in this process: a 500x375 JPEG, and a 4032x3024 JPEG with and
without the DCT draft (decoding at a reduced scale)."""

from __future__ import annotations

import time
from pathlib import Path

from deploy.benchmarks.common import NAME
from deploy.benchmarks.inputs import test_jpeg


def preprocess_ms(repo: Path) -> dict[str, float]:
    """Milliseconds of wall time per image, the mean of 50 (small) or 8 (large) runs after
    one unmeasured, with the contract of the model in ``repo``."""
    from service.dataplane.preprocess import DecodeLimits, preprocess
    from service.model.repository import load_spec

    contract = load_spec(repo / NAME).contract
    cases = {
        "jpeg_500x375_ms": (test_jpeg(), DecodeLimits()),
        "jpeg_4032x3024_draft_ms": (test_jpeg(4032, 3024), DecodeLimits()),
        "jpeg_4032x3024_full_decode_ms": (test_jpeg(4032, 3024), DecodeLimits(jpeg_draft=False)),
    }
    out = {}
    for key, (data, limits) in cases.items():
        preprocess(data, contract, limits)
        reps = 50 if "500" in key else 8
        t0 = time.perf_counter()
        for _ in range(reps):
            preprocess(data, contract, limits)
        out[key] = round((time.perf_counter() - t0) / reps * 1000, 2)
    return out
