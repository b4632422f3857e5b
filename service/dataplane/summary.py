"""What every API says about a served model, declared once: REST ``/v1`` answers it as it
is (its schema in the OpenAPI document is this class), the ``Classifier`` gRPC service
maps it onto ``ModelInfo`` field by field, and KServe v2's model metadata takes its name
and versions from it. A new field is one edit here (and, for gRPC, one in the proto)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.backends.base import Backend
from service.dataplane.routing import Version


# No docstring: pydantic would publish it as the schema's description.
class ModelSummary(BaseModel):
    name: str
    version: str = Field(description="The newest served version.")
    versions: list[str] = Field(description="Every served version (each may be pinned).")
    arch: str
    num_classes: int
    labels_count: int
    max_batch_size: int
    precision: str = Field(description="The version's precision, as export proved it.")
    served_precision: str = Field(
        description="What the gateway computes its batches in: the precision, except a bf16 "
        "version computed exactly in fp32 where the engine or the CPU has no BF16."
    )
    backend: str = Field(
        description="What runs the model: the embedded engine (onnxruntime, openvino) or triton."
    )
    kernels: str = Field(
        description="What computes its batches: the instruction set of the gateway's CPU "
        "kernels (AVX2, AVX-512, AVX-512 VNNI, AMX), an accelerator (CUDA) or triton."
    )
    default: bool

    @classmethod
    def of(
        cls, served: Version, versions: list[str], backend: Backend, default: bool
    ) -> ModelSummary:
        """The summary of ``served``: ``versions``, every served version of its model;
        ``default``, whether its model is the default one."""
        spec = served.spec
        return cls(
            name=spec.name,
            version=spec.version,
            versions=versions,
            arch=spec.contract.arch,
            num_classes=spec.contract.num_classes,
            labels_count=len(spec.labels),
            max_batch_size=served.batcher.max_batch,
            precision=spec.precision,
            served_precision=backend.served_precision(spec),
            backend=backend.name,
            kernels=backend.kernels,
            default=default,
        )
