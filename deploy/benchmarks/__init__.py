"""``make bench``: the gateway against the bare model, measured in one run.

``python -m deploy.benchmarks`` (:mod:`deploy.benchmarks.__main__`) runs every phase in
order, or one phase on its own. One module per phase: :mod:`.bare` (bare ONNX Runtime, the
ceiling), :mod:`.latency` (the SLO search), :mod:`.preprocessing` and :mod:`.parity`
(preprocessing alone, and against torchvision), :mod:`.cost` (the gateway's CPU per image
beside the decode floor and the peers), :mod:`.gateway` (the gateway alone, REST and
gRPC), :mod:`.overload`, :mod:`.tail` (against the ideal server), :mod:`.tracing`,
:mod:`.rollout`, :mod:`.triton` and :mod:`.int8`; :mod:`.harness` runs them. Beside them:
:mod:`.inputs` (the exported model and the images), :mod:`.common` (gateways and one step
of load), :mod:`.peers` (the servers measured beside the gateway), :mod:`.cpu_accounting`
(a server's CPU from /proc) and :mod:`.tables` (the printed tables).

The load comes from :mod:`service.tools.bench` (the ``resnet-serve bench`` load tool); the
ideal server is :mod:`service.tools.bench.queueing`, the tracing phase's receiver
:mod:`service.tools.otlp_receiver`.
"""
