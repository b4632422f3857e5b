"""The tutorial server ``make bench`` measures the gateway beside ("gateway cost per image").

What the FastAPI + Pillow + ONNX Runtime examples do: one request at a time, no batching,
torchvision's eval transform written out (resize the whole image, center-crop, normalize
in float numpy), the model's ``preprocess.json`` for its sizes and statistics, top-5 with
class names as JSON. It answers ``resnet-serve bench``'s REST calls (``GET
/v1/models/{m}``, ``POST /v1/models/{m}/classify`` with the image as the body), so the
same load tool drives both servers.

    python -m deploy.tutorial_server MODEL_VERSION_DIR PORT
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, ImageOps

from service.model.contract import PreprocessContract


def eval_transform(contract: PreprocessContract) -> Callable[[bytes], np.ndarray]:
    """A tutorial's torchvision eval transform, from the contract's sizes and statistics:
    resize the whole image, center-crop, normalize in float numpy; (1, C, H, W) float32."""
    mean = np.asarray(contract.mean, np.float32)
    std = np.asarray(contract.std, np.float32)

    def transform(data: bytes) -> np.ndarray:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(contract.channels)
        w, h = img.size
        short = contract.resize
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.Resampling[contract.interpolation.upper()])
        left, top = round((size[0] - contract.crop) / 2), round((size[1] - contract.crop) / 2)
        img = img.crop((left, top, left + contract.crop, top + contract.crop))
        x = np.asarray(img, np.float32) / 255.0
        x = (x.reshape(contract.crop, contract.crop, -1) - mean) / std
        return x.transpose(2, 0, 1)[None].astype(np.float32)

    return transform


def load_model(version_dir: Path) -> tuple[PreprocessContract, list[str], ort.InferenceSession]:
    """The version's contract, class names and an ONNX Runtime session, as a tutorial opens
    them. One setting beyond the tutorials': no spin-waiting threads, as the gateway runs
    ORT (spinning would bill the near-free graph's idle cores to the peer)."""
    contract = PreprocessContract.load(version_dir / "preprocess.json")
    labels = (version_dir.parent / contract.labels_file).read_text().splitlines()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return contract, labels, ort.InferenceSession(str(version_dir / "model.onnx"), opts)


def top5(logits: np.ndarray, labels: list[str]) -> dict[str, list[dict[str, object]]]:
    top = np.argsort(-logits)[:5]
    return {"predictions": [{"label": labels[i], "score": float(logits[i])} for i in top]}


def app_for(version_dir: Path) -> FastAPI:
    contract, labels, session = load_model(version_dir)
    transform = eval_transform(contract)
    app = FastAPI()

    @app.get("/v1/models/{model}")
    def model(model: str) -> dict[str, str]:
        return {"name": model}

    @app.post("/v1/models/{model}/classify")
    async def classify(model: str, request: Request) -> dict[str, list[dict[str, object]]]:
        try:
            x = transform(await request.body())
        except Exception as exc:  # a tutorial's error handling
            raise HTTPException(400, f"bad image: {exc}") from None
        return top5(session.run(None, {contract.input_name: x})[0][0], labels)

    return app


if __name__ == "__main__":
    uvicorn.run(app_for(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning")  # fmt: skip
