"""LitServe serving the same model, the second peer ``make bench`` measures the gateway beside.

LitServe (Lightning AI) as its documentation sets up an image classifier: a ``LitAPI``
whose ``decode_request`` preprocesses one image, ``batch`` stacks up to ``max_batch_size``
(8) of them, ``predict`` runs the batch, ``unbatch`` and ``encode_response`` answer each;
its HTTP server runs in a process of its own, apart from the worker that decodes and
infers. The preprocessing, model session and answer are the tutorial server's
(``deploy.tutorial_server``), so the two peers differ in how they serve, not in what.

It answers ``resnet-serve bench``'s REST calls (``GET /v1/models/{m}``, ``POST
/v1/models/{m}/classify`` with the image as the body). LitServe reads a body as JSON or a
form; a raw image body is taken as bytes (``_raw_body``), as a user serving images
without base64 would have it do.

    python -m deploy.litserve_server MODEL_VERSION_DIR PORT
"""

import sys
from pathlib import Path
from typing import Any, cast

import litserve as ls
import numpy as np
from litserve.server import BaseRequestHandler
from starlette.requests import Request

from deploy.tutorial_server import eval_transform, load_model, top5

#: The batch LitServe's worker gathers, and how long it waits for one to fill.
MAX_BATCH = 8
BATCH_TIMEOUT_S = 0.005


_prepare = BaseRequestHandler._prepare_request


async def _raw_body(handler: Any, request: Any, request_type: Any) -> Any:
    """LitServe's request preparation, but an image body is passed on as its bytes."""
    if request.headers.get("content-type", "").startswith(("image/", "application/octet")):
        return await request.body()
    return await _prepare(handler, request, request_type)


# At import: LitServe's server processes import this module (they are spawned).
BaseRequestHandler._prepare_request = _raw_body


class Classifier(ls.LitAPI):
    def __init__(self, version_dir: Path) -> None:
        super().__init__(
            max_batch_size=MAX_BATCH,
            batch_timeout=BATCH_TIMEOUT_S,
            api_path=f"/v1/models/{version_dir.parent.name}/classify",
        )
        self.version_dir = version_dir

    def setup(self, device: str) -> None:
        self.contract, self.labels, self.session = load_model(self.version_dir)
        self.transform = eval_transform(self.contract)

    # Annotated as LitServe needs it to hand over the request (no __future__ annotations
    # here: it compares the annotation with the class); what arrives is the body's bytes.
    def decode_request(self, request: Request) -> np.ndarray:
        return self.transform(cast(bytes, request))

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.contract.input_name: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict[str, Any]:
        return top5(logits, self.labels)


def main(version_dir: Path, port: int) -> None:
    server = ls.LitServer(Classifier(version_dir), accelerator="cpu", workers_per_device=1)

    @server.app.get("/v1/models/{model}")
    def model(model: str) -> dict[str, str]:
        return {"name": model}

    server.run(
        host="127.0.0.1", port=port, num_api_servers=1, log_level="warning",
        generate_client_file=False,
    )  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
