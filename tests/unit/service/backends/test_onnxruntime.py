"""The embedded ONNX Runtime backend's refusal to run a GPU deployment without a GPU."""

from __future__ import annotations

from pathlib import Path

from service.backends.onnxruntime import gpu_driver_missing


def test_a_missing_gpu_driver_is_named_where_onnx_runtime_only_logs_it():
    """libcuda.so.1 is the NVIDIA driver's: present exactly where the kernel module is."""
    driver = Path("/proc/driver/nvidia/version").exists()
    why = gpu_driver_missing()
    assert (why is None) == driver
    if why is not None:
        assert "libcuda.so.1 not found" in why and "\n" not in why
