"""Each version's inference statistics (service.dataplane.statistics) in the shape of
Triton's statistics extension: what a fresh version reports, how durations and batches
add up, and that the dict is exactly Triton's ``ModelStatistics`` message."""

from __future__ import annotations

import json

from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as triton

from service.dataplane.statistics import ModelStatistics

ZERO = {"count": 0, "ns": 0}
#: What Triton's InferStatistics holds, in its order.
TRITON_KINDS = (
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
    "cache_hit", "cache_miss",
)  # fmt: skip


def test_a_fresh_version_reports_zeros_in_tritons_shape():
    assert ModelStatistics("tiny", "3").as_dict() == {
        "name": "tiny",
        "version": "3",
        "last_inference": 0,
        "inference_count": 0,
        "execution_count": 0,
        "inference_stats": {kind: ZERO for kind in TRITON_KINDS},
        "batch_stats": [],
        "memory_usage": [],
    }


def test_durations_add_their_counts_and_whole_nanoseconds():
    stats = ModelStatistics("tiny", "1")
    stats.durations["queue"].add(0.25)
    stats.durations["queue"].add(0.5)
    stats.durations["compute_input"].add(1.5, count=3)  # three requests' worth at once
    stats.durations["fail"].add(1e-10)  # under a nanosecond: counted, no time
    got = stats.as_dict()["inference_stats"]
    assert got["queue"] == {"count": 2, "ns": 750_000_000}
    assert got["compute_input"] == {"count": 3, "ns": 1_500_000_000}
    assert got["fail"] == {"count": 1, "ns": 0}
    assert got["success"] == got["compute_infer"] == got["compute_output"] == ZERO
    assert all(type(v) is int for d in got.values() for v in d.values())  # uint64 in Triton


def test_each_backend_call_counts_once_under_its_batch_size_smallest_first():
    stats = ModelStatistics("tiny", "1")
    for size, seconds in ((8, 0.5), (1, 0.25), (8, 0.25), (3, 0.5)):
        stats.batch(size, seconds)
    got = stats.as_dict()
    assert got["execution_count"] == 4
    assert got["inference_count"] == 0  # images are counted by the data plane, per request
    assert got["batch_stats"] == [
        {"batch_size": 1, "compute_input": ZERO, "compute_infer": {"count": 1, "ns": 250_000_000},
         "compute_output": ZERO},
        {"batch_size": 3, "compute_input": ZERO, "compute_infer": {"count": 1, "ns": 500_000_000},
         "compute_output": ZERO},
        {"batch_size": 8, "compute_input": ZERO, "compute_infer": {"count": 2, "ns": 750_000_000},
         "compute_output": ZERO},
    ]  # fmt: skip
    assert sum(b["compute_infer"]["count"] for b in got["batch_stats"]) == got["execution_count"]


def test_a_report_is_a_snapshot_not_a_live_view():
    stats = ModelStatistics("tiny", "1")
    before = stats.as_dict()
    stats.batch(2, 0.5)
    stats.durations["success"].add(0.5)
    stats.inference_count += 2
    assert before["execution_count"] == 0 and before["batch_stats"] == []
    assert before["inference_stats"]["success"] == ZERO and before["inference_count"] == 0
    assert stats.as_dict()["inference_stats"]["success"] == {"count": 1, "ns": 500_000_000}


def test_versions_keep_separate_statistics():
    one, two = ModelStatistics("tiny", "1"), ModelStatistics("tiny", "2")
    one.batch(4, 0.25)
    one.durations["success"].add(0.25)
    assert two.as_dict() == ModelStatistics("tiny", "2").as_dict()


def test_the_report_is_tritons_model_statistics_message_field_for_field():
    """What KServe v2's gRPC statistics call converts: no field Triton does not know, every
    field of InferStatistics present, and nothing lost on the way through the message."""
    stats = ModelStatistics("tiny", "2")
    stats.last_inference_ms = 1_700_000_000_123
    stats.inference_count = 5
    for kind in ModelStatistics.KINDS:
        stats.durations[kind].add(0.25)
    stats.batch(2, 0.25)
    stats.batch(3, 0.5)
    report = stats.as_dict()
    message = json_format.ParseDict(json.loads(json.dumps(report)), triton.ModelStatistics())
    fields = tuple(f.name for f in triton.InferStatistics.DESCRIPTOR.fields)
    assert tuple(report["inference_stats"]) == fields == TRITON_KINDS
    assert (message.name, message.version, message.last_inference) == (
        "tiny", "2", 1_700_000_000_123,
    )  # fmt: skip
    assert (message.inference_count, message.execution_count) == (5, 2)
    assert message.inference_stats.compute_infer.ns == 250_000_000
    assert [(b.batch_size, b.compute_infer.count) for b in message.batch_stats] == [(2, 1), (3, 1)]
