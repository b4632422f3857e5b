"""resnet-serving gateway: REST/gRPC image classification in front of ONNX Runtime or Triton.

Never imports torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resnet-serving")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
