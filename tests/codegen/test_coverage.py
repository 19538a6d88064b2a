"""The sharding coverage sweep's subset: 8 transformers model types at tp 2 × pp 2.

Each model is planned with the pins on 4xcpu (batch 2, sequence 8, float32) and run by 4
gloo ranks; on every rank the outputs equal eager within 1e-4, the collectives in the
generated graph equal the plan's record (kind and bytes), the parameter bytes equal the
plan's memory model, and exactly the parameters the strategy shards are sliced. The full
sweep over every type is ``benchmarks/coverage.py`` (its table is in docs/codegen.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from planner.models.coverage import SUBSET

ROOT = Path(__file__).resolve().parents[2]


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_sweep", ROOT / "benchmarks" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["coverage_sweep"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_subset_runs_equal_to_eager_with_the_recorded_collectives_and_bytes(tmp_path):
    cov = _coverage()
    # tp 2 x pp 2 shards every block of each type (each stage is a tp-2 group); data
    # parallelism is orthogonal and runs in tests/codegen/test_runtime.py (dp x tp, dp x pp)
    # and in benchmarks/coverage.py's full sweep, which make test cannot fit.
    configs = ["tp2pp2"]
    cases, failed = cov.make_cases(SUBSET, configs)
    assert not failed, failed
    assert len(cases) == len(SUBSET) * len(configs)
    rows = cov.run(cases, tmp_path, chunk=len(cases))
    bad = [r for r in rows if r["status"] != "pass"]
    assert not bad, bad
    # tp really shards: every tp case has sharded block parameters in its record
    for r in rows:
        assert r["sharded_params"] > 0, r
