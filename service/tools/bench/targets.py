"""The four ways into the gateway, as a load tool needs them: every request is encoded
once before the run (an HTTP request's bytes, a gRPC message's serialized bytes), and a
send is a write and a read on a kept connection. The answer is a status and nothing else:
the tool measures, it does not parse predictions.

REST and KServe v2 HTTP speak HTTP/1.1 over raw asyncio streams (a fraction of a
millisecond of CPU per request: on a 2-core machine the client must not take what the
server needs); gRPC goes through grpc.aio with identity serializers, so no protobuf work
happens per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from service.tools.bench import BenchError

Protocol = Literal["rest", "grpc", "kserve-http", "kserve-grpc"]
PROTOCOLS: tuple[Protocol, ...] = ("rest", "grpc", "kserve-http", "kserve-grpc")
OK_STATUS = {"rest": "200", "kserve-http": "200", "grpc": "OK", "kserve-grpc": "OK"}


@dataclass(frozen=True)
class Answer:
    #: HTTP status ("200", "503"), gRPC code name ("OK", "UNAVAILABLE"), or the client's
    #: own failure: "connect_error", "timeout", "connection_closed".
    status: str
    ok: bool
    #: Seconds the server asked to wait (Retry-After / retry-after metadata), else 0.
    retry_after: float = 0.0


class Target:
    """One gateway endpoint and one model. ``open`` checks both (one-line BenchError);
    ``send(i)`` sends the i-th prepared payload (cycled) and returns its Answer."""

    protocol: Protocol

    def __init__(
        self,
        url: str,
        model: str,
        payloads: Sequence[Sequence[bytes]],
        api_key: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.images_per_request = len(payloads[0])
        self._payloads = [self.encode(images) for images in payloads]

    def encode(self, images: Sequence[bytes]) -> Any:
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def send(self, i: int) -> Answer:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    def payload(self, i: int) -> Any:
        return self._payloads[i % len(self._payloads)]


# --- HTTP/1.1 ---------------------------------------------------------------------------


def _split_http(url: str) -> tuple[str, int, bool, str]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"--url {url}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise BenchError(f"--url {url}: {exc}") from None
    return parts.hostname, port, tls, parts.path.rstrip("/")


def multipart_body(images: Sequence[bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``file`` part per image: (body, content type)."""
    boundary = "resnet-bench-boundary-7d3f"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{n}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + img
        + b"\r\n"
        for n, img in enumerate(images)
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def kserve_binary_body(images: Sequence[bytes]) -> tuple[bytes, int]:
    """A KServe v2 infer body with one BYTES input ``images`` in the binary tensor
    extension (each element a little-endian uint32 length and the file's bytes): (body,
    length of its JSON header, for Inference-Header-Content-Length)."""
    data = b"".join(struct.pack("<I", len(img)) + img for img in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(images)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    return header + data, len(header)


def _head(method: str, path: str, host: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpTarget(Target):
    """Keep-alive HTTP/1.1 connections; a connection is used by one request at a time."""

    def __init__(self, url: str, model: str, *args: Any, **kwargs: Any) -> None:
        self.host, self.port, self.tls, self.prefix = _split_http(url)
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        super().__init__(url, model, *args, **kwargs)

    def _auth(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = ssl.create_default_context() if self.tls else None
        return await asyncio.open_connection(self.host, self.port, ssl=ctx)

    async def _exchange(self, request: bytes) -> tuple[int, float, bytes]:
        """Send on an idle connection (a fresh one if none, or if the idle one was closed
        by the server's keep-alive timeout); (status, Retry-After, body)."""
        # The connection idle longest: after a 503 the gateway does not read a connection
        # for part of Retry-After (service/transports/http/guard.py), so the one released last would
        # hand that pause to another client (a polite client's 503 took 40-140 ms, not 1).
        conn = self._idle.popleft() if self._idle else None
        for attempt in (0, 1):
            if conn is None:
                conn = await self._connect()
            reader, writer = conn
            try:
                writer.write(request)
                status, retry_after, body, keep = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                writer.close()
                conn = None
                if attempt:
                    raise
                continue
            if keep:
                self._idle.append(conn)
            else:
                writer.close()
            return status, retry_after, body
        raise AssertionError("unreachable")

    async def send(self, i: int) -> Answer:
        try:
            status, retry_after, _ = await asyncio.wait_for(
                self._exchange(self.payload(i)), self.timeout_s
            )
        except TimeoutError:
            return Answer("timeout", False)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return Answer("connection_closed", False)
        except OSError:
            return Answer("connect_error", False)
        return Answer(str(status), status == 200, retry_after)

    async def _get(self, path: str) -> tuple[int, bytes]:
        request = _head("GET", self.prefix + path, self.host, self._auth(), 0)
        try:
            status, _, body = await asyncio.wait_for(self._exchange(request), 10)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise BenchError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        return status, body

    async def open(self) -> None:
        status, body = await self._get(self.model_path())
        if status == 404:
            raise BenchError(f"model {self.model!r} is not served at {self.url}")
        if status == 401:
            raise BenchError(f"{self.url} wants an API key (--api-key) or refused the one given")
        if status != 200:
            raise BenchError(
                f"{self.url}: GET {self.model_path()} answered {status}: {body[:200]!r}"
            )

    def model_path(self) -> str:
        raise NotImplementedError

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, float, bytes, bool]:
    """(status, Retry-After seconds or 0, body, keep-alive) of the next response."""
    head = await reader.readuntil(b"\r\n\r\n")
    try:
        status = int(head[9:12])
    except ValueError:
        raise ConnectionError("not an HTTP response") from None
    length, retry_after, keep = 0, 0.0, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            try:
                retry_after = float(value)
            except ValueError:
                retry_after = 0.0
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    body = await reader.readexactly(length) if length else b""
    return status, retry_after, body, keep


class RestTarget(HttpTarget):
    protocol: Protocol = "rest"

    def model_path(self) -> str:
        return f"/v1/models/{quote(self.model, safe='')}"

    def encode(self, images: Sequence[bytes]) -> bytes:
        if len(images) == 1:  # the raw-body form: the cheapest to send and to parse
            body, ctype = images[0], "application/octet-stream"
        else:
            body, ctype = multipart_body(images)
        path = f"{self.prefix}{self.model_path()}/classify"
        headers = {"Content-Type": ctype, **self._auth()}
        return _head("POST", path, self.host, headers, len(body)) + body


class KServeHttpTarget(HttpTarget):
    """KServe v2 infer with a BYTES input of encoded images, in the binary extension."""

    protocol: Protocol = "kserve-http"

    def model_path(self) -> str:
        return f"/v2/models/{quote(self.model, safe='')}"

    def encode(self, images: Sequence[bytes]) -> bytes:
        body, header_length = kserve_binary_body(images)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
            **self._auth(),
        }
        path = f"{self.prefix}{self.model_path()}/infer"
        return _head("POST", path, self.host, headers, len(body)) + body


# --- gRPC -------------------------------------------------------------------------------


def _split_grpc(url: str) -> str:
    target = url.split("://", 1)[1] if url.startswith(("grpc://", "http://")) else url
    if "://" in target or not target or "/" in target:
        raise BenchError(f"--url {url}: expected HOST:PORT (or grpc://HOST:PORT) for gRPC")
    return target


class GrpcTarget(Target):
    """grpc.aio, one channel (HTTP/2 multiplexes every call), pre-serialized messages."""

    method: str

    def __init__(self, url: str, model: str, *args: Any, **kwargs: Any) -> None:
        self.target = _split_grpc(url)
        self._channel: Any = None
        super().__init__(url, model, *args, **kwargs)

    def _open_channel(self) -> None:
        """In the event loop the calls will run on (grpc.aio binds a channel to it)."""
        import grpc

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[
                    ("grpc.max_send_message_length", 256 << 20),
                    ("grpc.max_receive_message_length", 256 << 20),
                ],
            )
            # Identity serializers: the bytes prepared once are what goes on the wire.
            self._call = self._channel.unary_unary(self.method)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.api_key),) if self.api_key else ()

    async def send(self, i: int) -> Answer:
        import grpc

        try:
            await self._call(self.payload(i), timeout=self.timeout_s, metadata=self._metadata())
        except grpc.aio.AioRpcError as err:
            code = err.code()
            retry_after = 0.0
            for key, value in err.trailing_metadata() or ():
                if key == "retry-after":
                    with contextlib.suppress(TypeError, ValueError):
                        retry_after = float(value)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and err.details() == "Deadline Exceeded":
                return Answer("timeout", False)  # the client's own timeout, not the server's
            return Answer(code.name, False, retry_after)
        return Answer("OK", True)

    async def _unary(self, method: str, request: bytes) -> bytes:
        import grpc

        self._open_channel()
        try:
            reply: bytes = await self._channel.unary_unary(method)(
                request, timeout=10, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise BenchError(f"cannot reach {self.target}: {err.details()}") from None
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise BenchError(
                    f"{self.target} wants an API key (--api-key) or refused the one given"
                ) from None
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise BenchError(f"model {self.model!r} is not served at {self.target}") from None
            raise BenchError(
                f"{self.target}: {method}: {err.code().name}: {err.details()}"
            ) from None
        return reply

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class ClassifierTarget(GrpcTarget):
    protocol: Protocol = "grpc"
    method = "/resnet_serving.v1.Classifier/Classify"

    def encode(self, images: Sequence[bytes]) -> bytes:
        from service.transports.grpc import classifier_pb2

        msg = classifier_pb2.ClassifyRequest(model=self.model, images=list(images))
        return bytes(msg.SerializeToString())

    async def open(self) -> None:
        from service.transports.grpc import classifier_pb2

        reply = classifier_pb2.ListModelsResponse.FromString(
            await self._unary(
                "/resnet_serving.v1.Classifier/ListModels",
                classifier_pb2.ListModelsRequest().SerializeToString(),
            )
        )
        served = [m.name for m in reply.models]
        if self.model not in served:
            raise BenchError(
                f"model {self.model!r} is not served at {self.target} (served: {', '.join(served)})"
            )


class KServeGrpcTarget(GrpcTarget):
    protocol: Protocol = "kserve-grpc"
    method = "/inference.GRPCInferenceService/ModelInfer"

    def encode(self, images: Sequence[bytes]) -> bytes:
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name=self.model)
        inp = req.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
        inp.contents.bytes_contents.extend(images)
        return bytes(req.SerializeToString())

    async def open(self) -> None:
        from tritonclient.grpc import service_pb2

        reply = service_pb2.ModelReadyResponse.FromString(
            await self._unary(
                "/inference.GRPCInferenceService/ModelReady",
                service_pb2.ModelReadyRequest(name=self.model).SerializeToString(),
            )
        )
        if not reply.ready:
            raise BenchError(f"model {self.model!r} is not ready at {self.target}")


_TARGETS: dict[str, type[Target]] = {
    "rest": RestTarget,
    "kserve-http": KServeHttpTarget,
    "grpc": ClassifierTarget,
    "kserve-grpc": KServeGrpcTarget,
}


def make_target(
    protocol: str,
    url: str,
    model: str,
    payloads: Sequence[Sequence[bytes]],
    api_key: str | None = None,
    timeout_s: float = 30.0,
) -> Target:
    if protocol not in _TARGETS:
        raise BenchError(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    return _TARGETS[protocol](url, model, payloads, api_key=api_key, timeout_s=timeout_s)
