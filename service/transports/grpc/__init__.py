"""gRPC: the ``Classifier`` service and KServe v2's ``GRPCInferenceService`` over the runtime, one error mapping."""
