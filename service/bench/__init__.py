"""``resnet-serve bench``: load tests against a gateway (any URL), closed loop and open loop
(Poisson arrivals, latency from the scheduled send time), an SLO search for the highest
rate within a p99 budget, and reports (JSON, CSV, a chart) with the gateway's own
breakdown of where the time went (from its /metrics).

- :mod:`service.bench.targets`: the four protocols, each request encoded once;
- :mod:`service.bench.runner`: the loops, the step statistics (HDR histogram);
- :mod:`service.bench.server`: the gateway's /metrics before and after a step;
- :mod:`service.bench.slo`: the SLO search;
- :mod:`service.bench.report`: report.json, steps.csv, latency.png, the printed table.
"""


class BenchError(Exception):
    """A one-line reason the benchmark cannot run (bad arguments, unreachable target)."""
