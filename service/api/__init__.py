"""HTTP API (FastAPI): routes only; the work is in service.classifier."""
