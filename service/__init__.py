"""resnet-serving gateway: REST/gRPC image classification in front of ONNX Runtime or Triton.

Never imports torch.
"""

__version__ = "0.1.0"
