"""Commands beside the serving path: the ``resnet-serve`` CLI, the load tool, tune, a local Triton,
an OTLP receiver."""
