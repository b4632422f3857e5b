"""Overload: a gateway of its own whose requests have a deadline, under 2x and 10x the
clients it can serve within it (clients that wait Retry-After; 10x also without)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from deploy.benchmarks.common import load, log, start_gateway
from deploy.benchmarks.cpu_accounting import process_cpu_s
from service.host.processes import GatewayProcess
from service.tools.bench.loops import Step

#: The overload phase's load generator yields the CPU to the gateway (see overload()).
LOAD_NICENESS = 19


def load_niced(gw: GatewayProcess, body: bytes, niceness: int, **kw: Any) -> Step:
    """:func:`load` on a thread of its own at a lower CPU priority (Linux's niceness is per
    thread, and the threads it starts inherit it): on the machine the gateway runs on, the
    load generator then takes only the CPU the gateway leaves, as clients elsewhere would,
    instead of half the cores under a retry storm."""
    done: list[Step] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
            done.append(load(gw, body, **kw))
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="load-niced")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return done[0]


def overload(
    repo: Path, body: bytes, unloaded: float, seconds: float, timeout_s: float
) -> dict[str, Any]:
    """Closed loops of 2x and 10x the clients the replica can serve within ``timeout_s``
    (its unloaded throughput x the timeout), on a gateway whose requests have that
    deadline: goodput, how fast refusals come, whether accepted requests keep their
    deadline, sent = answered. Clients wait Retry-After (jittered) as retry policies do;
    the 10x loop also runs with clients that retry at once, the worst case.

    The load generator shares the gateway's cores here (in production the clients are
    elsewhere), and a retry storm's sends cost CPU on both sides of the socket: it runs at
    niceness 19 (``LOAD_NICENESS``), taking what the gateway leaves, and each loop reports
    the cores the gateway's process tree had (from /proc). A starved generator reads its
    answers late: its refusal latencies are an upper bound on the gateway's."""
    capacity = max(1, round(unloaded * timeout_s))
    out: dict[str, Any] = {"timeout_s": timeout_s, "capacity_clients": capacity}
    # Its own gateway: the deadline is the server's (service.tools.bench sends no per-request
    # timeout header). Each loop has 3 s of warm-up: the gateway is warm and the clients'
    # connections are open when the window starts.
    gw = start_gateway(repo, env={"RESNET_SERVE_REQUEST_TIMEOUT_S": str(timeout_s)})

    def loop(clients: int, polite: bool) -> tuple[Step, float]:
        cpu, start = process_cpu_s(gw.proc.pid), time.monotonic()
        r = load_niced(
            gw, body, LOAD_NICENESS, seconds=seconds, clients=clients, warmup_s=3, polite=polite
        )
        return r, (process_cpu_s(gw.proc.pid) - cpu) / (time.monotonic() - start)

    try:
        for name, clients, polite in (
            ("2x", 2 * capacity, True),
            ("10x", 10 * capacity, True),
            ("10x_no_backoff", 10 * capacity, False),
        ):
            log(f"overload {name}: {clients} clients, timeout {timeout_s}s ...")
            r, cores = loop(clients, polite)
            row = {
                "clients": clients,
                "goodput_images_per_s": round(r.images_per_s, 2),
                "goodput_vs_unloaded": round(r.images_per_s / unloaded, 3),
                "gateway_cores": round(cores, 2),
                "refused_p50_ms": round(r.latency_ms(50, "503"), 1),
                "accepted_p99_ms": round(r.latency_ms(99), 1),
                "late_504": r.statuses.get("504", 0),
                "statuses": r.statuses,
                "sent": r.requests,
                "answered_by_server": r.server["requests"],
                "server": r.server,
            }
            log(f"  {row}")
            out[name] = row
    finally:
        gw.stop()
    return out
