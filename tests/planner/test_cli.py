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
            "--cluster", "4xcpu", "--batch", "2", "--seq", "32", "--dtype", "float32",
            "--layers-only", "--json")
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
    r = run("gpt-tiny", "--cluster", "2xcpu", "--layers-only")
    assert r.returncode == 0, r.stderr
    assert "h.3" in r.stdout and "post" in r.stdout
    assert "parameters:" in r.stdout and "2xcpu" in r.stdout


@pytest.mark.slow
def test_llama_3_70b_plan_json_is_a_valid_plan_with_the_model_parameter_bytes():
    from planner.plan import Plan

    r = run("llama-3-70b", "--cluster", "2x8xH100", "--batch", "8", "--seq", "2048",
            "--alternatives", "0", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    plan = Plan.from_dict(data)
    plan.validate()
    assert data["schema"] == "fx-planner/plan/v2"
    assert data["model"]["num_layers"] == len(data["layers"]) == 82
    assert data["solver"]["status"] == "OPTIMAL"
    # Published parameter count of Llama-3-70B: 70.55e9, bf16 = 2 bytes each.
    param_bytes = sum(layer["param_bytes"] for layer in data["layers"])
    assert abs(param_bytes / (2 * 70.55e9) - 1) < 0.01


def test_plan_show_explain_round_trip(tmp_path):
    out = tmp_path / "plan.json"
    made = run("llama-tiny", "--cluster", "4xcpu", "--batch", "4", "--seq", "64",
               "--dtype", "float32", "--out", str(out), "--alternatives", "3")
    assert made.returncode == 0, made.stderr
    assert "solver: cp-sat OPTIMAL" in made.stdout and "baselines" in made.stdout
    shown = run("show", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "pipeline timeline" in shown.stdout and "ratio" in shown.stdout
    as_json = run("show", str(out), "--json")
    assert json.loads(as_json.stdout) == json.loads(out.read_text())
    explained = run("explain", str(out), "--json")
    assert explained.returncode == 0, explained.stderr
    alternatives = json.loads(explained.stdout)
    assert 1 <= len(alternatives) <= 3
    assert all(a["ratio"] >= 1 - 1e-9 for a in alternatives if a["feasible"])


def test_reference_solver_flag_gives_the_same_objective():
    common = ["gpt-tiny", "--cluster", "2x2xcpu", "--batch", "4", "--seq", "64", "--dtype",
              "float32", "--alternatives", "0", "--json"]
    a = json.loads(run(*common).stdout)
    b = json.loads(run(*common, "--solver", "reference").stdout)
    assert b["solver"]["name"] == "reference"
    assert abs(a["solver"]["objective"] - b["solver"]["objective"]) <= 1e-9


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
        (["llama-3-70b", "--cluster", "8xH100", "--tp", "16"], "tp 16 > 8 devices per node"),
        (["llama-3-70b", "--cluster", "1xH100"], "Smallest changes that fit"),
        (["gpt-tiny", "--cluster", "4xcpu", "--dp", "3", "--batch", "4"], "dp 3"),
        (["show", "/nonexistent/plan.json"], "does not exist"),
        (["calibrate", "--cluster", "8xH100"], "is not here"),
        (["gpt-tiny", "--cluster", "4xcpu", "--bogus"], "unrecognized arguments: --bogus"),
        (["gpt-tiny", "--cluster", "2xcpu", "--runtime", "cudagraphs"], "needs GPUs"),
        (["shwo", "plan.json"], "Did you mean `plan show`?"),
    ],
)
def test_bad_input_is_one_clear_error_with_exit_2(args, expected):
    r = run(*args)
    assert r.returncode == 2
    assert expected in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


def test_runtime_flag_is_recorded_and_priced(tmp_path, capsys):
    """In process (the flag's errors are in the exit-2 cases above): the plan records the
    runtime it was priced for, and the NCCL algorithm of each collective."""
    from planner.cli import main
    from planner.plan import Plan

    out = str(tmp_path / "plan.json")
    args = ["llama-tiny", "--cluster", "8xH100", "--phase", "decode", "--tp", "2",
            "--alternatives", "0", "--out", out]
    assert main(args) == 0  # the default for decode on GPUs
    graphs = Plan.load(out)
    assert main([*args, "--runtime", "eager"]) == 0
    eager = Plan.load(out)
    assert (graphs.workload.runtime, eager.workload.runtime) == ("cudagraphs", "eager")
    assert "runtime: eager" in capsys.readouterr().out
    assert eager.predicted.latency_s > graphs.predicted.latency_s  # launches are not free
    algorithms = {c.algorithm for t in graphs.stages[0].sharding.templates
                  for c in t.collectives}
    assert algorithms == {"ring/LL"}  # tiny messages: NCCL's low-latency protocol


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
    ok = run(f"{tmp_path}/mymodel.py:make", "--layers-only", "--json")
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


def test_malformed_plan_files_are_refused(tmp_path):
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text('{"schema": "fx-planner/plan/v0"}')
    r = run("show", str(bad_schema))
    assert r.returncode == 2 and "fx-planner/plan/v2" in r.stderr
    not_json = tmp_path / "garbage.json"
    not_json.write_text("{not json")
    r = run("explain", str(not_json))
    assert r.returncode == 2 and "not valid JSON" in r.stderr


def test_devices_lists_the_catalogue():
    r = run("devices", "--json")
    assert r.returncode == 0
    devices = json.loads(r.stdout)
    assert "H100-SXM-80GB" in devices and "cpu" in devices
    assert devices["H100-SXM-80GB"]["memory_bytes"] == 80 * 10**9


@pytest.mark.slow
def test_run_check_compile_and_refusals(tmp_path):
    plan_file = tmp_path / "plan.json"
    made = run("llama-tiny", "--cluster", "4xcpu", "--batch", "4", "--seq", "32", "--tp", "2",
               "--sp", "off", "--alternatives", "0", "--out", str(plan_file))
    assert made.returncode == 0, made.stderr
    checked = run("run", str(plan_file), "--check", "--json")  # README quotes the tables
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    step = report["step_s"]
    assert step["n"] == 5 and 0 < step["best"] <= step["median"], step
    assert report["max_abs_err"] <= 1e-4 and report["tol"] == 1e-4
    assert [st["ranks"] for st in report["stages"]] == [[0, 1, 2, 3]]
    assert report["stages"][0]["predicted_compute_s"] > 0 and step["predicted"] > 0

    compiled = run("compile", str(plan_file), "--out", str(tmp_path / "build"))
    assert compiled.returncode == 0, compiled.stderr
    stage0 = (tmp_path / "build" / "stage0.py").read_text()
    assert stage0.count("all_reduce") >= 2 * 4  # two per block, four blocks

    sp_file = tmp_path / "sp.json"
    assert run("llama-tiny", "--cluster", "4xcpu", "--batch", "4", "--seq", "32", "--tp", "2",
               "--sp", "on", "--alternatives", "0", "--out", str(sp_file)).returncode == 0
    assert json.loads(sp_file.read_text())["parallelism"]["sequence_parallel"] is True
    # (sequence-parallel plans run equal to eager: tests/codegen/test_runtime.py)

    other_model = run("run", str(plan_file), "--check", "--set", "num_hidden_layers=3")
    assert other_model.returncode != 0
    assert "fingerprint" in (other_model.stderr + other_model.stdout)

    gpu_plan = tmp_path / "gpu.json"
    assert run("gpt-tiny", "--cluster", "8xH100", "--batch", "8", "--seq", "64", "--alternatives",
               "0", "--out", str(gpu_plan)).returncode == 0
    refused = run("run", str(gpu_plan), "--check")
    assert refused.returncode == 2 and "--cluster" in refused.stderr and "xcpu" in refused.stderr


def test_profile_measures_then_reads_the_cache(tmp_path):
    env_cache = {"FX_PLANNER_CACHE": str(tmp_path / "cache")}
    first = run_env(env_cache, "profile", "gpt-tiny", "--batch", "1", "--seq", "16", "--json")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)["layers"]
    assert [r["layer"] for r in rows] == ["pre", "h.0", "h.1", "h.2", "h.3", "post"]
    assert all(r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"] for r in rows)
    assert all(0 < r["time_s"] <= r["median_s"] for r in rows)  # the best round
    # Identical blocks share one measurement, so only pre, h.0 and post are measured.
    assert [r["cached"] for r in rows] == [False, False, True, True, True, False]
    second = run_env(env_cache, "profile", "gpt-tiny", "--batch", "1", "--seq", "16", "--json")
    assert all(r["cached"] for r in json.loads(second.stdout)["layers"])
    bad = run_env(env_cache, "profile", "gpt-tiny", "--min-time", "-1")
    assert bad.returncode == 2 and "--min-time must be >= 0" in bad.stderr


def test_train_plan_with_profile_prices_the_measured_layers(tmp_path, monkeypatch, capsys):
    from tests.bad_input.cli_helpers import call  # in-process: a subprocess costs 5+ s here

    monkeypatch.setenv("FX_PLANNER_CACHE", str(tmp_path))
    code, out, err = call(["gpt-tiny", "--phase", "train", "--cluster", "1xcpu", "--profile",
                           "--batch", "2", "--seq", "16", "--microbatches", "1",
                           "--alternatives", "0", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["workload"]["phase"] == "train" and data["provenance"] == "measured"
    assert {layer["source"] for layer in data["layers"]} == {"measured"}
    # forward and forward + backward records, each under its own key
    assert len({f.parent for f in (tmp_path / "profile").rglob("*.json")}) == 2


@pytest.mark.slow
def test_calibrate_fits_positive_alpha_beta_on_2_gloo_ranks(tmp_path):
    r = run_env({"FX_PLANNER_CACHE": str(tmp_path)}, "calibrate", "--cluster", "2xcpu",
                "--reps", "8", "--repeats", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["roofline"]["peak_flops"]["float32"] > 0
    fits = out["collectives"]["fits"]
    assert {f["kind"] for f in fits} >= {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(f["alpha_s"] > 0 and f["beta_s_per_byte"] > 0 for f in fits)


def test_bench_one_case_passes_against_golden():
    r = run("bench", "--only", "gpt2-1x8", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["ok"] and rows[0]["change"] == 0.0


def run_env(extra_env, *args):
    env = dict(os.environ, COLUMNS="160", **extra_env)
    return subprocess.run([*PLAN, *args], capture_output=True, text=True, timeout=600, env=env)
