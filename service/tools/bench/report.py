"""What a run leaves behind: ``report.json`` (everything), ``steps.csv`` (one row per step),
``latency.png`` (latency percentiles against throughput, the budget drawn in), and the table
printed at the end. Files are written whole or not at all (temporary name, then rename)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from service.tools.bench import BenchError
from service.tools.bench.loops import PERCENTILES, Step

CSV_FIELDS = [
    "mode",
    "load",
    "duration_s",
    "requests",
    "ok",
    "errors",
    "requests_per_s",
    "images_per_s",
    *[f"p{p:g}_ms" for p in PERCENTILES],
    "client_cpu",
    "server_requests",
    "server_images",
    "mean_batch_size",
    "preprocess_ms_per_image",
    "queue_wait_ms_per_image",
    "inference_ms_per_batch",
]


def _row(step: Step) -> dict[str, Any]:
    s = step.server
    return {
        "mode": step.mode,
        "load": step.load,
        "duration_s": round(step.duration_s, 3),
        "requests": step.requests,
        "ok": step.ok,
        "errors": ";".join(f"{k}={v}" for k, v in sorted(step.errors.items())),
        "requests_per_s": round(step.requests_per_s, 2),
        "images_per_s": round(step.images_per_s, 2),
        **{f"p{p:g}_ms": round(step.latency_ms(p), 2) for p in PERCENTILES},
        "client_cpu": round(step.client_cpu, 3),
        "server_requests": s.get("requests", ""),
        "server_images": s.get("images", ""),
        "mean_batch_size": s.get("mean_batch_size", ""),
        "preprocess_ms_per_image": s.get("preprocess_ms_per_image", ""),
        "queue_wait_ms_per_image": s.get("queue_wait_ms_per_image", ""),
        "inference_ms_per_batch": s.get("inference_ms_per_batch", ""),
    }


def write_file(path: Path, data: bytes | str) -> None:
    """``path`` whole or not at all: a temporary name beside it, then a rename."""
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_output(output: Path) -> Path:
    """The output folder, created; refused before the run (not after) if it cannot be."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"--output {output}: cannot write there ({exc.strerror or exc})") from None
    return output


def chart(
    steps: list[Step], budget_ms: float | None, title: str, best: Step | None = None
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        # A colour per percentile; Poisson arrivals solid, the closed loop dashed.
        for mode, marker, style in (("open", "s", "-"), ("closed", "o", "--")):
            pts = sorted(
                (s for s in steps if s.mode == mode and s.ok), key=lambda s: s.images_per_s
            )
            for color, p in enumerate(PERCENTILES if pts else ()):
                ax.plot(
                    [s.images_per_s for s in pts],
                    [s.latency_ms(p) for s in pts],
                    marker=marker,
                    linestyle=style,
                    color=f"C{color}",
                    label=f"p{p:g} ({'closed loop' if mode == 'closed' else 'Poisson arrivals'})",
                )
        if budget_ms:
            ax.axhline(budget_ms, color="red", linestyle=":", label=f"p99 budget {budget_ms:g} ms")
        if best:
            ax.plot(
                [best.images_per_s],
                [best.latency_ms(99)],
                marker="*",
                markersize=14,
                color="red",
                linestyle="none",
                label=f"highest rate within the budget: {best.load:g}/s",
            )
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def write(
    output: Path, report: dict[str, Any], steps: list[Step], best: Step | None = None
) -> list[Path]:
    budget = (report.get("slo") or {}).get("p99_budget_ms")
    write_file(output / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for step in steps:
        writer.writerow(_row(step))
    write_file(output / "steps.csv", buf.getvalue().encode())
    title = f"{report['target']['protocol']} {report['target']['url']} model {report['target']['model']}"
    write_file(output / "latency.png", chart(steps, budget, title, best))
    return [output / n for n in ("report.json", "steps.csv", "latency.png")]


def table(steps: list[Step]) -> str:
    """The steps as a fixed-width table, for the terminal."""
    head = [
        "load",
        "req/s",
        "img/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "errors",
        "batch",
        "queue",
        "infer",
        "cpu",
    ]
    rows = [head]
    for s in steps:
        srv = s.server

        def ms(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.1f}"

        rows.append(
            [
                f"{s.load:g} {'clients' if s.mode == 'closed' else '/s'}",
                f"{s.requests_per_s:.1f}",
                f"{s.images_per_s:.1f}",
                *[ms(s.latency_ms(p)) for p in PERCENTILES],
                str(sum(s.errors.values())),
                str(srv.get("mean_batch_size") or "-"),
                str(srv.get("queue_wait_ms_per_image") or "-"),
                str(srv.get("inference_ms_per_batch") or "-"),
                f"{s.client_cpu:.0%}",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return (
        "\n".join(lines)
        + "\n(latency in ms, successful requests; batch, queue (wait per image, ms) and infer "
        "(ms per batch) from the gateway's /metrics; cpu: this client's own CPU)"
    )
