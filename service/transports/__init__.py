"""The wire formats: HTTP (REST /v1, KServe v2, operations) and gRPC (Classifier, KServe v2), over the runtime."""
