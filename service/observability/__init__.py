"""What the gateway tells its operators: Prometheus metrics, each request's account and access log, traces."""
