from __future__ import annotations

import numpy as np
import pytest

from cost_models.collectives import (
    DEFAULT_CHAIN,
    DEFAULT_PERCENTILE,
    AlphaBeta,
    CollectiveCalibration,
    CollectiveFit,
    boundary_time,
    bus_factor,
    calibrate,
    collective_time,
    fit_alpha_beta,
    fit_calibration,
    load_calibration,
    measure_collectives,
)
from cost_models.devices import lookup


def test_ring_formulas():
    ab = AlphaBeta(alpha_s=1e-5, beta_s_per_byte=1e-9)
    n, size = 4, 1_000_000
    assert collective_time("all_reduce", size, n, alpha_beta=ab) == pytest.approx(
        2 * 3 * 1e-5 + 2 * 3 / 4 * size * 1e-9)
    assert collective_time("all_gather", size, n, alpha_beta=ab) == pytest.approx(
        3 * 1e-5 + 3 / 4 * size * 1e-9)
    assert collective_time("reduce_scatter", size, n, alpha_beta=ab) == collective_time(
        "all_gather", size, n, alpha_beta=ab)
    assert collective_time("all_reduce", size, 1, alpha_beta=ab) == 0.0
    assert bus_factor("send_recv", 2) == 1.0


def test_link_classes_use_catalogue_intra_and_inter_figures():
    h100 = lookup("H100")
    intra = boundary_time(50e6, "intra", device=h100)
    inter = boundary_time(50e6, "inter", device=h100)
    assert intra == pytest.approx(h100.intra_node_latency + 50e6 / 450e9)
    assert inter == pytest.approx(h100.inter_node_latency + 50e6 / 50e9)


def test_a_calibration_round_trips_with_how_it_was_measured():
    fit = CollectiveFit("all_reduce", 2, "intra", 2e-3, 2e-9, (4096, 65536), (2.0e-3, 2.2e-3))
    cal = CollectiveCalibration("gloo", (fit,), 50.0, None, chain=8)
    again = CollectiveCalibration.from_dict(cal.to_dict())
    assert again == cal and again.chain == 8
    # files written before chains were measured: one call per sample
    old = {k: v for k, v in cal.to_dict().items() if k != "chain"}
    assert CollectiveCalibration.from_dict(old).chain == 1


def test_fit_alpha_beta_recovers_a_line():
    sizes = np.array([1e3, 1e4, 1e5, 1e6])
    alpha, beta = fit_alpha_beta(sizes, 3e-4 + 2e-9 * 1.5 * sizes, factor=1.5)
    assert alpha == pytest.approx(3e-4, rel=1e-6)
    assert beta == pytest.approx(2e-9, rel=1e-6)


@pytest.mark.slow
def test_gloo_calibration_on_two_ranks_predicts_a_held_out_size(tmp_path):
    cal = calibrate(2, sizes=(4096, 65536, 1 << 20, 4 << 20), reps=20,
                    kinds=("all_reduce",), cache=tmp_path)
    fit = cal.fit_for("all_reduce", 2)
    assert fit.alpha_s > 0 and fit.beta_s_per_byte > 0
    # what a step pays: the median per call of chains of back-to-back calls
    assert (cal.chain, cal.percentile) == (DEFAULT_CHAIN, DEFAULT_PERCENTILE) == (8, 50.0)
    stored = load_calibration("gloo", cache=tmp_path)
    assert stored.fit_for("all_reduce", 2) == fit and stored.chain == cal.chain
    # The held-out size is measured in the same job as the sizes it is predicted from, its
    # repetitions interleaved with theirs, so that a shared machine's slow spells hit all
    # sizes alike. 150 repetitions: with 40, the 10th percentile of one size moved by 20%
    # between jobs here and 1 check in 8 missed the target (docs/cost-model.md).
    fitted, held_out = (4096, 65536, 1 << 20, 4 << 20), 2 << 20
    raw = measure_collectives(2, kinds=("all_reduce",), sizes=(*fitted, held_out), reps=150)
    low = {n: float(np.percentile(raw["all_reduce"][n], cal.percentile)) for n in raw["all_reduce"]}
    fit = fit_calibration({"all_reduce": {n: raw["all_reduce"][n] for n in fitted}}, 2,
                          percentile=cal.percentile).fit_for("all_reduce", 2)
    assert fit.alpha_s > 0 and fit.beta_s_per_byte > 0
    assert fit.times_s == tuple(low[n] for n in fitted)
    predicted = fit.time(held_out)
    assert abs(predicted - low[held_out]) / low[held_out] <= 0.25
