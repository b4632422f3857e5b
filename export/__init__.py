"""resnet-serving export: trained ResNet -> verified ONNX -> Triton model repository."""

from service import __version__

__all__ = ["__version__"]
