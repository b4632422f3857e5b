"""How many CPUs this process may really use: the one number every thread count comes from.

``os.cpu_count()`` is the node's core count. In a container it is not what the process
gets: a Kubernetes pod with ``limits.cpu: 2`` on a 64-core node sees 64 cores but is given
2 CPUs' worth of time per CFS period, and 64 decoding processes plus 64 ONNX Runtime threads
would spend most of it fighting over those 2 (and being throttled). Two limits apply:

* the **affinity mask** (``sched_getaffinity``): the cores the scheduler may run us on
  (taskset, cgroup cpusets, Kubernetes' static CPU manager all show up here);
* the **cgroup CPU quota**: CPU time per period, cgroup v2 ``cpu.max`` (``"150000 100000"``
  is 1.5 CPUs, ``"max 100000"`` none) or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
  (quota -1: none). A parent cgroup's quota bounds its children (a pod's bounds its
  containers), so the whole path up to the mount's root is read and the tightest wins.

The usable count is the smaller of the two, and never below 1. Anything unreadable or
malformed counts as "no limit found" (the affinity mask still applies): a missing or odd
cgroup file must never stop the gateway.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: v1 directories the ``cpu`` controller is mounted on, in the order distributions use.
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class CpuBudget:
    """The usable CPU count and where it came from (for the startup log)."""

    usable: int
    #: CPUs in this process's affinity mask.
    affinity: int
    #: The tightest cgroup CPU quota, in CPUs (1.5 = 150 ms per 100 ms); None: no quota.
    quota: float | None
    #: The node's core count (``os.cpu_count()``), for the log only.
    node: int | None

    def describe(self) -> str:
        """``"2 CPUs (cgroup quota 2.0 of 64 on the node, affinity mask 64)"``, and the like:
        the count and which limit set it."""
        cpus = f"{self.usable} CPU{'s' if self.usable != 1 else ''}"
        node = f"{self.node} on the node" if self.node else "node size unknown"
        if self.quota is not None and self.quota < self.affinity:
            quota = f"cgroup quota {_cpus(self.quota)}"
            if self.usable < self.quota:
                quota += ", rounded down"
            elif self.usable > self.quota:
                quota += ", raised to 1"
            return f"{cpus} ({quota}, of {node}, affinity mask {self.affinity})"
        quota = "no cgroup quota" if self.quota is None else f"cgroup quota {_cpus(self.quota)}"
        return f"{cpus} (affinity mask {self.affinity} of {node}; {quota})"


def _cpus(value: float) -> str:
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


def cpu_budget(
    proc_self: Path = Path("/proc/self"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    affinity: int | None = None,
    node: int | None = None,
) -> CpuBudget:
    """The CPUs this process may use: ``min(affinity mask, cgroup quota)``, at least 1.

    The roots (and the affinity and node counts) are parameters so tests can point them at
    a fake cgroup tree. A fractional quota is rounded **down** (with a floor of 1), as Go's
    automaxprocs does: with a 1.5-CPU quota, two busy threads use up the period's 150 ms
    in 75 ms and are then throttled for the remaining 25 ms, a latency spike on every
    batch; one thread never outruns the quota. Latency is what this gateway sells, so it
    gives up the half CPU rather than add the stall (set the thread counts explicitly to
    choose otherwise)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    if node is None:
        node = os.cpu_count()
    quota = cgroup_quota(proc_self, cgroup_root)
    usable = affinity if quota is None else min(affinity, int(quota))
    return CpuBudget(max(1, usable), affinity, quota, node)


def usable_cpus() -> int:
    """How many CPU-bound threads this process should run at most (see :func:`cpu_budget`)."""
    return cpu_budget().usable


def cgroup_quota(proc_self: Path, cgroup_root: Path) -> float | None:
    """The tightest CPU quota (in CPUs) over this process's cgroups, v2 and v1; None: none.

    Both hierarchies are read when ``/proc/self/cgroup`` names them: on a hybrid host the
    ``cpu`` controller lives on v1 while the v2 hierarchy (``unified/``) has no ``cpu.max``,
    so each contributes whatever limit it really holds."""
    try:
        lines = (proc_self / "cgroup").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue  # malformed line
        if hierarchy == "0" and controllers == "":
            # Mounted on cgroup_root (unified mode), or on unified/ beside v1 (hybrid mode).
            v2 = cgroup_root
            if not (v2 / "cgroup.controllers").exists():
                v2 = cgroup_root / "unified"
            if v2.is_dir():
                quotas += _quotas(v2, path, _read_v2)
        elif "cpu" in controllers.split(","):
            for name in _V1_CPU_DIRS:
                if (cgroup_root / name).is_dir():
                    quotas += _quotas(cgroup_root / name, path, _read_v1)
                    break
    return min(quotas, default=None)


def _quotas(root: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on ``path``'s cgroup and each of its ancestors visible under ``root``.

    ``path`` is as ``/proc/self/cgroup`` gives it, relative to the hierarchy's root. Inside
    a container the mount is often the container's own cgroup instead (cgroup v1, or v2
    without a cgroup namespace): then ``root/path`` does not exist, and the longest tail of
    the path that does, else the mount's root itself, is this process's cgroup."""
    parts = PurePosixPath(path).parts[1:]
    if ".." in parts:  # outside our cgroup namespace's root: only the mount is visible
        parts = ()
    start = root
    for i in range(len(parts) + 1):
        candidate = root.joinpath(*parts[i:])
        if candidate.is_dir():
            start = candidate
            break
    found = []
    node = start
    while True:
        if (quota := read(node)) is not None:
            found.append(quota)
        if node == root:
            return found
        node = node.parent


def _read_v2(directory: Path) -> float | None:
    """``cpu.max``: ``"$MAX $PERIOD"``, MAX ``max`` for no limit."""
    fields = _read(directory / "cpu.max").split()
    return _ratio(*fields) if len(fields) == 2 else None


def _read_v1(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; quota -1 for no limit."""
    return _ratio(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))


def _read(file: Path) -> str:
    try:
        return file.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


#: The integer-kernel path ONNX Runtime's CPU kernels (MLAS) take for INT8, by the CPU
#: flags it dispatches on, most capable first. It matters because the paths round
#: differently: AVX2 and AVX-512 without VNNI add pairs of u8 x s8 products in 16 bits
#: with saturation (VPMADDUBSW), VNNI and AMX accumulate in 32 bits exactly, so the same
#: INT8 file can answer differently by path unless its weights leave room (export.quantize).
_ISA_FLAGS = (
    ("AMX", {"amx_tile", "amx_int8"}),
    ("AVX-512 VNNI", {"avx512_vnni", "avx512bw"}),
    ("AVX-VNNI", {"avx_vnni", "avx2"}),
    ("AVX-512", {"avx512bw"}),
    ("AVX2", {"avx2"}),
    ("SSE4.1", {"sse4_1"}),
)


#: The BF16 instructions a CPU may have, most capable first: with either, OpenVINO runs FP32
#: models in BF16 (unless told ``INFERENCE_PRECISION_HINT=f32``); without both, a BF16
#: version is served exactly in FP32. AMD Zen 4 and later and Intel Cooper Lake have
#: AVX512_BF16; Intel Sapphire Rapids and later also AMX-BF16.
_BF16_FLAGS = (
    ("AMX-BF16", {"amx_tile", "amx_bf16"}),
    ("AVX512_BF16", {"avx512_bf16"}),
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it lists none)."""
    for line in _read(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The instruction set this machine's CPU kernels run on ("AVX2", "AVX-512 VNNI",
    "AMX"...), from the CPU flags; the machine's architecture where there are no x86 flags
    to read (``aarch64``)."""
    flags = cpu_flags(cpuinfo)
    for name, needed in _ISA_FLAGS:
        if needed <= flags:
            return name
    return platform.machine() or "unknown"


def bf16_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The BF16 instructions this CPU has ("AMX-BF16", "AVX512_BF16"), None: none."""
    flags = cpu_flags(cpuinfo)
    return next((name for name, needed in _BF16_FLAGS if needed <= flags), None)


def has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in BF16 natively (see :func:`bf16_isa`)."""
    return bf16_isa(cpuinfo) is not None
