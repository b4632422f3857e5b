"""The usable CPU count: min(affinity mask, cgroup quota), read from fake cgroup trees."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from service.host.cpus import (
    CpuBudget,
    bf16_isa,
    cpu_budget,
    cpu_isa,
    has_bf16,
    usable_cpus,
)
from tests.helpers.engines import ENGINES, embedded


class Host:
    """A fake ``/proc/self`` and ``/sys/fs/cgroup`` under tmp_path."""

    def __init__(self, tmp_path: Path, proc_cgroup: str | None) -> None:
        self.proc = tmp_path / "proc" / "self"
        self.cg = tmp_path / "sys" / "fs" / "cgroup"
        self.proc.mkdir(parents=True)
        self.cg.mkdir(parents=True)
        if proc_cgroup is not None:
            (self.proc / "cgroup").write_text(proc_cgroup)

    def v2(self, path: str, cpu_max: str | None) -> None:
        """A cgroup v2 directory (relative to the mount) with its cpu.max."""
        d = self.cg / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        if cpu_max is not None:
            (d / "cpu.max").write_text(cpu_max + "\n")

    def v1(self, mount: str, path: str, quota: str, period: str = "100000") -> None:
        d = self.cg / mount / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(quota + "\n")
        (d / "cpu.cfs_period_us").write_text(period + "\n")

    def budget(self, affinity: int = 64, node: int = 64) -> CpuBudget:
        return cpu_budget(self.proc, self.cg, affinity=affinity, node=node)


def test_v2_quota_limits_a_pod_on_a_big_node(tmp_path):
    host = Host(tmp_path, "0::/\n")  # cgroup namespace: we are the root of what we see
    host.v2("", "200000 100000")
    budget = host.budget()
    assert (budget.usable, budget.quota) == (2, 2.0)
    assert budget.describe() == "2 CPUs (cgroup quota 2.0, of 64 on the node, affinity mask 64)"


def test_v2_max_is_no_limit(tmp_path):
    host = Host(tmp_path, "0::/\n")
    host.v2("", "max 100000")
    budget = host.budget(affinity=12)
    assert (budget.usable, budget.quota) == (12, None)
    assert budget.describe() == "12 CPUs (affinity mask 12 of 64 on the node; no cgroup quota)"


@pytest.mark.parametrize(
    ("pod", "container", "expected"),
    [
        ("400000 100000", "max 100000", 4),  # only the pod is limited: it bounds us
        ("400000 100000", "150000 50000", 3),  # the container is tighter (another period)
        ("100000 100000", "300000 100000", 1),  # the parent is tighter than the child
    ],
)
def test_v2_nested_takes_the_tightest_limit_up_the_path(tmp_path, pod, container, expected):
    host = Host(tmp_path, "0::/kubepods.slice/pod1/ctr1\n")
    host.v2("", None)  # the root cgroup has no cpu.max
    host.v2("kubepods.slice", "max 100000")
    host.v2("kubepods.slice/pod1", pod)
    host.v2("kubepods.slice/pod1/ctr1", container)
    host.v2("kubepods.slice/pod2", "50000 100000")  # a sibling's limit is not ours
    assert host.budget().usable == expected


def test_v2_mount_is_the_containers_own_cgroup(tmp_path):
    """No cgroup namespace: /proc says the host's path, the mount is our own cgroup."""
    host = Host(tmp_path, "0::/system.slice/docker-abc.scope\n")
    host.v2("", "300000 100000")
    assert host.budget().usable == 3


def test_v2_mount_is_a_middle_ancestor(tmp_path):
    host = Host(tmp_path, "0::/kubepods/pod1/ctr1\n")
    host.v2("", "800000 100000")  # the mount shows /kubepods: its limit and below
    host.v2("pod1", "max 100000")
    host.v2("pod1/ctr1", "200000 100000")
    assert host.budget().usable == 2


@pytest.mark.parametrize(
    ("cpu_max", "usable", "note"),
    [("150000 100000", 1, "rounded down"), ("50000 100000", 1, "raised to 1")],
)
def test_fractional_quota_is_floored_with_a_minimum_of_one(tmp_path, cpu_max, usable, note):
    host = Host(tmp_path, "0::/\n")
    host.v2("", cpu_max)
    budget = host.budget()
    assert budget.usable == usable
    assert note in budget.describe()


def test_v1_quota(tmp_path):
    host = Host(tmp_path, "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    host.v1("cpu,cpuacct", "", "250000")  # docker's v1 mount: the container's own cgroup
    host.v1("memory", "", "100000")  # not the cpu controller: ignored
    budget = host.budget()
    assert (budget.usable, budget.quota) == (2, 2.5)


def test_v1_cpu_mount_with_the_full_path(tmp_path):
    host = Host(tmp_path, "2:cpuacct,cpu:/kubepods/pod1/ctr\n")
    host.v1("cpuacct,cpu", "kubepods", "-1")
    host.v1("cpuacct,cpu", "kubepods/pod1", "600000")
    host.v1("cpuacct,cpu", "kubepods/pod1/ctr", "-1")
    assert host.budget().usable == 6


def test_v1_minus_one_is_no_limit(tmp_path):
    host = Host(tmp_path, "1:cpu:/\n2:cpuacct:/\n0::/\n")  # this build machine's layout
    host.v1("cpu", "", "-1")
    host.v2("unified", None)  # hybrid: v2 beside v1, without the cpu controller
    budget = host.budget(affinity=2, node=2)
    assert (budget.usable, budget.quota) == (2, None)


def test_hybrid_host_reads_the_cpu_controller_on_v1(tmp_path):
    host = Host(tmp_path, "3:cpu,cpuacct:/\n0::/\n")
    host.v1("cpu,cpuacct", "", "300000")
    (host.cg / "unified").mkdir()
    assert host.budget().usable == 3


def test_no_cgroup_files_at_all(tmp_path):
    assert Host(tmp_path, None).budget(affinity=5).usable == 5
    host = Host(tmp_path / "b", "0::/\n")
    host.cg.rmdir()  # /proc says v2, nothing is mounted
    assert host.budget(affinity=5).usable == 5


@pytest.mark.parametrize(
    "cpu_max", ["banana", "", "100000", "max", "0 100000", "-5 100000", "100000 0", "1 2 3x"]
)
def test_garbage_cpu_max_is_no_limit(tmp_path, cpu_max):
    host = Host(tmp_path, "0::/\n")
    host.v2("", cpu_max)
    assert host.budget(affinity=3).usable == 3


def test_unreadable_files_fall_back_safely(tmp_path):
    host = Host(tmp_path, "0::/\n")
    host.v2("", None)
    (host.cg / "cpu.max").mkdir()  # reading it fails (EISDIR), even as root
    assert host.budget(affinity=4).usable == 4
    (host.proc / "cgroup").unlink()
    (host.proc / "cgroup").write_bytes(b"\xff\xfe0::/\n")  # not text
    assert host.budget(affinity=4).usable == 4
    (host.proc / "cgroup").write_text("garbage\n::\n1\n0::relative\n")
    assert host.budget(affinity=4).usable == 4


def test_v1_garbage_is_no_limit(tmp_path):
    host = Host(tmp_path, "3:cpu:/\n")
    host.v1("cpu", "", "lots", "100000")
    assert host.budget(affinity=4).usable == 4
    host.v1("cpu", "", "200000", "")
    assert host.budget(affinity=4).usable == 4


def test_path_outside_the_cgroup_namespace_reads_the_mount(tmp_path):
    host = Host(tmp_path, "0::/../../other\n")
    host.v2("", "200000 100000")
    host.v2("other", "100000 100000")
    assert host.budget().usable == 2


def test_affinity_smaller_than_the_quota(tmp_path):
    host = Host(tmp_path, "0::/\n")
    host.v2("", "800000 100000")
    budget = host.budget(affinity=2)
    assert budget.usable == 2
    assert budget.describe() == "2 CPUs (affinity mask 2 of 64 on the node; cgroup quota 8.0)"


def test_this_machine():
    budget = cpu_budget()
    assert 1 <= budget.usable <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)
    assert usable_cpus() == budget.usable


@pytest.mark.parametrize("engine", ENGINES)
def test_thread_counts_follow_the_usable_cpus(monkeypatch, engine):
    import service.backends.embedded as embedded_module

    monkeypatch.setattr(embedded_module, "usable_cpus", lambda: 6)
    assert embedded(engine)._threads == 6
    assert embedded(engine, parallel_batches=4)._threads == 1
    assert embedded(engine, intra_op_threads=3)._threads == 3


@pytest.mark.external
@pytest.mark.parametrize("engine", ENGINES)
async def test_gateway_start_logs_and_sizes_from_the_budget(tiny, monkeypatch, caplog, engine):
    import service.backends.embedded as embedded_module
    import service.runtime.core as runtime_module
    from service.dataplane import plane as dataplane
    from service.observability.metrics import Metrics
    from service.runtime.core import Runtime
    from service.settings import Settings

    budget = CpuBudget(usable=3, affinity=64, quota=3.0, node=64)
    monkeypatch.setattr(runtime_module, "cpu_budget", lambda: budget)
    monkeypatch.setattr(dataplane, "usable_cpus", lambda: budget.usable)
    monkeypatch.setattr(embedded_module, "usable_cpus", lambda: budget.usable)
    runtime = Runtime(Settings(repository=tiny.repository, engine=engine), Metrics())
    with caplog.at_level(logging.INFO, logger="service.runtime.core"):
        await runtime.start()
    try:
        assert runtime.plane is not None and runtime.plane.decoder.workers == 3
        assert isinstance(runtime.backend, embedded_module.EmbeddedBackend)
        backend = runtime.backend
        assert backend.name == engine and backend.cpus == 3
        # ONNX Runtime: one batch on the 3; OpenVINO: the streams its hint picks over 3
        # threads, the 3 shared among them.
        assert backend._threads == 3 // backend.max_inflight_batches
        assert engine == "openvino" or backend.max_inflight_batches == 1
        lines = [r.getMessage() for r in caplog.records if "sizing threads" in r.getMessage()]
        assert lines == [
            "sizing threads for 3 CPUs (cgroup quota 3.0, of 64 on the node, affinity mask 64)"
        ]
    finally:
        await runtime.close()


# Flags as /proc/cpuinfo lists them on each kind (trimmed to what decides the kernel path
# and BF16).
@pytest.mark.parametrize(
    ("flags", "isa", "bf16"),
    [
        (
            "fpu sse4_1 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16",
            "AMX",
            "AMX-BF16",
        ),  # Sapphire Rapids
        ("fpu sse4_1 avx2 avx512f avx512bw avx512_vnni avx512_bf16", "AVX-512 VNNI", "AVX512_BF16"),
        ("fpu sse4_1 avx2 avx512f avx512bw avx512_vnni", "AVX-512 VNNI", None),  # Cascade Lake
        ("fpu sse4_1 avx2 avx_vnni", "AVX-VNNI", None),  # Alder Lake
        ("fpu sse4_1 avx2 avx512f avx512bw", "AVX-512", None),  # Skylake-SP: saturating INT8
        ("fpu sse4_1 avx2", "AVX2", None),  # Zen 2/3
        ("fpu sse4_1", "SSE4.1", None),
    ],
)
def test_cpu_isa_and_bf16_from_the_flags(tmp_path, flags, isa, bf16):
    """The INT8 kernel path and the BF16 instructions (Zen 4 and Cooper Lake: AVX512_BF16)
    are read from the first CPU's flags."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_isa(cpuinfo) == isa
    assert (bf16_isa(cpuinfo), has_bf16(cpuinfo)) == (bf16, bf16 is not None)


def test_cpu_isa_without_x86_flags_is_the_architecture(tmp_path):
    """aarch64's /proc/cpuinfo has "Features", not "flags"; a missing file says nothing."""
    import platform

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_isa(tmp_path / "cpuinfo") == platform.machine()
    assert cpu_isa(tmp_path / "missing") == platform.machine()
    assert bf16_isa(tmp_path / "cpuinfo") is bf16_isa(tmp_path / "missing") is None
