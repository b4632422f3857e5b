"""tune's candidates: the engine crossed with how batches share the cores, then one change at
a time on the winner, and the table that reports them (the measuring: tests/e2e/test_tune.py)."""

from __future__ import annotations

from service.tools.tune import candidates, refinements, table


def test_the_first_round_crosses_each_engine_with_the_ways_to_share_the_cores():
    assert candidates(4, ["onnxruntime", "openvino"]) == [
        {"engine": "onnxruntime", "ort_parallel_batches": 1},
        {"engine": "onnxruntime", "ort_parallel_batches": 4},
        {"engine": "openvino", "ort_parallel_batches": 1},
        {"engine": "openvino", "ort_parallel_batches": 4},
    ]
    # On one CPU parallel batches are one batch: the engine alone is left to choose.
    assert candidates(1, ["onnxruntime"]) == [{"engine": "onnxruntime", "ort_parallel_batches": 1}]


def test_the_second_round_changes_one_knob_at_a_time_on_the_winner():
    winner = {"engine": "openvino", "ort_parallel_batches": 2}
    tried = refinements(winner, 2, 120.0)
    assert all(t.items() >= winner.items() and len(t) == 3 for t in tried)
    assert [t for t in tried if "max_batch_size" in t] == [{**winner, "max_batch_size": 1}]
    # CPUs exclusive or not: the other way than the winner's default (on for batches side
    # by side, off for one batch on all the cores).
    assert {**winner, "exclusive_cpus": False} in tried
    one_batch = refinements({"engine": "onnxruntime", "ort_parallel_batches": 1}, 2, 120.0)
    assert {"engine": "onnxruntime", "ort_parallel_batches": 1, "max_batch_size": 4} in one_batch
    assert {"engine": "onnxruntime", "ort_parallel_batches": 1, "target_p99_ms": 120.0} in one_batch
    assert {"engine": "onnxruntime", "ort_parallel_batches": 1, "exclusive_cpus": True} in one_batch


def test_the_table_names_engine_and_served_precision_and_marks_the_choice():
    best = {"settings": {"engine": "openvino"}, "engine": "openvino", "served_precision": "bf16",
            "slo": {"max_rate_per_s": 50.0, "p99_ms": 90.0}, "error": None}  # fmt: skip
    other = {"settings": {"engine": "onnxruntime", "ort_parallel_batches": 2}, "slo": {},
             "error": "not tried: --max-minutes spent"}  # fmt: skip
    text = table({"p99_budget_ms": 100.0, "best": best, "trials": [best, other]})
    assert text.splitlines()[2:] == [
        "| defaults (chosen) | openvino | bf16 | **50** | 90 ms |",
        "| `ORT_PARALLEL_BATCHES=2` | onnxruntime |  | not tried: --max-minutes spent | - |",
    ]
