"""The registry builds torchvision-identical networks (keys, shapes, parameter counts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.models import ARCHS, UnknownArch, build_model

DATA = Path(__file__).resolve().parents[2] / "data" / "state_dict"

# torchvision's published parameter counts (Weights.meta["num_params"]), an independent
# check on the pinned key/shape lists.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}


def _meta(arch: str, **kw: int) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_model(arch, **kw)


def _pinned(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / f"{arch}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape = line.split()
        rows.append((key, () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))))
    return rows


def test_registry_holds_the_family():
    assert set(ARCHS) == set(TORCHVISION_PARAMS)


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_state_dict_keys_and_shapes_match_torchvision(arch):
    model = _meta(arch)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == _pinned(arch)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_num_classes_and_channels_change_only_fc_and_conv1(arch):
    base = dict(_pinned(arch))
    model = _meta(arch, num_classes=7, in_chans=1)
    changed = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if tuple(v.shape) != base[k]
    }
    width = base["fc.weight"][1]
    assert changed == {"conv1.weight": (64, 1, 7, 7), "fc.weight": (7, width), "fc.bias": (7,)}


def test_forward_shape():
    model = build_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_unknown_arch_lists_known_ones():
    with pytest.raises(UnknownArch, match="known: resnet18, resnet34"):
        build_model("resnet99")


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"in_chans": 2}])
def test_bad_construction_arguments(kw):
    with pytest.raises(ValueError):
        build_model("resnet18", **kw)
