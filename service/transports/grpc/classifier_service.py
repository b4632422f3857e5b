"""``resnet_serving.v1.Classifier`` (classifier.proto): the wire format only."""

from __future__ import annotations

from service.dataplane.summary import ModelSummary
from service.runtime.core import Runtime
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc.rpc import Context, Method, time_remaining

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name

#: ModelSummary's fields that ModelInfo names differently; every other one of its fields
#: is the summary's field of the same name.
RENAMED = {"default": "is_default"}


def model_info(summary: ModelSummary) -> pb.ModelInfo:
    """The summary as ``ModelInfo``: each field the message has (what the proto leaves
    out, it leaves out)."""
    fields = pb.ModelInfo.DESCRIPTOR.fields_by_name
    values = {RENAMED.get(k, k): v for k, v in summary.model_dump().items()}
    return pb.ModelInfo(**{k: v for k, v in values.items() if k in fields})


def methods(runtime: Runtime) -> dict[str, Method]:
    async def classify(request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        plane = runtime.admit()
        plan = plane.plan(
            request.model or None,
            version=request.model_version or None,
            top_k=request.top_k or None,
            timeout_s=time_remaining(context),
        )
        result = await plane.classify(plan, list(request.images))
        return pb.ClassifyResponse(
            model=result.model,
            model_version=result.version,
            results=[
                pb.Classification(
                    predictions=[
                        pb.Prediction(index=p.index, label=p.label, score=p.score) for p in row
                    ]
                )
                for row in result.predictions
            ],
        )

    async def list_models(request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(s) for s in runtime.admit().summaries()])

    async def reload_model(
        request: pb.ReloadModelRequest, context: Context
    ) -> pb.ReloadModelResponse:
        result = (await runtime.manage().reload(request.model or None)).check()
        return pb.ReloadModelResponse(
            model=result.model, serving=result.serving, added=result.added, retired=result.retired
        )

    return {
        "Classify": Method(pb.ClassifyRequest, classify),
        "ListModels": Method(pb.ListModelsRequest, list_models),
        "ReloadModel": Method(pb.ReloadModelRequest, reload_model, admin=True),
    }
