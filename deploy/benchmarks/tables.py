"""The printed tables: one run's results as markdown (``| what | figure | vs bare batch 8 |``),
and the "gateway cost per image" table; ``bench-results.json`` holds every figure."""

from __future__ import annotations

from typing import Any

from deploy.benchmarks.cost import COST_SERVERS, TRITON_SERVERS
from deploy.benchmarks.peers import PEERS

Row = tuple[str, str, str]

#: How the tables name the servers.
SERVER_NAMES = {
    "gateway": "gateway",
    "gateway_uint8": "gateway (uint8 graph)",
    "gateway_triton": "gateway before Triton (float planes)",
    "gateway_triton_uint8": "gateway before Triton (uint8 graph)",
    "gateway_triton_shm": "gateway before Triton (uint8, shared memory)",
    "tutorial": "tutorial server",
    "litserve": "LitServe (batch 8)",
}

#: How the engines table names the engines phase's gateways.
ENGINE_GATEWAYS = {
    "ort_fp32": "ONNX Runtime, FP32 version",
    "ov_bf16": "OpenVINO, bf16 version (BF16)",
    "ort_int8": "ONNX Runtime, INT8 version",
    "ov_int8": "OpenVINO, INT8 version",
}


def table(results: dict[str, Any]) -> str:
    """A full run (or ``--latency-only``'s) as one table, a row per figure."""
    bare = results["bare_ort"]
    rows = [
        ("bare ONNX Runtime, batch 1", f"{bare['batch1_images_per_s']:.1f} img/s", ""),
        ("bare ONNX Runtime, batch 8", f"{bare['batch8_images_per_s']:.1f} img/s", "1.00x"),
        *latency_rows("FP32", results["latency_under_load"]),
    ]
    if "int8" in results:
        rows += int8_rows(results["int8"], results["machine"]["isa"])
    if "tail" in results:
        rows += peer_rows(results["tail"])
    if "parity" in results:
        rows += parity_rows(results["parity"])
    if "gateway_rest_onnxruntime" in results:
        rows += gateway_rows(results)
    lines = ["| what | figure | vs bare batch 8 |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def p50_p99(summary: dict[str, Any]) -> str:
    """A step summary's latency (successful requests), as the table shows it."""
    return f"{summary['latency_ms']['p50']:.1f} / {summary['latency_ms']['p99']:.1f} ms"


def latency_rows(what: str, section: dict[str, Any]) -> list[Row]:
    """The latency-under-load section as table rows."""
    rows = []
    for name in ("defaults", "tuned"):
        if name not in section:
            continue
        r = section[name]
        settings = ", ".join(
            f"{k.removeprefix('RESNET_SERVE_')}={v}" for k, v in r["settings"].items()
        )
        rows.append(
            (
                f"{what}: highest Poisson rate with p99 <= {section['p99_budget_ms']} ms "
                f"(5x bare batch 1), {name}" + (f" ({settings})" if settings else ""),
                f"{r['max_rate_per_s']}/s, p99 {r.get('p99_ms', '-')} ms",
                f"{r['rate_vs_bare_batch8']:.2f}x (target 0.5x)",
            )
        )
    return rows


def int8_rows(q: dict[str, Any], isa: str) -> list[Row]:
    """Bare INT8, its export gates, its latency under load and the gateway serving it."""
    gates = q["export_gates"]
    rows = [
        (
            f"bare ONNX Runtime INT8, batch 1 / 8 ({isa})",
            f"{q['bare_batch1_images_per_s']:.1f} / {q['bare_batch8_images_per_s']:.1f} img/s",
            f"{q['bare_int8_vs_fp32_batch8']:.2f}x (INT8 vs FP32)",
        ),
        (
            f"INT8 top-1 vs FP32, {gates['images']} photo crops: "
            f"{gates['kernels']} kernels / exact reference",
            f"{gates['kernels_top1_vs_fp32_pct']:.2f}% / {gates['exact_top1_vs_fp32_pct']:.2f}%",
            f"kernels vs exact: max diff "
            f"{gates['kernels_max_diff_vs_exact_pct_of_largest']:.2f}% of the largest",
        ),
        *latency_rows("INT8", q["latency_under_load"]),
    ]
    if "gateway_clients16" in q:
        rows.append(
            (
                "gateway REST serving INT8, 16 clients",
                f"{q['gateway_clients16']['images_per_s']:.1f} img/s; p50 / p99 "
                + p50_p99(q["gateway_clients16"]),
                f"{q['gateway_vs_bare_int8_batch8']:.2f}x bare INT8",
            )
        )
    return rows


def peer_rows(t: dict[str, Any]) -> list[Row]:
    """The gateway beside its peers: closed-loop throughput and p99 against the ideal."""
    servers = ("gateway", *PEERS)
    n = len(t["rounds"])
    return [
        (
            f"16 clients, median of {n} rounds (bare batch 8 {t['bare_batch8_images_per_s']} img/s)",
            ", ".join(
                f"{SERVER_NAMES[s]} {t[f'{s}_closed_vs_bare8_median']:.2f}x" for s in servers
            ),
            "(each vs bare batch 8)",
        ),
        (
            f"p99 vs an ideal server, Poisson {t['rate_per_s']:.1f}/s (0.4x bare batch 8), "
            f"median of {n} rounds",
            ", ".join(f"{SERVER_NAMES[s]} {t[f'{s}_vs_ideal_median']:.2f}x" for s in servers),
            "",
        ),
    ]


def parity_rows(par: dict[str, Any]) -> list[Row]:
    """Preprocessing against torchvision's transform, one row per filter."""
    return [
        (
            f"preprocessing vs torchvision's transform, {par['images']} images, {how}",
            f"max {par[how]['max_steps']:.2f} 8-bit steps, "
            f"{par[how]['values_differing_pct']:.3f}% of values differ; ResNet-50 top-1 "
            f"agreement {par[how]['top1_agreement_pct']:.1f}%, logits within "
            f"{par[how]['max_logit_diff_pct_of_largest']:.2f}% of the largest",
            "",
        )
        for how in ("bilinear", "bicubic")
    ]


def gateway_rows(results: dict[str, Any]) -> list[Row]:
    """The closed-loop, overload, tracing, Triton and preprocessing rows of a full run."""
    rows = gateway_alone_rows(
        results["gateway_rest_onnxruntime"], results["gateway_grpc_onnxruntime"]
    )
    if "overload" in results:
        rows += overload_rows(results["overload"])
    if "tracing" in results:
        t = results["tracing"]
        rows.append(
            (
                "tracing on (100 % sampled, OTLP to a local receiver) vs off, 16 clients",
                f"{t['on_images_per_s']} vs {t['off_images_per_s']} img/s "
                f"({t['spans_received']} spans received)",
                f"{t['on_vs_off']:.2f}x off (target 0.95x)",
            )
        )
    if "gateway_rest_triton" in results:
        t = results["gateway_rest_triton"]
        rows += [
            (
                "gateway REST -> Triton (python backend + ORT), 16 clients",
                f"{t['clients16']['images_per_s']:.1f} img/s",
                f"{t['ratio_vs_bare_batch8']:.2f}x",
            ),
            ("  latency p50 / p99, 16 clients", p50_p99(t["clients16"]), ""),
        ]
    pre = results["preprocess"]
    rows += [
        ("preprocess 500x375 JPEG -> 224 tensor", f"{pre['jpeg_500x375_ms']} ms", ""),
        (
            "preprocess 4032x3024 JPEG, draft / full decode",
            f"{pre['jpeg_4032x3024_draft_ms']} / {pre['jpeg_4032x3024_full_decode_ms']} ms",
            "",
        ),
    ]
    return rows


def gateway_alone_rows(rest: dict[str, Any], grpc: dict[str, Any]) -> list[Row]:
    """The gateway alone: REST under 16 and 1 clients and Poisson arrivals, gRPC."""
    return [
        (
            "gateway REST (embedded ORT), 16 clients",
            f"{rest['clients16']['images_per_s']:.1f} img/s",
            f"{rest['ratio_vs_bare_batch8']:.2f}x",
        ),
        ("  latency p50 / p99, 16 clients", p50_p99(rest["clients16"]), ""),
        ("  latency p50 / p99, 1 client", p50_p99(rest["clients1"]), ""),
        (
            f"  Poisson {rest['poisson_half_bare']['rate_per_s']}/s (half of bare): p50 / p99",
            p50_p99(rest["poisson_half_bare"]),
            "",
        ),
        (
            "gateway gRPC API (embedded ORT), 16 clients",
            f"{grpc['clients16']['images_per_s']:.1f} img/s ({grpc['ratio_vs_rest']:.2f}x REST)",
            f"{grpc['ratio_vs_bare_batch8']:.2f}x",
        ),
        ("  gRPC latency p50 / p99, 16 clients", p50_p99(grpc["clients16"]), ""),
    ]


def overload_rows(ov: dict[str, Any]) -> list[Row]:
    """One row per overload loop."""
    rows = []
    for name in ("2x", "10x", "10x_no_backoff"):
        row = ov[name]
        rows.append(
            (
                f"overload {name} ({row['clients']} clients, {ov['timeout_s']}s timeout): "
                "goodput; 503 p50; 200 p99; 504s; sent/answered; gateway cores",
                f"{row['goodput_images_per_s']} img/s; {row['refused_p50_ms']} ms; "
                f"{row['accepted_p99_ms']} ms; {row['late_504']}; "
                f"{row['sent']}/{row['answered_by_server']}; {row['gateway_cores']}",
                f"{row['goodput_vs_unloaded']:.2f}x unloaded",
            )
        )
    return rows


def cost_table(cost: dict[str, Any]) -> str:
    """The "gateway cost per image" table: server CPU per request (from /proc) beside the floors."""
    heads = {**SERVER_NAMES, "gateway": "gateway (float planes)"}
    servers = [s for s in COST_SERVERS if all(s in r for r in cost.values())]
    lines = [
        "| image | decode floor | gateway preprocessing | "
        + " | ".join(heads[s] for s in servers)
        + " | gateway beyond preprocessing |",
        "|---" * (len(servers) + 4) + "|",
    ]
    for key, r in cost.items():
        cells = [
            f"{r[s]['cpu_ms_per_request']:.2f} ms ({r[s + '_vs_floor']:.2f}x)" for s in servers
        ]
        lines.append(
            f"| {key} ({r['bytes']:,} bytes) | {r['decode_floor_ms']:.2f} ms "
            f"| {r['preprocess_ms']:.2f} ms | "
            + " | ".join(cells)
            + f" | {r['gateway_beyond_preprocess_ms']:.2f} ms |"
        )
    first: dict[str, Any] = next(iter(cost.values()), {})
    if "triton_request_bytes_per_image" in first:
        b = first["triton_request_bytes_per_image"]
        rates = [
            f"{heads[s]} {first[s + '_rate_vs_embedded']:.2f}x"
            for s in TRITON_SERVERS
            if s + "_rate_vs_embedded" in first
        ]
        lines.append(
            f"\ngRPC request to Triton per image (batch 8): float planes {b['grpc_float32']:,.0f} "
            f"bytes, uint8 {b['grpc_uint8']:,.0f} bytes, uint8 in shared memory "
            f"{b['shm_uint8']:,.0f} bytes."
            # Without Triton (--no-triton) there are no rates to set beside the embedded one.
            + (
                f" Requests/s vs the embedded uint8 gateway, {next(iter(cost))}: "
                + ", ".join(rates)
                if rates
                else ""
            )
        )
    return "\n".join(lines)


def _median(rounds: list[dict[str, float]], name: str) -> float:
    values = sorted(r[name] for r in rounds)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _ratio(r: dict[str, Any]) -> str:
    """A ratio's median, its rounds, and its target's verdict where it has one."""
    each = ", ".join(f"{x:.2f}" for x in r["rounds"])
    verdict = ""
    if r["target"] is not None:
        verdict = f"; target {r['target']:.2f}x: {'met' if r['met'] else 'MISSED'}"
    return f"**{r['median']:.2f}x** (rounds {each}{verdict})"


def engines_table(e: dict[str, Any], machine: dict[str, Any]) -> str:
    """The engines phase: bare engines on the same files, the gateways with each engine, their
    tails against the ideal server, and BF16's and INT8's agreement with FP32."""
    bare, gw, ratios = (
        e["bare_batch8_images_per_s"],
        e["gateway_clients16_images_per_s"],
        e["ratios"],
    )
    own = e["gateway_vs_own_bare"]
    lines = [
        f"CPU: {machine['isa']}; flags {', '.join(machine.get('flags', []))}; "
        f"{machine.get('cpus', '?')} usable CPUs. Medians of {e['rounds']} interleaved rounds.",
        "",
        "| the same file, bare, batch 8 | ONNX Runtime | OpenVINO | OpenVINO vs ONNX Runtime |",
        "|---|---|---|---|",
    ]
    for what, ort, ov, key in (
        ("FP32, OpenVINO exact (f32)", "ort_fp32", "ov_fp32", "bare_fp32_ov_vs_ort"),
        (
            "FP32 file, OpenVINO in BF16 vs ONNX Runtime FP32",
            "ort_fp32",
            "ov_bf16",
            "bare_bf16_ov_vs_ort_fp32",
        ),
        ("the project's INT8 (QDQ) file", "ort_int8", "ov_int8", "bare_int8_ov_vs_ort"),
    ):
        lines.append(
            f"| {what} | {_median(bare, ort):.1f} img/s | {_median(bare, ov):.1f} img/s "
            f"| {_ratio(ratios[key])} |"
        )
    lines += [
        "",
        "| gateway, REST, 16 clients, 500x375 JPEG | ONNX Runtime | OpenVINO | OpenVINO vs ONNX Runtime |",
        "|---|---|---|---|",
    ]
    for what, ort, ov, key in (
        (
            "FP32 version (ORT) vs `--precision bf16` version (OpenVINO BF16)",
            "ort_fp32",
            "ov_bf16",
            "gateway_bf16_ov_vs_ort_fp32",
        ),
        ("INT8 version", "ort_int8", "ov_int8", "gateway_int8_ov_vs_ort"),
    ):
        lines.append(
            f"| {what} | {_median(gw, ort):.1f} img/s ({own[ort]:.2f}x its bare) "
            f"| {_median(gw, ov):.1f} img/s ({own[ov]:.2f}x its bare) | {_ratio(ratios[key])} |"
        )
    return "\n".join(lines + _engine_tail_lines(e))


def _engine_tail_lines(e: dict[str, Any]) -> list[str]:
    """The Poisson-vs-ideal rows and the demo's agreement rows of engines_table."""
    lines = [
        "",
        "| gateway under Poisson arrivals (0.4x its bare batch 8) | rate | p99 | ideal server p99 | vs ideal |",
        "|---|---|---|---|---|",
    ]
    for name, t in e["poisson_vs_ideal"].items():
        lines.append(
            f"| {ENGINE_GATEWAYS.get(name, name)} | {t['rate_per_s']:.1f}/s | {t['p99_ms']:.0f} ms "
            f"| {t['ideal_p99_ms']:.0f} ms | {t['vs_ideal']:.2f}x |"
        )
    agreement = e.get("demo_agreement", [])
    if not agreement:
        return [*lines, "", "Demo agreement: not read (no --demo-repository given)."]
    lines += [
        "",
        "| demo (ResNet-18, digits) vs FP32 | held-out digits | top-1 agreement | largest logit diff |",
        "|---|---|---|---|",
    ]
    for a in agreement:
        extra = ""
        if "openvino_top1_vs_exact_pct" in a:
            extra = (
                f"; OpenVINO vs exact INT8: {a['openvino_top1_vs_exact_pct']:.2f}% top-1, "
                f"{a['openvino_max_diff_pct_of_largest']:.2f}% of the largest logit"
            )
        lines.append(
            f"| {a['precision'].upper()}: {a['candidate']} | {a['images']} | "
            f"{a['top1_vs_fp32_pct']:.2f}% | {a['max_logit_diff']:.4f} "
            f"({a['kernels']}: {a['kernels_max_diff_pct_of_largest']:.2f}% of the largest){extra} |"
        )
    return lines
