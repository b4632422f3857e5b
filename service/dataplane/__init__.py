"""The transport-neutral data plane: routing, decoding, preprocessing, batching, scoring, statistics."""
