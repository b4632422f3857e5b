"""Decoding in processes of their own, each fed by the event loop through shared memory.

Why processes: decoding threads in the gateway's process share its interpreter lock with
the event loop. Pillow and numpy release the lock around each piece of native work and
take it back after, so a decode on a thread hands the lock back and forth with the loop a
dozen times per image: on two cores ~13 voluntary context switches per request, against
under 3 with processes (docs/benchmarks.md, "Decoding processes and a leaner request
path"; the CPU per request measured the same within the noise either way). A process of
its own decodes with a lock nobody else wants, and costs the gateway two wake-ups per
image: the job's message, and the answer's.

How an image travels: the loop copies the request's bytes into the worker's input region
(a memfd both processes map), writes a small job message on a socket pair, and returns to
its other work; the worker decodes and preprocesses exactly as ``service.dataplane.preprocess`` says
(the same function, the same contract), writes the tensor into its output region, and
answers with a small message; the loop's reader copies the tensor into the request's batch
row. Regions start at 1 MiB and grow to what an image needs; past 8 MiB they shrink back
after it (the pages a 20 MB upload touched are given back, as ``service.host.memory`` does for
the heap).

A worker that dies (a decoder crashing on a hostile file, the kernel's OOM killer) fails
the image it had (400: the image could not be decoded) and is replaced; the gateway goes
on. Workers are started with the data plane, each with ``python -m
service.dataplane.decode_workers``: nothing is forked from the gateway's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import errors
from service.dataplane.preprocess import DecodeLimits
from service.model.contract import PreprocessContract

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<I")  # each message: its length, then its pickle
#: A region's size at start; it grows to what an image needs.
BASE_REGION = 1 << 20
#: What a region keeps after a larger job (a phone's photo, its 224x224 float planes): more
#: is given back, less is not worth a resize (page faults on every large image: a 12 MP
#: JPEG measured +5 ms per request when its region shrank to 1 MiB after each).
KEEP_REGION = 8 << 20
#: The errors a worker may answer with (anything else it reports as an invalid image).
_ERRORS: dict[str, type[errors.ServiceError]] = {
    cls.__name__: cls
    for cls in (errors.InvalidImage, errors.PayloadTooLarge, errors.UnsupportedMediaType)
}
#: How long close() waits for a worker to exit after its socket closes, before SIGKILL.
EXIT_WAIT_S = 5.0
#: Workers that die before they are ready, in a row, before no more are started.
MAX_FAILED_STARTS = 3


@dataclass(frozen=True, slots=True)
class PreprocessJob:
    """One image to preprocess by ``contract``, into ``out`` (its row of the request's batch)."""

    contract: PreprocessContract
    limits: DecodeLimits
    data: bytes
    out: np.ndarray


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(body)) + body


class _Region:
    """A memfd both processes map: created here, inherited by the worker (pass_fds)."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name)
        self.size = 0
        self.map: mmap.mmap | None = None
        self.resize(BASE_REGION)

    def resize(self, size: int) -> None:
        if self.map is not None:
            self.map.close()
        os.ftruncate(self.fd, size)  # shrinking gives the pages beyond back to the kernel
        self.size = size
        self.map = mmap.mmap(self.fd, size)

    def fit(self, n: int) -> mmap.mmap:
        """The mapping, grown to hold ``n`` bytes (a power of two) if it cannot yet."""
        if n > self.size:
            self.resize(1 << (n - 1).bit_length())
        assert self.map is not None
        return self.map

    def settle(self) -> None:
        """Down to KEEP_REGION after a job that needed more."""
        if self.size > KEEP_REGION:
            self.resize(KEEP_REGION)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


class DecoderProcess:
    """One worker process and the loop's end of it: one job at a time."""

    def __init__(self, contract_ids: dict[PreprocessContract, int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._ids = contract_ids  # shared by the workers: the same id for the same contract
        self._known: set[int] = set()  # the contract ids this worker has been sent
        self._in, self._out = _Region("resnet-serve-image"), _Region("resnet-serve-tensor")
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), self._in.fd, self._out.fd)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.dataplane.decode_workers", *map(str, fds)],
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._received = bytearray()
        self.ready = False
        self.dead = False
        self._job: PreprocessJob | None = None
        self._result: asyncio.Future[float] | None = None
        self._loop.add_reader(ours.fileno(), self._readable)

    def submit(self, job: PreprocessJob) -> asyncio.Future[float]:
        """Start ``job`` (this worker is idle); its future is the worker's seconds of work."""
        assert self._result is None and not self.dead
        c = job.contract
        key = self._ids.setdefault(c, len(self._ids))
        contract = None if key in self._known else c.model_dump_json()
        self._known.add(key)
        self._in.fit(len(job.data))[: len(job.data)] = job.data
        self._out.fit(job.out.nbytes)
        limits = (job.limits.max_pixels, job.limits.jpeg_draft, job.limits.draft_margin)
        message = (key, contract, limits, len(job.data), self._in.size, self._out.size)
        self._job, self._result = job, self._loop.create_future()
        # A few hundred bytes into an empty socket buffer (one job at a time): never blocks.
        self._sock.send(_frame(message))
        return self._result

    def _readable(self) -> None:
        try:
            chunk = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._died()
            return
        self._received += chunk
        while len(self._received) >= _FRAME.size:
            (n,) = _FRAME.unpack_from(self._received)
            if len(self._received) < _FRAME.size + n:
                return
            message = pickle.loads(self._received[_FRAME.size : _FRAME.size + n])
            del self._received[: _FRAME.size + n]
            self._answered(message)

    def _answered(self, message: tuple[Any, ...]) -> None:
        if message[0] == "ready":
            self.ready = True
            return
        job, result = self._job, self._result
        assert job is not None and result is not None
        self._job = self._result = None
        if not result.done():  # its caller may have stopped waiting (deadline, gone)
            if message[0] == "ok":
                assert self._out.map is not None
                tensor = np.frombuffer(self._out.map, job.out.dtype, job.out.size)
                job.out.reshape(-1)[...] = tensor
                del tensor  # the mapping can be resized again
                result.set_result(message[1])
            else:
                result.set_exception(_ERRORS.get(message[1], errors.InvalidImage)(message[2]))
        self._in.settle()
        self._out.settle()

    def _died(self) -> None:
        self.dead = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        result, self._result, self._job = self._result, None, None
        if result is None:
            log.warning("decoding process %d exited while idle", self.proc.pid)
        elif not self.ready:
            log.error("decoding process %d exited before it was ready", self.proc.pid)
            if not result.done():
                result.set_exception(errors.InternalError())
        else:
            log.warning("decoding process %d died on an image; replacing it", self.proc.pid)
            if not result.done():
                result.set_exception(
                    errors.InvalidImage("the image could not be decoded (its decoder failed on it)")
                )

    async def close(self) -> None:
        if not self.dead:
            self.dead = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()  # the worker reads the end of its input and exits
            if self._result is not None and not self._result.done():
                self._result.set_exception(errors.ShuttingDown("the gateway is shutting down"))
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), EXIT_WAIT_S)
        except TimeoutError:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self._in.close()
        self._out.close()


class DecoderProcesses:
    """``count`` decoding processes (``service.dataplane.decode_scheduler.Workers``): a job goes to an idle
    one; one that died is replaced as its job ends, or as it is picked if it died idle."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._ids: dict[PreprocessContract, int] = {}
        self._all: set[DecoderProcess] = set()
        self._idle: list[DecoderProcess] = []
        self._started = False
        self._failed_starts = 0  # in a row: processes that died before they were ready

    def start(self) -> None:
        """Start the processes (they get ready while the gateway does)."""
        if not self._started:
            self._started = True
            self._idle = [self._new() for _ in range(self.count)]

    def _new(self) -> DecoderProcess:
        worker = DecoderProcess(self._ids)
        self._all.add(worker)
        return worker

    def submit(self, job: PreprocessJob) -> asyncio.Future[float]:
        self.start()
        worker = self._idle.pop()
        if worker.dead:
            worker = self._replace(worker)
        if worker.dead:  # no more are started (MAX_FAILED_STARTS)
            self._idle.append(worker)
            raise errors.InternalError()
        done = worker.submit(job)
        done.add_done_callback(lambda _: self._idle.append(self._replace(worker)))
        return done

    def _replace(self, worker: DecoderProcess) -> DecoderProcess:
        """``worker``, or a new process in its place if it died."""
        if not worker.dead:
            if worker.ready:
                self._failed_starts = 0
            return worker
        self._failed_starts = 0 if worker.ready else self._failed_starts + 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            log.error("decoding processes keep exiting before they are ready; none is started")
            return worker
        self._all.discard(worker)
        asyncio.get_running_loop().create_task(worker.close())
        return self._new()

    async def close(self) -> None:
        workers, self._all, self._idle = self._all, set(), []
        await asyncio.gather(*(w.close() for w in workers))


# --- the worker's side ----------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _serve(sock: socket.socket, in_fd: int, out_fd: int) -> None:
    """Answer jobs until the gateway closes its end: preprocess each image from the input
    region into the output region."""
    from service.dataplane.preprocess import preprocess

    contracts: dict[int, PreprocessContract] = {}
    maps: dict[int, mmap.mmap] = {}

    def mapped(fd: int, size: int) -> mmap.mmap:
        if fd not in maps or len(maps[fd]) != size:
            if fd in maps:
                maps[fd].close()
            maps[fd] = mmap.mmap(fd, size)
        return maps[fd]

    sock.sendall(_frame(("ready",)))
    while (head := _recv_exactly(sock, _FRAME.size)) is not None:
        body = _recv_exactly(sock, _FRAME.unpack(head)[0])
        if body is None:
            return
        key, contract, limits, n, in_size, out_size = pickle.loads(body)
        if contract is not None:
            contracts[key] = PreprocessContract.model_validate_json(contract)
        c = contracts[key]
        data = mapped(in_fd, in_size)[:n]
        start = time.perf_counter()
        out: np.ndarray = np.ndarray(c.input_shape, c.dtype, buffer=mapped(out_fd, out_size))
        try:
            preprocess(data, c, DecodeLimits(*limits), out)
            answer: tuple[Any, ...] = ("ok", time.perf_counter() - start)
        except errors.ServiceError as exc:
            answer = ("error", type(exc).__name__, exc.message)
        finally:
            del out  # the output mapping may be resized before the next job
        sock.sendall(_frame(answer))


def main() -> None:
    # The gateway decides when a worker stops (it closes the socket): Ctrl-C in a terminal,
    # sent to the whole process group, must not fail the images being decoded as it drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock_fd, in_fd, out_fd = (int(a) for a in sys.argv[1:4])
    with (
        socket.socket(fileno=sock_fd) as sock,
        contextlib.suppress(BrokenPipeError, ConnectionResetError),  # the gateway is gone
    ):
        _serve(sock, in_fd, out_fd)


if __name__ == "__main__":
    main()
