"""Property-based fuzzing of the image path (hypothesis): structured mutations of real
files of every accepted format, extreme and forged dimensions. The property is
``tests.fuzz.images.check``. ``FUZZ_EXAMPLES=N`` runs longer (default: a short run)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.images import REGRESSIONS, check, seeds

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
HARNESS = Path(__file__).resolve().parent / "atheris_images.py"
SEEDS = seeds()
DIMENSIONS = st.one_of(
    st.integers(0, 70_000), st.sampled_from([0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1])
)


def forge_dimensions(data: bytes, width: int, height: int) -> bytes:
    """Write other dimensions into the header, as a forger would (PNG's CRC kept valid)."""
    b = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif data[:2] == b"BM":
        b[18:26] = struct.pack("<ii", width % 2**31, height % 2**31)
    elif data[:3] == b"GIF":
        b[6:10] = struct.pack("<HH", width % 2**16, height % 2**16)
    elif data[:2] == b"\xff\xd8" and (at := data.find(b"\xff\xc0")) > 0:
        b[at + 5 : at + 9] = struct.pack(">HH", height % 2**16, width % 2**16)
    return bytes(b)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "dims", "repeat"]))
        if kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(max_size=64)) + data[at:]
        elif kind == "dims":
            data = forge_dimensions(data, draw(DIMENSIONS), draw(DIMENSIONS))
        elif kind == "repeat" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + data[at:] * draw(st.integers(2, 4))
    return data


@settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: a forged header must not make decoding slow
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run (CI); FUZZ_EXAMPLES explores more
)
@given(mutated())
def test_mutated_files_give_a_tensor_or_a_client_error(data):
    check(data)


@settings(max_examples=EXAMPLES // 3, deadline=2000, derandomize=True)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_tensor_or_a_client_error(data):
    check(data)


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*")), ids=lambda p: p.name)
def test_regressions_found_by_fuzzing_or_attacks(path):
    check(path.read_bytes())


@pytest.mark.external
def test_coverage_guided_fuzzing_finds_nothing(tmp_path):
    """atheris for a bounded number of runs from seed files of every format (skipped
    where atheris does not install). ``FUZZ_RUNS=N`` runs longer."""
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in SEEDS.items():
        (corpus / name).write_bytes(data)
    runs = os.environ.get("FUZZ_RUNS", "3000")
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(corpus), f"-runs={runs}", "-max_len=4096",
         "-timeout=10", "-rss_limit_mb=3000", f"-artifact_prefix={tmp_path}/", "-seed=1"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    found = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(
        p.name for p in tmp_path.glob("timeout-*")
    )
    assert proc.returncode == 0 and not found, (found, proc.stderr[-3000:])
    assert f"Done {runs} runs" in proc.stderr
