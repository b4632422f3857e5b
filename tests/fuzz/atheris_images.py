"""Coverage-guided fuzzing of the image path with atheris (libFuzzer), Pillow's Python
plugins instrumented. Run by tests/fuzz/test_images.py for a bounded number of
runs; by hand for longer:

    python tests/fuzz/atheris_images.py CORPUS_DIR -runs=100000 -max_len=8192

A crash is the property failing (see tests/fuzz/images.py); libFuzzer writes the input as
``crash-*``: keep it in tests/data/fuzz/ once fixed.
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["PIL", "service"]):
    from tests.fuzz.images import check


def one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
