"""``resnet-serve bench``: load tests against a gateway (any URL), closed loop and open loop
(Poisson arrivals, latency from the scheduled send time), an SLO search for the highest
rate within a p99 budget, and reports (JSON, CSV, a chart) with the gateway's own
breakdown of where the time went (from its /metrics).

- :mod:`service.tools.bench.targets`: the four protocols, each request encoded once;
- :mod:`service.tools.bench.loops`: the loops, the step statistics (HDR histogram);
- :mod:`service.tools.bench.gateway_metrics`: the gateway's /metrics before and after a step;
- :mod:`service.tools.bench.slo`: the SLO search;
- :mod:`service.tools.bench.queueing`: the ideal server, what queueing alone costs under the
  same arrivals;
- :mod:`service.tools.bench.report`: report.json, steps.csv, latency.png, the printed table.
"""


class BenchError(Exception):
    """A one-line reason the benchmark cannot run (bad arguments, unreachable target)."""
