"""Each version's metadata from Triton checked against its contract (tensor names, shapes,
datatype, classes): a version that Triton serves otherwise is refused."""

from __future__ import annotations

import logging
from typing import Any

from tritonclient.grpc.aio import InferenceServerClient

from service.model.repository import ModelSpec, RepositoryError, TensorSig, tensor_problems

log = logging.getLogger(__name__)


def metadata_problems(spec: ModelSpec, meta: dict[str, Any], max_batch: int) -> list[str]:
    """How Triton's model metadata disagrees with the model's contract."""

    def sigs(tensors: list[dict[str, Any]]) -> list[TensorSig]:
        return [
            TensorSig(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in tensors
        ]

    problems = ["Triton's config has max_batch_size 0 (no batch axis)"] if max_batch < 1 else []
    return problems + tensor_problems(
        spec.contract, sigs(meta.get("inputs", [])), sigs(meta.get("outputs", [])), "Triton"
    )


async def verify_metadata(client: InferenceServerClient, spec: ModelSpec, pod: str) -> None:
    """Raise RepositoryError unless the Triton at ``pod`` (``client``, its channel) serves
    what the version's contract describes."""
    name, version = spec.name, spec.version
    meta = await client.get_model_metadata(name, version, as_json=True, client_timeout=5)
    cfg = (await client.get_model_config(name, version, as_json=True, client_timeout=5))["config"]
    problems = metadata_problems(spec, meta, int(cfg.get("max_batch_size", 0)))
    if problems:
        raise RepositoryError(
            f"model {name!r} version {version}: Triton at {pod} serves something "
            f"else than its contract describes: " + "; ".join(problems)
        )
    log.info("triton: %s version %s verified against its contract at %s", name, version, pod)
