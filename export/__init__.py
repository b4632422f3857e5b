"""resnet-serving export: trained ResNet -> verified ONNX -> Triton model repository."""

__version__ = "0.1.0"
