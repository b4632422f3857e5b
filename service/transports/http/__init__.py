"""HTTP APIs (FastAPI): REST /v1, KServe v2, operations. Wire formats only: the work is
the data plane's (service.dataplane.plane)."""
