"""The full run, every phase in order on one FP32 export, and each phase that runs on its own
(``--<phase>-only``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.benchmarks.bare import bare_ort
from deploy.benchmarks.common import log
from deploy.benchmarks.cost import gateway_cost
from deploy.benchmarks.engines import bench_engines, isa_flags
from deploy.benchmarks.gateway import gateway_alone
from deploy.benchmarks.inputs import calibration_images, export_model, onnx_of, test_jpeg
from deploy.benchmarks.int8 import bench_int8
from deploy.benchmarks.latency import latency_under_load
from deploy.benchmarks.overload import overload
from deploy.benchmarks.parity import preprocessing_parity
from deploy.benchmarks.preprocessing import preprocess_ms
from deploy.benchmarks.rollout import rollout_cost
from deploy.benchmarks.tail import tail_vs_ideal
from deploy.benchmarks.tracing import tracing_cost
from deploy.benchmarks.triton import bench_triton
from service.host.cpus import cpu_isa, usable_cpus


@dataclass(frozen=True)
class Options:
    """What phases take beside their repository and --seconds."""

    #: Whether the Triton phase runs (--no-triton: it does not).
    triton: bool = True
    #: Repositories ``resnet-export demo --precision bf16|int8`` published, whose export
    #: reports the engines phase reads (--demo-repository).
    demo: tuple[Path, ...] = ()


def run(
    seconds: float, out: Path, options: Options = Options(), latency_only: bool = False
) -> dict[str, Any]:
    """Every phase (``latency_only``: bare ORT and latency under load, FP32 and INT8),
    written to ``out`` as JSON."""
    triton = options.triton
    results: dict[str, Any] = {
        "machine": {
            "cpus": usable_cpus(),
            "node_cpus": os.cpu_count(),
            "isa": cpu_isa(),
            "flags": isa_flags(),
        }
    }
    with tempfile.TemporaryDirectory(prefix="resnet-bench-") as tmp:
        repo = Path(tmp)
        export_model(repo)
        onnx_path = onnx_of(repo)
        log("bare ONNX Runtime ...")
        bare1 = bare_ort(onnx_path, 1, seconds / 2)
        bare8 = bare_ort(onnx_path, 8, seconds)
        results["bare_ort"] = {
            "batch1_images_per_s": round(bare1, 2),
            "batch8_images_per_s": round(bare8, 2),
        }
        log(f"  batch 1: {bare1:.1f} img/s, batch 8: {bare8:.1f} img/s")
        # Beside the repository, not in it (a folder there would be read as a model).
        photos = calibration_images(Path(tempfile.mkdtemp(prefix="resnet-bench-photos-")))
        results["latency_under_load"] = latency_under_load(repo, photos, seconds, bare1, bare8)
        if latency_only:
            results["int8"] = bench_int8(Path(tmp) / "q", b"", seconds, bare8, latency_only=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            return results
        log("preprocessing ...")
        results["preprocess"] = preprocess_ms(repo)
        log(f"  {results['preprocess']}")
        results["parity"] = preprocessing_parity(repo, photos)
        results["cost"] = gateway_cost(seconds, triton)
        body = test_jpeg()
        alone, unloaded = gateway_alone(repo, body, seconds, bare8)
        results["overload"] = overload(repo, body, unloaded, seconds, 2.0)
        results["tail"] = tail_vs_ideal(repo, body, seconds)
        results["tracing"] = tracing_cost(repo, body, seconds)
        results["rollout"] = rollout_cost(repo, body, seconds, bare8)
        results.update(alone)
        if triton:
            results["gateway_rest_triton"] = bench_triton(repo, body, seconds, bare8)
        results["int8"] = bench_int8(Path(tmp) / "q", body, seconds, bare8)
        results["engines"] = bench_engines(repo, body, seconds, options.demo)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


#: A phase on its own: (the FP32 export's repository, --seconds, the options) to what it
#: adds to the results.
Phase = Callable[[Path, float, Options], dict[str, Any]]


def _lifecycle(root: Path, s: float, _: Options) -> dict[str, Any]:
    return {"rollout": rollout_cost(root, test_jpeg(), s, bare_ort(onnx_of(root), 8, s))}


def _int8(root: Path, s: float, _: Options) -> dict[str, Any]:
    return {
        "machine": {"isa": cpu_isa()},
        "int8": bench_int8(
            root / "q", test_jpeg(), s, bare_ort(onnx_of(root), 8, s), latency=False
        ),
    }


def _tracing(root: Path, s: float, _: Options) -> dict[str, Any]:
    return {"tracing": tracing_cost(root, test_jpeg(), s)}


def _parity(root: Path, _s: float, _: Options) -> dict[str, Any]:
    photos = calibration_images(Path(tempfile.mkdtemp(prefix="resnet-bench-photos-")))
    return {"parity": preprocessing_parity(root, photos)}


def _tail(root: Path, s: float, _: Options) -> dict[str, Any]:
    return {"machine": {"isa": cpu_isa()}, "tail": tail_vs_ideal(root, test_jpeg(), s)}


def _cost(_root: Path, s: float, options: Options) -> dict[str, Any]:
    return {"machine": {"isa": cpu_isa()}, "cost": gateway_cost(s, triton=options.triton)}


def _engines(root: Path, s: float, options: Options) -> dict[str, Any]:
    return {
        "machine": {"cpus": usable_cpus(), "isa": cpu_isa(), "flags": isa_flags()},
        "engines": bench_engines(root, test_jpeg(), s, options.demo),
    }


#: The phases that run on their own, by their flag (``--<name>-only``); the first flag given
#: in this order wins.
ALONE: dict[str, Phase] = {
    "lifecycle": _lifecycle,
    "int8": _int8,
    "tracing": _tracing,
    "parity": _parity,
    "tail": _tail,
    "cost": _cost,
    "engines": _engines,
}


def run_alone(name: str, seconds: float, out: Path, options: Options = Options()) -> dict[str, Any]:
    """One phase of ALONE, after the FP32 export it starts from, written to ``out``."""
    with tempfile.TemporaryDirectory(prefix="resnet-bench-") as tmp:
        if name != "cost":  # its near-free graphs are its own: no ResNet-50 export first
            export_model(Path(tmp))
        found = ALONE[name](Path(tmp), seconds, options)
    out.write_text(json.dumps(found, indent=2) + "\n")
    return found
