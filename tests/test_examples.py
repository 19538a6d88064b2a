"""The examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plan_and_run_example_under_torchrun_on_4_cpu_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(ROOT / "examples" / "plan_and_run.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("max abs error vs eager") == 4
    assert "plan: dp 2 x pp 1 x tp [2]" in r.stdout
