"""The `plan` command driven as a subprocess: exit codes, key output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLAN = [sys.executable, "-m", "planner.cli"]


def run(*args, cwd=None):
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([*PLAN, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_layer_table_json_for_a_small_hf_model():
    r = run("hf:llama", "--set", "num_hidden_layers=3", "--set", "hidden_size=64",
            "--set", "intermediate_size=128", "--set", "num_attention_heads=4",
            "--set", "num_key_value_heads=2", "--set", "vocab_size=256",
            "--cluster", "4xcpu", "--batch", "2", "--seq", "32", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model = out["model"]
    assert [layer["kind"] for layer in model["layers"]] == ["pre", "block", "block", "block", "post"]
    assert sum(layer["param_bytes"] for layer in model["layers"]) == model["param_bytes"]
    assert out["cluster"]["num_devices"] == 4
    assert model["arch"]["num_kv_heads"] == 2
    roles = {t["role"] for t in model["cuts"][1]["tensors"]}
    assert {"hidden", "rotary"} <= roles


def test_table_output_names_layers_and_totals():
    r = run("gpt-tiny", "--cluster", "2xcpu")
    assert r.returncode == 0, r.stderr
    assert "h.3" in r.stdout and "post" in r.stdout
    assert "parameters:" in r.stdout and "2xcpu" in r.stdout


@pytest.mark.slow
def test_llama_3_70b_json_reports_parameter_bytes():
    r = run("llama-3-70b", "--cluster", "2x8xH100", "--json")
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)["model"]
    assert len(model["layers"]) == 82
    # Published parameter count of Llama-3-70B: 70.55e9; bf16 = 2 bytes each.
    assert abs(model["num_params"] / 70.55e9 - 1) < 0.01
    assert model["param_bytes"] == 2 * model["num_params"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["lama-3-70b"], "Did you mean llama-3-70b"),
        (["hf:lama"], "Did you mean llama"),
        (["hf:llama", "--set", "num_hiden_layers=2"], "Did you mean num_hidden_layers"),
        (["gpt2", "--set", "num_layers"], "is not KEY=VALUE"),
        (["gpt2", "--seq", "4096"], "--seq 1024 or less"),
        (["gpt-tiny", "--cluster", "8xH1000"], "Did you mean H100"),
        (["gpt-tiny", "--cluster", "eight gpus"], "write DEVICESxTYPE"),
        (["gpt-tiny", "--cluster", "16xH100"], "2x8xH100-SXM-80GB"),
        (["gpt-tiny", "--batch", "0"], "batch size must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_error_with_exit_2(args, expected):
    r = run(*args)
    assert r.returncode == 2
    assert expected in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


def test_factory_forms(tmp_path):
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import torch
        from planner.models import MLP, MLPConfig
        def make():
            return MLP(MLPConfig(in_features=8, hidden=16, out_features=2, num_blocks=2)), (torch.zeros(4, 8),)
        def no_inputs():
            return MLP(MLPConfig())
        def broken():
            raise RuntimeError("weights missing")
    """))
    ok = run(f"{tmp_path}/mymodel.py:make", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["model"]["layers"]) == 4
    raised = run(f"{tmp_path}/mymodel.py:broken")
    assert raised.returncode == 2
    assert "raised RuntimeError: weights missing" in raised.stderr
    missing = run(f"{tmp_path}/mymodel.py:no_inputs")
    assert missing.returncode == 2 and "without example inputs" in missing.stderr
    typo = run(f"{tmp_path}/mymodel.py:mak")
    assert typo.returncode == 2 and "Did you mean make" in typo.stderr
    module_form = run("planner.models.gpt:GPT")
    assert module_form.returncode == 2 and "raised TypeError" in module_form.stderr


def test_devices_lists_the_catalogue():
    r = run("devices", "--json")
    assert r.returncode == 0
    devices = json.loads(r.stdout)
    assert "H100-SXM-80GB" in devices and "cpu" in devices
    assert devices["H100-SXM-80GB"]["memory_bytes"] == 80 * 10**9
