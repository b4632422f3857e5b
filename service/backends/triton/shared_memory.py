"""System shared memory for batches to and from a Triton on this host (the chart's sidecar
mode: the gateway in Triton's pod, a memory-backed /dev/shm): the regions, handed out one
per batch in flight, and their registration with Triton."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from typing import Any

import numpy as np
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from service.backends.triton.channels import RESTRICTED, key_sent
from service.model.repository import ModelSpec, RepositoryError

log = logging.getLogger(__name__)


class Region:
    """One system shared memory region: a batch's input, then its logits."""

    def __init__(self, name: str, key: str, byte_size: int) -> None:
        from tritonclient.utils import shared_memory as shm

        self.name, self.key, self.byte_size = name, key, byte_size
        self.handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)

    def view(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        buf = self.handle._mpsm_handle.buf  # tritonclient's mapping of the region
        return np.ndarray(shape, dtype, buffer=buf, offset=offset)

    def destroy(self) -> None:
        from tritonclient.utils import shared_memory as shm

        shm.destroy_shared_memory_region(self.handle)


class SharedMemoryPool:
    """One region per batch in flight, each sized for the largest batch of any model
    served, registered with Triton at start and again whenever Triton lost them (it
    restarted), unregistered and removed at close."""

    def __init__(self, count: int, byte_size: int) -> None:
        # A region's pages are allocated as they are written: one that does not fit in
        # /dev/shm (a tmpfs) would kill the gateway with SIGBUS mid-batch, so refuse now.
        fs = os.statvfs("/dev/shm")
        free, needed = fs.f_bavail * fs.f_frsize, count * byte_size
        if needed > free:
            raise RepositoryError(
                f"shared memory: {count} regions of {byte_size} bytes need {needed} bytes and "
                f"/dev/shm has {free} free: give it more (the chart: triton.sidecar.maxBatchSize "
                "and bytesPerImage) or set TRITON_SHARED_MEMORY=false"
            )
        prefix = f"resnet-serving-{os.getpid()}-{id(self):x}"
        self.byte_size = byte_size
        from tritonclient.utils.shared_memory import SharedMemoryException

        self.regions: list[Region] = []
        for i in range(count):
            try:
                self.regions.append(Region(f"{prefix}-{i}", f"/{prefix}-{i}", byte_size))
            except SharedMemoryException as exc:  # its cause (an OSError) says why
                self.destroy()
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                reason = getattr(cause, "strerror", None) or str(cause)
                raise RepositoryError(
                    f"shared memory: cannot create /dev/shm/{prefix}-{i} ({reason}): /dev/shm "
                    f"must be writable by uid {os.getuid()} (the chart's emptyDir is), or set "
                    "TRITON_SHARED_MEMORY=false"
                ) from None
        self._free: asyncio.Queue[Region] = asyncio.Queue()
        for region in self.regions:
            self._free.put_nowait(region)

    async def acquire(self) -> Region:
        return await self._free.get()

    def release(self, region: Region) -> None:
        self._free.put_nowait(region)

    async def register(
        self, client: InferenceServerClient, pod: str, headers: dict[str, str] | None
    ) -> None:
        """Register with the Triton at ``pod`` (``client``, its channel) each region it does
        not hold: all of them at start, all again after Triton restarted (it forgets them)."""
        try:
            status = await client.get_system_shared_memory_status(
                headers=headers, as_json=True, client_timeout=5
            )
            held = set(status.get("regions", {}))
            missing = [r for r in self.regions if r.name not in held]
            for region in missing:
                await client.register_system_shared_memory(
                    region.name,
                    region.key,
                    region.byte_size,
                    headers=headers,
                    client_timeout=5,
                )
        except InferenceServerException as exc:
            if RESTRICTED in str(exc):
                raise RepositoryError(
                    f"Triton at {pod} restricts its shared-memory protocol to a key, and the "
                    f"gateway sent {key_sent(headers)} (RESNET_SERVE_TRITON_ADMIN_KEY)"
                ) from exc
            raise
        if missing:
            log.info(
                "triton: %d shared memory regions of %d bytes registered with Triton at %s",
                len(missing),
                self.byte_size,
                pod,
            )

    async def unregister(
        self, client: InferenceServerClient, headers: dict[str, str] | None
    ) -> None:
        """Take every region back from Triton (at close), as far as it answers."""
        for region in self.regions:
            with contextlib.suppress(InferenceServerException):
                await client.unregister_system_shared_memory(
                    region.name, headers=headers, client_timeout=5
                )

    def destroy(self) -> None:
        for region in self.regions:
            region.destroy()


def shared_memory_bytes(specs: list[ModelSpec]) -> int:
    """A region's size: the largest batch of any model, its input and its FP32 logits."""
    per_image = [
        math.prod(s.contract.input_shape) * np.dtype(s.contract.dtype).itemsize
        + 4 * s.contract.num_classes
        for s in specs
    ]
    return max(s.max_batch_size * b for s, b in zip(specs, per_image, strict=True))
