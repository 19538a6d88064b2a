from __future__ import annotations

import pytest

from cost_models.devices import DEVICES, UnknownDeviceError, lookup

ISSUE_DEVICES = ["H100-SXM-80GB", "H100-PCIe", "H200", "A100-40GB", "A100-80GB", "L40S", "L4", "cpu"]


def test_catalogue_holds_every_device_the_issue_names():
    assert set(ISSUE_DEVICES) <= set(DEVICES)


@pytest.mark.parametrize(
    "name, bf16, bandwidth, capacity",
    [
        ("H100-SXM-80GB", 989e12, 3.35e12, 80e9),
        ("H200", 989e12, 4.8e12, 141e9),
        ("A100-40GB", 312e12, 1.555e12, 40e9),
        ("L40S", 362.05e12, 864e9, 48e9),
        ("L4", 121e12, 300e9, 24e9),
    ],
)
def test_datasheet_figures(name, bf16, bandwidth, capacity):
    spec = lookup(name)
    assert spec.peak_flops["bfloat16"] == bf16
    assert spec.memory_bandwidth == bandwidth
    assert spec.memory_bytes == capacity


def test_aliases_are_case_insensitive():
    assert lookup("h100").name == "H100-SXM-80GB"
    assert lookup("a100").name == "A100-80GB"
    assert lookup("CPU").name == "cpu"


def test_unknown_device_suggests_close_names():
    with pytest.raises(UnknownDeviceError, match="Did you mean.*L40S"):
        lookup("L40")
