"""NCCL's algorithm and protocol choice (cost_models/nccl.py)."""

from __future__ import annotations

import pytest

from cost_models.devices import lookup
from cost_models.nccl import (
    ALGORITHMS,
    PROTOCOLS,
    RING_LINK_EFFICIENCY,
    choose,
    custom_all_reduce_time,
    has_nvls,
    nccl_time,
)

H100, A100, L40S = lookup("H100"), lookup("A100-80GB"), lookup("L40S")


def test_the_choice_is_the_cheapest_pair_nccl_offers():
    for device in (H100, A100, L40S):
        for nbytes in (8 << 10, 1 << 20, 64 << 20, 1 << 30):
            pick = choose("all_reduce", nbytes, 8, device)
            times = [t for a in ALGORITHMS for p in PROTOCOLS
                     if (t := nccl_time("all_reduce", nbytes, 8, device, algorithm=a,
                                        protocol=p)) is not None]
            assert pick.seconds == min(times)


def test_small_messages_take_ll_and_large_ones_simple():
    small = choose("all_reduce", 16 << 10, 8, H100)  # a decode step's hidden state, bf16
    assert small.protocol == "LL"
    assert small.seconds == pytest.approx((6.6 + 14 * 0.6) * 1e-6, rel=0.05)  # NCCL's floor
    assert choose("all_reduce", 1 << 30, 8, A100).protocol == "Simple"


def test_nvls_only_on_hopper_with_nvswitch_and_only_for_all_reduce():
    assert has_nvls(H100) and has_nvls(lookup("H200"))
    assert not has_nvls(A100) and not has_nvls(L40S) and not has_nvls(lookup("H100-PCIe"))
    assert choose("all_reduce", 4 << 30, 8, H100).algorithm == "nvls"
    assert choose("all_reduce", 4 << 30, 8, A100).algorithm == "ring"
    assert nccl_time("all_gather", 1 << 30, 8, H100, algorithm="nvls", protocol="Simple") is None
    assert nccl_time("all_gather", 1 << 30, 8, H100, algorithm="tree", protocol="Simple") is None
    assert choose("all_gather", 1 << 30, 8, H100).algorithm == "ring"


def test_ring_bus_bandwidth_is_the_fitted_link_fraction_and_a100_is_capped():
    n, nbytes = 8, 4 << 30
    for device, bus in ((H100, RING_LINK_EFFICIENCY * 450e9), (A100, 235e9)):
        t = nccl_time("all_reduce", nbytes, n, device, algorithm="ring", protocol="Simple")
        assert 2 * (n - 1) / n * nbytes / t == pytest.approx(bus, rel=1e-2)  # + latency


def test_groups_crossing_nodes_are_limited_by_the_nic():
    intra = choose("all_reduce", 1 << 30, 8, H100)
    inter = choose("all_reduce", 1 << 30, 8, H100, link="inter")
    assert inter.seconds > 5 * intra.seconds  # 50 GB/s NIC against 450 GB/s NVLink
    assert inter.algorithm != "nvls"


def test_custom_all_reduce_is_one_shot_for_small_and_two_shot_for_large_messages():
    small, large = 16 << 10, 256 << 20
    fixed = custom_all_reduce_time(1, 8, A100)
    assert custom_all_reduce_time(small, 8, A100) < 2 * fixed  # one shot: one fixed time
    bw = RING_LINK_EFFICIENCY * A100.intra_node_bandwidth
    assert custom_all_reduce_time(large, 8, A100) == pytest.approx(
        2 * fixed + 2 * 7 / 8 * large / bw, rel=1e-3)
    assert custom_all_reduce_time(small, 8, A100) < choose("all_reduce", small, 8, A100).seconds
