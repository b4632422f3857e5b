"""``make bench``'s engines phase, its arithmetic and its table: the ratios are taken round by
round and judged on their median against the issue's targets; each gateway is set against
its own bare engine of the same round; the demo's agreement is read from an export report
as the export gate wrote it; and the table says MISSED where a target was."""

from __future__ import annotations

from deploy.benchmarks.engines import RATIOS, demo_agreement, ratios, vs_own_bare
from deploy.benchmarks.tables import engines_table


def _round(ort_fp32: float, ov_fp32: float, ov_bf16: float, ort_int8: float, ov_int8: float):
    return {
        "ort_fp32": ort_fp32,
        "ov_fp32": ov_fp32,
        "ov_bf16": ov_bf16,
        "ort_int8": ort_int8,
        "ov_int8": ov_int8,
    }


BARE = [_round(25.0, 25.5, 50.0, 90.0, 100.0), _round(24.0, 24.0, 40.0, 80.0, 90.0)]
GATEWAY = [
    {"ort_fp32": 20.0, "ov_bf16": 36.0, "ort_int8": 60.0, "ov_int8": 60.0},
    {"ort_fp32": 20.0, "ov_bf16": 30.0, "ort_int8": 60.0, "ov_int8": 66.0},
]

#: What ``resnet-export demo --precision int8`` writes, the parts the phase reads.
INT8_REPORT = {
    "precision": "int8",
    "accuracy_gate": {
        "candidate": "INT8 on AVX-512 VNNI kernels",
        "images": 450,
        "images_source": "held-out digits",
        "top1_agreement_pct": 100.0,
        "max_abs_logit_diff": 0.5926046371459961,
    },
    "kernels_vs_exact": {
        "kernels": "AVX-512 VNNI",
        "reference": "INT8 exact reference",
        "max_diff_pct_of_largest": 1.227,
    },
    "openvino_vs_exact": {"top1_agreement_pct": 100.0, "max_diff_pct_of_largest": 1.3},
}


def test_ratios_are_per_round_and_judged_on_their_median():
    found = ratios(BARE, GATEWAY)
    assert set(found) == set(RATIOS)
    bf16 = found["bare_bf16_ov_vs_ort_fp32"]
    assert bf16["rounds"] == [2.0, 1.667] and bf16["median"] == 1.833
    assert bf16["target"] == 1.8 and bf16["met"] is True
    gw = found["gateway_bf16_ov_vs_ort_fp32"]
    assert gw["rounds"] == [1.8, 1.5] and gw["median"] == 1.65 and gw["met"] is False
    int8 = found["gateway_int8_ov_vs_ort"]
    assert int8["median"] == 1.05 and int8["met"] is True  # the target itself is met
    assert found["bare_fp32_ov_vs_ort"]["target"] is None
    assert found["bare_fp32_ov_vs_ort"]["met"] is None


def test_each_gateway_is_set_against_its_own_bare_engine_of_the_same_round():
    own = vs_own_bare(BARE, GATEWAY)
    assert own == {"ort_fp32": 0.817, "ov_bf16": 0.735, "ort_int8": 0.708, "ov_int8": 0.667}


def test_the_demo_agreement_is_what_the_export_gate_reported():
    a = demo_agreement(INT8_REPORT)
    assert a["precision"] == "int8" and a["images"] == 450
    assert a["top1_vs_fp32_pct"] == 100.0 and a["max_logit_diff"] == 0.5926
    assert a["openvino_top1_vs_exact_pct"] == 100.0
    bf16 = {**INT8_REPORT, "precision": "bf16"}
    del bf16["openvino_vs_exact"]  # a BF16 report has no INT8 reference
    assert "openvino_top1_vs_exact_pct" not in demo_agreement(bf16)


def test_the_table_says_which_targets_were_missed():
    poisson = {
        "rate_per_s": 8.0,
        "p99_ms": 900.0,
        "ideal_p99_ms": 600.0,
        "vs_ideal": 1.5,
    }
    results = {
        "rounds": 2,
        "bare_batch8_images_per_s": BARE,
        "gateway_clients16_images_per_s": GATEWAY,
        "ratios": ratios(BARE, GATEWAY),
        "gateway_vs_own_bare": vs_own_bare(BARE, GATEWAY),
        "poisson_vs_ideal": {"ov_bf16": poisson},
        "demo_agreement": [],
    }
    machine = {"isa": "AVX-512 VNNI", "flags": ["avx2", "avx512_bf16"], "cpus": 2}
    table = engines_table(results, machine)
    assert "flags avx2, avx512_bf16; 2 usable CPUs" in table
    assert "| 24.5 img/s | 45.0 img/s | **1.83x** (rounds 2.00, 1.67; target 1.80x: met) |" in table
    assert "**1.65x** (rounds 1.80, 1.50; target 1.70x: MISSED)" in table
    assert "| OpenVINO, bf16 version (BF16) | 8.0/s | 900 ms | 600 ms | 1.50x |" in table
    assert table.endswith("Demo agreement: not read (no --demo-repository given).")
    results["demo_agreement"] = [{"repository": "r", **demo_agreement(INT8_REPORT)}]
    assert "| INT8: INT8 on AVX-512 VNNI kernels | 450 | 100.00% |" in engines_table(
        results, machine
    )
