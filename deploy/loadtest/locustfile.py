"""Load-test a resnet-serving gateway with locust: a mix of its routes, each request
checked, every image from a folder of your own.

    RESNET_IMAGES=photos/ locust -f deploy/loadtest/locustfile.py \\
        --headless -u 16 -r 4 -t 5m --host http://gateway:8000

Environment (read once, when locust loads this file):

    RESNET_IMAGES            a folder of image files (required; at most 1000 read, each once,
                             then cycled; subfolders included, hidden files skipped)
    RESNET_MODEL             the model; unset: the gateway's default model (/v1/classify, and
                             for KServe the model GET /v1/models marks as default)
    RESNET_API_KEY           sent as X-API-Key
    RESNET_WEIGHT_CLASSIFY   weight of POST /v1/.../classify, one image as the raw body (8)
    RESNET_WEIGHT_MULTIPART  weight of the same route, multipart with 2 images (2)
    RESNET_WEIGHT_KSERVE     weight of POST /v2/models/{model}/infer, one image as a BYTES
                             input in the binary tensor extension (2)
    RESNET_WEIGHT_MODELS     weight of GET /v1/models, a light request (1)

A weight of 0 leaves that request out. Each simulated user sends its next request as soon as
the last one is answered (a closed loop, as ``resnet-serve bench --concurrency``). Requests
are named by route template, so locust's table has one row per kind of request; a failure
is named by the HTTP status and the gateway's error code ("503 overloaded"), so locust's
failure table counts each cause apart.

Needs locust and this project (``pip install resnet-serving``): the images are read and
the bodies built by the code ``resnet-serve bench`` uses, once, before the run.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from locust import FastHttpUser, constant, task
from locust.contrib.fasthttp import ResponseContextManager

from service.tools.bench import BenchError
from service.tools.bench.run import read_images
from service.tools.bench.targets import kserve_binary_body, multipart_body


class ConfigError(SystemExit):
    """A setting that cannot be used: locust stops at load time with this one line."""

    def __init__(self, message: str) -> None:
        super().__init__(f"locustfile: {message}")


def _weight(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number >= 0") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: expected a whole number >= 0")
    return value


def load_images(folder: str | None) -> list[bytes]:
    """Every file under ``folder`` (sorted, hidden skipped), at most 1000, read once."""
    if not folder:
        raise ConfigError("set RESNET_IMAGES to a folder of image files")
    try:
        return read_images(Path(folder), "RESNET_IMAGES")
    except BenchError as exc:
        raise ConfigError(str(exc)) from None


IMAGES = load_images(os.environ.get("RESNET_IMAGES"))
MODEL = os.environ.get("RESNET_MODEL", "").strip() or None
API_KEY = os.environ.get("RESNET_API_KEY") or None
WEIGHTS = {
    "classify": _weight("RESNET_WEIGHT_CLASSIFY", 8),
    "multipart": _weight("RESNET_WEIGHT_MULTIPART", 2),
    "kserve": _weight("RESNET_WEIGHT_KSERVE", 2),
    "models": _weight("RESNET_WEIGHT_MODELS", 1),
}
if not any(WEIGHTS.values()):
    raise ConfigError("every RESNET_WEIGHT_* is 0: nothing to send")

# Every body is built once, here: a request costs the client a write and a read.
N = len(IMAGES)
RAW = IMAGES
PAIRS = [multipart_body([IMAGES[(2 * j) % N], IMAGES[(2 * j + 1) % N]]) for j in range(N)]
INFER = [kserve_binary_body([img]) for img in IMAGES]
_next: Iterator[int] = itertools.count()  # shared by all users (gevent: one thread)


def error_code(resp: ResponseContextManager) -> str:
    """The gateway's stable error code: /v1 ``{"error": {"code"}}``, /v2 ``{"code"}``."""
    try:
        body = json.loads(resp.content or b"")
    except ValueError:
        return "(no JSON body)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return str(err["code"])
        if isinstance(body.get("code"), str):
            return str(body["code"])
    return "(no error code)"


def check(resp: ResponseContextManager, valid: Callable[[Any], str | None]) -> None:
    """Report ``resp`` to locust: a failure named by status and error code, or by what is
    wrong with a 200's body (``valid`` says it, None when the body is right)."""
    if resp.status_code == 0:
        resp.failure(f"no response: {type(resp.request_meta['exception']).__name__}")
    elif resp.status_code != 200:
        resp.failure(f"{resp.status_code} {error_code(resp)}")
    else:
        try:
            problem = valid(resp)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            problem = f"unreadable body ({type(exc).__name__})"
        if problem:
            resp.failure(f"200 but {problem}")
        else:
            resp.success()


def predictions(count: int) -> Callable[[Any], str | None]:
    def valid(resp: Any) -> str | None:
        preds = json.loads(resp.content)["predictions"]
        if not isinstance(preds, list) or len(preds) != count:
            return f"not {count} prediction list(s)"
        if not all(isinstance(p, list) and p for p in preds):
            return "an empty prediction list"
        return None

    return valid


ONE_LIST, TWO_LISTS = predictions(1), predictions(2)


def infer_outputs(resp: Any) -> str | None:
    """Outputs in the JSON answer (the JSON header of a binary one: Triton's form)."""
    body = resp.content
    if (n := resp.headers.get("Inference-Header-Content-Length")) is not None:
        body = body[: int(n)]
    outputs = json.loads(body)["outputs"]
    if not isinstance(outputs, list) or not outputs:
        return "no outputs"
    if outputs[0].get("shape", [None])[0] != 1:
        return "outputs not for 1 image"
    return None


def models_list(resp: Any) -> str | None:
    models = json.loads(resp.content)["models"]
    return None if isinstance(models, list) and models else "no models"


class GatewayUser(FastHttpUser):
    """One client of the gateway; the mix of requests is the RESNET_WEIGHT_* settings."""

    wait_time = constant(0)
    default_headers = {"X-API-Key": API_KEY} if API_KEY else None
    #: The KServe route needs a name; resolved once per user when RESNET_MODEL is unset.
    kserve_model: str | None = MODEL

    if MODEL:
        classify_path = f"/v1/models/{quote(MODEL, safe='')}/classify"
        classify_name = "/v1/models/{model}/classify"
    else:
        classify_path = classify_name = "/v1/classify"

    @task(WEIGHTS["classify"])
    def classify(self) -> None:
        body = RAW[next(_next) % N]
        with self._post(self.classify_path, self.classify_name, body) as resp:
            check(resp, ONE_LIST)

    @task(WEIGHTS["multipart"])
    def classify_multipart(self) -> None:
        body, ctype = PAIRS[next(_next) % N]
        name = f"{self.classify_name} (multipart, 2 images)"
        with self._post(self.classify_path, name, body, {"Content-Type": ctype}) as resp:
            check(resp, TWO_LISTS)

    @task(WEIGHTS["kserve"])
    def kserve_infer(self) -> None:
        model = self.kserve_model or self._default_model()
        if model is None:
            return  # the failed GET /v1/models is what locust shows
        body, header_length = INFER[next(_next) % N]
        path = f"/v2/models/{quote(model, safe='')}/infer"
        extra = {"Inference-Header-Content-Length": str(header_length)}
        with self._post(path, "/v2/models/{model}/infer", body, extra) as resp:
            check(resp, infer_outputs)

    @task(WEIGHTS["models"])
    def list_models(self) -> None:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            check(resp, models_list)

    def _post(
        self, path: str, name: str, body: bytes, headers: dict[str, str] | None = None
    ) -> ResponseContextManager:
        return self.client.post(
            path,
            # locust types ``data`` as str; geventhttpclient sends bytes as they are.
            data=body,  # type: ignore[arg-type]
            headers={"Content-Type": "application/octet-stream", **(headers or {})},
            name=name,
            catch_response=True,
        )

    def _default_model(self) -> str | None:
        """The model /v1/classify would use: the one GET /v1/models marks as default."""
        found: list[str] = []

        def valid(resp: Any) -> str | None:
            models = json.loads(resp.content)["models"]
            found.extend(m["name"] for m in models if m.get("default"))
            return None if found else "no model marked default (set RESNET_MODEL)"

        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            check(resp, valid)
        self.kserve_model = found[0] if found else None
        return self.kserve_model
