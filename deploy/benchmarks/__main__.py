"""``make bench``: the gateway against the bare model, measured in one run.

ResNet-50 (random weights: speed does not depend on them) is exported once; then, on the
same model file and the same machine, in this order:

1. bare ONNX Runtime, batch 1 and batch 8 (the ceiling: no HTTP, no decoding);
2. image preprocessing alone (500x375 JPEG; 4032x3024 JPEG with and without DCT draft);
   then the gateway's cost per image (``--cost-only`` runs just that): server CPU per
   request from /proc, behind a near-free graph of the real input shape, for four images,
   beside each one's decode floor and two peers: a tutorial server
   (deploy/tutorial_server.py) and LitServe with batch 8 (deploy/litserve_server.py);
3. the gateway (a real process, embedded ORT backend): 16 and 1 closed-loop clients posting
   a 500x375 JPEG, and Poisson arrivals at half the bare model's throughput;
4. the same 16 clients over the gateway's gRPC API (same process, same backend); 16
   clients with tracing off and on (every request sampled, exported over OTLP/gRPC to a
   receiver in this process), off-on-on-off; then overload: a gateway of its own whose
   requests have a 2 s deadline, under 2x and 10x the clients it can serve within it (they
   wait Retry-After; 10x also without); then the gateway beside its peers (the tutorial
   server, LitServe with batch 8), each alone in turn, in interleaved rounds: 16
   closed-loop clients against bare batch 8, and p99 under Poisson arrivals at 0.4x bare
   batch 8 against an ideal server under the same arrivals (``--tail-only`` runs just
   that); then a rollout's cost: p99 under Poisson arrivals at 0.4x bare batch 8 with one
   version, with a second one shadowing it, and across a reload to a version published
   during the window (``--lifecycle-only`` runs just that);
5. the gateway with the Triton backend: a real tritonserver (CPU, python backend running
   ORT on the same ONNX file), 16 REST clients;
6. INT8: the same network quantized by ``resnet-export export --precision int8`` (calibrated
   on crops of real photographs; the gate reports only, since random weights have no
   accuracy to keep): bare INT8 against bare FP32 at batch 8, and the gateway serving INT8
   against bare INT8;
7. latency under load, FP32 and INT8: Poisson arrivals of crops of real photographs, and
   the SLO search of ``resnet-serve bench``: the highest rate whose p99 stays within 5x the
   bare model's batch-1 latency, with the gateway's defaults and with the settings
   ``resnet-serve tune`` chose here when they differ from them
   (``deploy/loadtest/tune-example/tune.env``, a latency target set to this run's budget),
   as ratios to bare batch 8 (target: 0.5x);
8. the engines (``--engines-only`` runs just that, deploy/benchmarks/engines.py): bare ONNX
   Runtime against bare OpenVINO on the same files, batch 8, interleaved rounds (FP32 exact,
   BF16, INT8); the gateway with each engine against its own bare engine (16 closed-loop
   clients; the gateway serving a ``--precision bf16`` version through OpenVINO against the
   FP32 version through ONNX Runtime, INT8 through both; p99 under Poisson arrivals against
   the ideal server); and BF16's and INT8's top-1 agreement with FP32 on the demo's
   held-out digits, from the export reports of ``--demo-repository`` repositories.

The load comes from ``service.tools.bench`` (the ``resnet-serve bench`` load tool: keep-alive
HTTP/1.1 on raw asyncio streams, grpc.aio with pre-serialized messages), each step bounded
in time. Results print as a table and are written to ``bench-results.json``. Figures are
reported as ratios to bare ORT from the same run, because the machines are shared and noisy.

    python -m deploy.benchmarks [--seconds 20] [--out bench-results.json] [--no-triton]
        [--latency-only | --tracing-only | --lifecycle-only | --int8-only | --cost-only
         | --tail-only | --parity-only | --engines-only [--demo-repository DIR ...]]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deploy.benchmarks.harness import ALONE, Options, run, run_alone
from deploy.benchmarks.tables import cost_table, engines_table, table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    p.add_argument("--no-triton", action="store_true", help="skip the Triton phase")
    for flag, help_text in (
        ("--latency-only", "bare ORT and latency under load only"),
        ("--tracing-only", "tracing on vs off (16 clients) only"),
        (
            "--int8-only",
            "bare FP32 and INT8, INT8's export gates, the gateway serving INT8 (16 clients)",
        ),
        (
            "--parity-only",
            "preprocessing against torchvision's eval transform on real photos and noise",
        ),
        ("--tail-only", "p99 under Poisson arrivals vs an ideal server under the same arrivals"),
        (
            "--cost-only",
            "gateway cost per image: server CPU per request vs decode floor and the peers",
        ),
        ("--lifecycle-only", "p99 under Poisson arrivals with a shadow and across a reload only"),
        (
            "--engines-only",
            "ONNX Runtime vs OpenVINO: bare (FP32, BF16, INT8) and behind the gateway",
        ),
    ):
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument(
        "--demo-repository",
        type=Path,
        action="append",
        default=[],
        help="a repository `resnet-export demo --precision bf16|int8` published: the engines "
        "phase reports its export gate's agreement with FP32 (repeat for each)",
    )
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if not 1 <= args.seconds <= 120:
        p.error("--seconds must be between 1 and 120")
    bad = [d for d in args.demo_repository if not d.is_dir()]
    if bad:
        p.error(f"--demo-repository {bad[0]}: not a directory")
    options = Options(triton=not args.no_triton, demo=tuple(args.demo_repository))
    for name in ALONE:
        if getattr(args, f"{name}_only"):
            found = run_alone(name, args.seconds, args.out, options)
            if "cost" in found:
                print(cost_table(found["cost"]))
            elif "engines" in found:
                print(engines_table(found["engines"], found["machine"]))
            else:
                print(json.dumps(found, indent=2))
            return
    results = run(args.seconds, args.out, options, latency_only=args.latency_only)
    print(table(results))
    if "cost" in results:
        print("\n" + cost_table(results["cost"]))
    if "engines" in results:
        print("\n" + engines_table(results["engines"], results["machine"]))


if __name__ == "__main__":
    main()
