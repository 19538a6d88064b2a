"""ParallelLayout: coordinates, stage-boundary peers for mixed tp, refusals."""

from __future__ import annotations

import pytest

from codegen.layout import LayoutError, ParallelLayout, StageLayout


def test_boundary_peers_tp_two_to_one_and_one_to_two():
    down = ParallelLayout.simple(1, [(0, 2, 2), (3, 5, 1)])  # ranks 0,1 | 2
    assert [down.boundary_peers(r) for r in range(3)] == [(None, (2,)), (None, ()), (0, ())]
    up = ParallelLayout.simple(1, [(0, 2, 1), (3, 5, 2)])  # rank 0 | 1,2
    assert [up.boundary_peers(r) for r in range(3)] == [(None, (1, 2)), (0, ()), (0, ())]
    up.validate(3)
    down.validate(3)


def test_boundary_peers_spread_sends_and_respect_replicas():
    layout = ParallelLayout.simple(2, [(0, 1, 2), (2, 3, 4), (4, 5, 1)])  # 7 ranks per replica
    assert layout.boundary_peers(7) == (None, (9, 11))  # replica 1, stage 0, tp rank 0
    assert layout.boundary_peers(8) == (None, (10, 12))
    assert [layout.boundary_peers(r)[0] for r in range(9, 13)] == [7, 8, 7, 8]
    assert [layout.boundary_peers(r)[1] for r in range(9, 13)] == [(13,), (), (), ()]
    layout.validate(14)


def test_world_size_and_shared_devices_are_refused_with_every_factor():
    layout = ParallelLayout.simple(2, [(0, 5, 2)])
    with pytest.raises(LayoutError, match=r"dp 2 × \(tp per stage 2\) = 4 ≠ world size 3"):
        layout.validate(3)
    dup = ParallelLayout(1, (StageLayout((0, 2), 1, ((0,),)), StageLayout((3, 5), 1, ((0,),))))
    with pytest.raises(LayoutError, match="more than one stage"):
        dup.validate()


def test_failure_diagnosis_names_the_rank_that_died_not_the_ones_stopped_after():
    from codegen.check import diagnose_failure

    stderr = "".join(f"  rank      : {r} (local_rank: {r})\n  exitcode  : {c} (pid: 1)\n"
                     for r, c in [(0, -15), (1, -9), (2, 1)])
    status = {0: {"state": "running", "phase": "forward", "t": 5.0},
              1: {"state": "running", "phase": "forward", "t": 4.0, "coords": [1, 0, 0]},
              2: {"state": "error", "phase": "forward", "t": 6.0, "error": "RuntimeError: reset"}}
    msg = diagnose_failure(1, stderr, status, 3, seconds=9.0, timeout_s=60,
                           collective_timeout_s=20, ended_at=7.0)
    assert msg.startswith("plan run failed: rank 1 (stage 1, replica 0, tp rank 0) died with "
                          "signal 9 (SIGKILL) during forward")
    assert "rank 2 then raised RuntimeError: reset" in msg and "3.0 s after rank 1's" in msg
    hung = diagnose_failure(124, "", {0: {"state": "ok"}, 1: status[1]}, 2, seconds=61.0,
                            timeout_s=60, collective_timeout_s=20)
    assert "exceeded its wall time of 60 s" in hung and "rank 1 in forward" in hung


def test_failure_diagnosis_of_a_hang_names_who_timed_out_and_who_was_still_running():
    from codegen.check import diagnose_failure

    # Rank 1 hangs: ranks 0 and 2 time out waiting for it and raise; torchrun then stops it.
    stderr = "".join(f"  rank      : {r} (local_rank: {r})\n  exitcode  : {c} (pid: 1)\n"
                     for r, c in [(0, 1), (1, -15), (2, 1)])
    timeout = "DistBackendError: [../gloo/transport/tcp/pair.cc] Timed out waiting 20000ms"
    status = {0: {"state": "error", "phase": "forward", "t": 25.0, "error": timeout},
              1: {"state": "running", "phase": "forward", "t": 4.0, "coords": [1, 0, 0]},
              2: {"state": "error", "phase": "forward", "t": 25.5, "error": timeout}}
    msg = diagnose_failure(1, stderr, status, 3, seconds=27.0, timeout_s=120,
                           collective_timeout_s=20, ended_at=26.0)
    assert msg.startswith(f"plan run failed: rank 0 raised first, during forward: {timeout}; "
                          "rank 1 (stage 1, replica 0, tp rank 0) had raised nothing and was "
                          "still running (phase forward) until torchrun stopped it")
    assert "died" not in msg
