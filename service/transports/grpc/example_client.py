"""A small gRPC client for the gateway: classify image files, print the top classes.

    python -m service.transports.grpc.example_client --target 127.0.0.1:50051 cat.jpg dog.png
    python -m service.transports.grpc.example_client --model digits --top-k 3 --api-key KEY seven.png

In your own code, the whole of it is::

    import grpc
    from service.transports.grpc import classifier_pb2, classifier_pb2_grpc

    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        reply = stub.Classify(
            classifier_pb2.ClassifyRequest(model="digits", images=[open("seven.png", "rb").read()], top_k=3),
            timeout=5,  # the call's deadline is the request's deadline
        )
        for prediction in reply.results[0].predictions:
            print(prediction.label, prediction.score)

Other languages: generate stubs from ``service/transports/grpc/classifier.proto`` (or use server
reflection, e.g. ``grpcurl -plaintext 127.0.0.1:50051 list``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from service.transports.grpc import classifier_pb2, classifier_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Classify images with a resnet-serving gateway over gRPC."
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway gRPC address")
    parser.add_argument("--model", default="", help="model name (default: the gateway's default)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    parser.add_argument("--api-key", default=None, help="API key, if the gateway requires one")
    args = parser.parse_args(argv)
    try:
        images = [path.read_bytes() for path in args.images]
    except OSError as exc:
        print(f"example_client: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    metadata = (("x-api-key", args.api_key),) if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        try:
            reply = stub.Classify(
                classifier_pb2.ClassifyRequest(model=args.model, images=images, top_k=args.top_k),
                timeout=args.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as exc:
            print(f"example_client: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for path, result in zip(args.images, reply.results, strict=True):
        best = ", ".join(f"{p.label} ({p.score:.3f})" for p in result.predictions)
        print(f"{path}: {best}")
    print(f"model {reply.model} version {reply.model_version}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
