"""KServe v2 / Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, the
service Triton and KServe serve (Triton's ``grpc_service.proto``, a superset of KServe's
``grpc_predict_v2.proto``, as ``tritonclient.grpc`` ships it). The wire format only: what
requests mean is ``service.transports.openinference``'s, shared with the HTTP adapter, so
``tritonclient.grpc`` gets what it would get from Triton for the same tensor.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelStatistics, ModelInfer (``raw_input_contents`` or typed contents; FP32 tensors or a
BYTES input of encoded images; the classification extension). Anything else (streaming,
repository control, shared memory, tracing) answers UNIMPLEMENTED.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from service.errors import InvalidRequest
from service.runtime.core import Runtime
from service.transports import openinference as oi
from service.transports.grpc.rpc import Context, Method, time_remaining

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _inputs(request: pb.ModelInferRequest) -> list[oi.InferInput]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest("raw_input_contents must hold one entry per input")
    inputs = []
    for n, t in enumerate(request.inputs):
        shape = list(t.shape)
        if raw:
            inputs.append(oi.raw_input(t.name, t.datatype, shape, raw[n]))
        elif t.datatype == "BYTES":
            inputs.append(oi.InferInput(t.name, t.datatype, shape, list(t.contents.bytes_contents)))
        elif t.datatype == "UINT8":  # the protocol carries UINT8 in uint_contents
            inputs.append(
                oi.number_input(t.name, t.datatype, shape, list(t.contents.uint_contents))
            )
        else:  # any other datatype than FP32 is refused, by name, in oi.infer
            values = np.asarray(t.contents.fp32_contents, dtype=np.float32)
            inputs.append(oi.InferInput(t.name, t.datatype, shape, values))
    return inputs


def _timeout(request: pb.ModelInferRequest, context: Context) -> float | None:
    """The shorter of the call's deadline and the request's ``timeout`` parameter."""
    param = request.parameters["timeout"].int64_param if "timeout" in request.parameters else None
    given = [t for t in (oi.timeout_from_us(param), time_remaining(context)) if t is not None]
    return min(given) if given else None


def _class_count(out: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    return out.parameters["classification"].int64_param if "classification" in out.parameters else 0


def _message(data: dict[str, Any], message: Any) -> Any:
    return json_format.ParseDict(data, message)


def methods(runtime: Runtime) -> dict[str, Method]:
    async def server_live(request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=runtime.not_ready_reason() is None)

    async def server_metadata(
        request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return _message(oi.server_metadata(), pb.ServerMetadataResponse())

    async def model_ready(request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        runtime.admit().spec(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=runtime.not_ready_reason() is None)

    async def model_metadata(
        request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        plane = runtime.admit()
        spec = plane.spec(request.name, request.version or None)
        metadata = oi.model_metadata(plane, spec)
        del metadata["parameters"]  # not a field of Triton's message (openinference says)
        return _message(metadata, pb.ModelMetadataResponse())

    async def model_config(
        request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        spec = runtime.admit().spec(request.name, request.version or None)
        return pb.ModelConfigResponse(config=spec.config)

    async def model_statistics(
        request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        stats = runtime.admit().statistics(request.name or None, request.version or None)
        return _message({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def model_infer(request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        arrived = time.perf_counter()
        plane = runtime.admit()
        result = await oi.infer(
            plane,
            oi.InferRequest(
                model=request.model_name,
                version=request.model_version or None,
                inputs=_inputs(request),
                outputs=[oi.RequestedOutput(o.name, _class_count(o)) for o in request.outputs],
                id=request.id or None,
                timeout_s=_timeout(request, context),
            ),
            arrived,
        )
        response = pb.ModelInferResponse(
            model_name=result.model_name, model_version=result.model_version, id=result.id or ""
        )
        for out in result.outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(out.raw())
        return response

    return {  # server-level calls stay open, as /v2 and /v2/health/* do over HTTP
        "ServerLive": Method(pb.ServerLiveRequest, server_live, auth=False),
        "ServerReady": Method(pb.ServerReadyRequest, server_ready, auth=False),
        "ServerMetadata": Method(pb.ServerMetadataRequest, server_metadata, auth=False),
        "ModelReady": Method(pb.ModelReadyRequest, model_ready),
        "ModelMetadata": Method(pb.ModelMetadataRequest, model_metadata),
        "ModelConfig": Method(pb.ModelConfigRequest, model_config),
        "ModelStatistics": Method(pb.ModelStatisticsRequest, model_statistics),
        "ModelInfer": Method(pb.ModelInferRequest, model_infer),
    }
