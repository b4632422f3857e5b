"""The gateway's cost per image: server CPU per request, from /proc, behind a near-free graph
of ResNet-50's real input, so that only the serving is measured; beside each image's decode
floor, the gateway's own preprocessing, the gateway in front of Triton, and the peers."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from deploy.benchmarks.common import NAME, log, start_gateway
from deploy.benchmarks.cpu_accounting import cpu_ms_of, server_cpu_per_request
from deploy.benchmarks.inputs import test_jpeg
from deploy.benchmarks.peers import PEERS, peer_server
from service.host.processes import free_ports

#: The images of "gateway cost per image": (key, how it is made). 12 MP is a phone's photo.
COST_IMAGES: tuple[tuple[str, tuple[int, int] | None], ...] = (
    ("jpeg_500x375", (500, 375)),
    ("jpeg_1920x1440", (1920, 1440)),
    ("jpeg_4032x3024", (4032, 3024)),
    ("png_8x8", None),
)

#: The servers in front of Triton, in the table's order.
TRITON_SERVERS = ("gateway_triton", "gateway_triton_uint8", "gateway_triton_shm")

#: The servers of "gateway cost per image", in the table's order.
COST_SERVERS = ("gateway", "gateway_uint8", *TRITON_SERVERS, *PEERS)


def near_free_repo(dst: Path, input_dtype: str = "float32", name: str = NAME) -> Path:
    """A repository of one model that costs almost nothing but takes ResNet-50's input
    (ImageNet's contract, 224x224 crops, float planes or ``--input uint8`` pixels) and
    answers 1000 logits (the mean of each plane, one 3x1000 layer): behind it only the
    serving is measured. Published through export's own path; its version directory."""
    import torch
    from torch import nn

    from export.pipeline import export_and_publish
    from export.plan import default_labels
    from export.repository import ServingConfig
    from export.weights import IMAGENET_MEAN, IMAGENET_STD
    from service.model.contract import PreprocessContract, input_fields

    contract = PreprocessContract(
        arch="near-free", input_name="input", output_name="logits", channels="RGB",
        resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000,
        **input_fields(input_dtype),
    )  # fmt: skip
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1000))
    export_and_publish(
        model=net, contract=contract, labels=default_labels(1000), name=name, repository=dst,
        flavor="onnxruntime", serving=ServingConfig(max_batch_size=16), opset=17,
        real_images=[], source="deploy/benchmarks near-free graph", log=lambda _: None,
    )  # fmt: skip
    return dst / name / "1"


def cost_image(size: tuple[int, int] | None) -> bytes:
    if size is None:
        buf = io.BytesIO()
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        return buf.getvalue()
    return test_jpeg(*size)


def decode_floor_ms(data: bytes, contract: Any, runs: int) -> float:
    """libjpeg-turbo decoding the JPEG alone (simplejpeg), at the DCT scale the gateway's
    draft rule picks (the shorter side kept at least draft_margin x the resize); a PNG
    decoded by Pillow (zlib, nothing to skip). One thread's CPU time."""
    import simplejpeg
    from PIL import Image

    from service.dataplane.preprocess import DEFAULT_LIMITS

    if not data.startswith(b"\xff\xd8"):
        return cpu_ms_of(lambda: Image.open(io.BytesIO(data)).load(), runs)
    need = int(contract.resize * DEFAULT_LIMITS.draft_margin)
    return cpu_ms_of(
        lambda: simplejpeg.decode_jpeg(data, "RGB", min_height=need, min_width=need), runs
    )


def gateway_cost(seconds: float, triton: bool = True) -> dict[str, Any]:
    """The "gateway cost per image" phase: the gateway behind the near-free graph taking float planes
    and taking uint8 pixels, embedded and (``triton``) in front of a real Triton (then only
    the gateway's own process is counted: the graph runs in Triton's), and the tutorial
    server and LitServe (PEERS) behind the float one, under 16 clients posting each
    of COST_IMAGES; each image's decode floor and the gateway's own preprocessing (float
    planes), as one thread's CPU time, here."""
    from service.model.repository import load_spec

    root = Path(tempfile.mkdtemp(prefix="resnet-bench-free-"))
    names = {"float32": NAME, "uint8": f"{NAME}_pixels"}
    versions = {d: near_free_repo(root / d, d, name) for d, name in names.items()}
    images = {key: cost_image(size) for key, size in COST_IMAGES}
    out = _floors(images, load_spec(root / "float32" / NAME).contract)
    measure = partial(_measure_gateway, out, images, seconds)
    for dtype, what in (("float32", "gateway"), ("uint8", "gateway_uint8")):
        measure(what, root / dtype, names[dtype])
    if triton:
        _behind_triton(measure, root, names)
    for peer in PEERS:
        with peer_server(peer, versions["float32"]) as (pid, url):
            for key, data in images.items():
                log(f"{peer} server, {key}, 16 clients ...")
                out[key][peer] = server_cpu_per_request(pid, url, data, seconds, NAME)
                log(f"  {out[key][peer]}")
    request_bytes = triton_request_bytes(root)
    log(f"gRPC request bytes per image to Triton (batch 8): {request_bytes}")
    for row in out.values():
        _add_ratios(row, request_bytes)
    return out


def _floors(images: dict[str, bytes], contract: Any) -> dict[str, Any]:
    """Each image's size, decode floor and the gateway's preprocessing of it (float planes),
    one thread's CPU: the rows the servers' figures are added to."""
    from service.dataplane.preprocess import preprocess

    out: dict[str, Any] = {}
    for key, data in images.items():
        runs = 30 if len(data) < 200_000 else 8
        out[key] = {
            "bytes": len(data),
            "decode_floor_ms": round(decode_floor_ms(data, contract, runs), 2),
            "preprocess_ms": round(cpu_ms_of(partial(preprocess, data, contract), runs), 2),
        }
    return out


def _measure_gateway(
    out: dict[str, Any],
    images: dict[str, bytes],
    seconds: float,
    what: str,
    repo: Path,
    model: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> None:
    """One gateway under each image in turn, its figures added to ``out`` as ``what``."""
    gw = start_gateway(repo, *args, env=env)
    try:
        for key, data in images.items():
            log(f"{what}, {key}, 16 clients ...")
            found = server_cpu_per_request(gw.proc.pid, gw.url, data, seconds, model)
            out[key][what] = found
            log(f"  {found}")
    finally:
        gw.stop()


def _behind_triton(measure: Callable[..., None], root: Path, names: dict[str, str]) -> None:
    """The gateway in front of a real CPU Triton: float planes, uint8 pixels over gRPC, and
    uint8 through system shared memory."""
    from export.repository import republish
    from service.tools.triton_launcher import start_triton

    trepo = root / "triton"
    for dtype, name in names.items():
        republish(root / dtype / name, trepo, "python-ort")
    log("starting tritonserver (CPU, python backend + ORT) ...")
    http, grpc, metrics = free_ports(3)
    tritond = start_triton(trepo, http, grpc, metrics, log_path=root / "t.log")
    try:
        tritond.wait_ready(180)
        shm = {"RESNET_SERVE_TRITON_SHARED_MEMORY": "true"}
        for dtype, what, env in (
            ("float32", "gateway_triton", None),
            ("uint8", "gateway_triton_uint8", None),
            ("uint8", "gateway_triton_shm", shm),
        ):
            measure(
                what,
                trepo,
                names[dtype],
                *("--backend", "triton", "--triton-url", tritond.grpc_url),
                env=env,
            )
    finally:
        tritond.stop()


def _add_ratios(row: dict[str, Any], request_bytes: dict[str, float]) -> None:
    """One image's ratios: each server's CPU against the decode floor, Triton's requests/s
    against the embedded uint8 gateway's, the gateway's CPU beyond its preprocessing."""
    row["triton_request_bytes_per_image"] = request_bytes
    floor = row["decode_floor_ms"]
    embedded = row["gateway_uint8"]["requests_per_s"]
    for what in TRITON_SERVERS:
        if what in row:
            row[f"{what}_rate_vs_embedded"] = round(row[what]["requests_per_s"] / embedded, 2)
    for what in COST_SERVERS:
        if what in row:
            row[f"{what}_vs_floor"] = round(row[what]["cpu_ms_per_request"] / floor, 2)
    row["gateway_beyond_preprocess_ms"] = round(
        row["gateway"]["cpu_ms_per_request"] - row["preprocess_ms"], 2
    )


def triton_request_bytes(repo: Path, batch: int = 8) -> dict[str, float]:
    """Bytes per image of the gRPC request the Triton backend sends for a batch: the
    serialized ModelInferRequest, as tritonclient builds it, for float planes, for uint8
    pixels, and for uint8 in shared memory (where the request names a region instead)."""
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc._utils import _get_inference_request

    from service.model.repository import load_spec

    def size(spec: Any, shm: bool) -> float:
        c = spec.contract
        x = np.zeros((batch, *c.input_shape), c.dtype)
        inp, out = (
            InferInput(c.input_name, list(x.shape), c.datatype),
            InferRequestedOutput(c.output_name),
        )
        if shm:
            inp.set_shared_memory("region", x.nbytes)
            out.set_shared_memory("region", batch * c.num_classes * 4, offset=x.nbytes)
        else:
            inp.set_data_from_numpy(x)
        request = _get_inference_request(
            spec.name, [inp], spec.version, "", [out], 0, False, False, 0, None, None
        )
        return round(request.ByteSize() / batch, 1)

    fp32, pixels = load_spec(repo / "float32" / NAME), load_spec(repo / "uint8" / f"{NAME}_pixels")
    return {
        "grpc_float32": size(fp32, False),
        "grpc_uint8": size(pixels, False),
        "shm_uint8": size(pixels, True),
    }
