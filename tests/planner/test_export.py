"""`plan export --to ENGINE`: every option an export emits is in the checked list
(planner/engines/flags.json) with the plan's values; a plan an engine cannot express, and a
training target, are one clear error; `plan MODEL --target` plans what the engine can run."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest

from planner.engines import (
    INFERENCE_TARGETS,
    TRAINING_TARGETS,
    ExportError,
    checked_flags,
    export_plan,
)
from planner.plan import Plan
from tests.bad_input.cli_helpers import call, refused

TINY = ["llama-tiny", "--cluster", "4xH100", "--batch", "8", "--seq", "64", "--alternatives",
        "0"]


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict:
    """A pp 2 x tp 2 plan of llama-tiny (pre, 4 blocks, post) and edited copies of it."""
    folder = tmp_path_factory.mktemp("export")
    path = folder / "pp2.json"
    from planner.cli import main

    assert main([*TINY, "--pp", "2", "--tp", "2", "--sp", "off", "--out", str(path)]) == 0
    base = Plan.load(path)
    stage0, stage1 = base.stages

    def split(first_last: int) -> Plan:  # stage 0 ends after layer `first_last`
        return replace(base, stages=(replace(stage0, layers=(0, first_last)),
                                     replace(stage1, layers=(first_last + 1, 5))))

    return {"path": path, "folder": folder, "base": base,
            "uneven": split(1),  # blocks [1, 3]
            "even": split(2),  # blocks [2, 2]
            "mixed_tp": replace(base, stages=(stage0, replace(stage1, tp=1))),
            "sp": replace(base, parallelism=replace(base.parallelism, sequence_parallel=True)),
            "dp2": replace(base, parallelism=replace(base.parallelism, dp=2),
                           cluster=replace(base.cluster, devices_per_node=8, num_devices=8))}


def _parse(line: str) -> tuple[dict[str, str], str, dict[str, str | None]]:
    """(environment, program, {option: value, or None for a flag}) of one command line."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    cut = next(i for i, w in enumerate(words) if w.startswith("--"))
    program, rest, options = " ".join(words[:cut]), words[cut:], {}
    while rest:
        option = rest.pop(0)
        options[option] = rest.pop(0) if rest and not rest[0].startswith("--") else None
    return env, program, options


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x and not x.startswith("#")]


def _checked(target: str, text: str, line: int | None = None) -> tuple[dict, dict]:
    """The env and options of the export's command (of its ``line``-th one when it has one
    per node), after asserting each is in the checked list."""
    lines = _lines(text)
    assert line is not None or len(lines) == 1, text
    env, program, options = _parse(lines[line or 0])
    flags = checked_flags()[target]
    assert program.replace(' "$MODEL"', "").replace(" $MODEL", "") == flags["command"]
    assert set(options) <= set(flags["options"]), set(options) - set(flags["options"])
    assert set(env) <= set(flags["env"]), set(env) - set(flags["env"])
    for entry in [*flags["options"].values(), *flags["env"].values()]:
        assert entry["path"] and entry["meaning"] and ("line" in entry or "commit" in entry)
    return env, options


def test_vllm_gets_the_plans_degrees_and_its_uneven_split(plans):
    env, options = _checked("vllm", export_plan(plans["uneven"], "vllm"))
    assert env == {"VLLM_PP_LAYER_PARTITION": "1,3"}
    assert options == {"--tensor-parallel-size": "2", "--pipeline-parallel-size": "2",
                       "--data-parallel-size": "1", "--dtype": "bfloat16",
                       "--max-model-len": "64"}
    # vLLM's own split of 4 blocks in 2 stages is [2, 2]: no variable needed
    env, _ = _checked("vllm", export_plan(plans["even"], "vllm"))
    assert env == {}
    env, options = _checked("vllm", export_plan(plans["sp"], "vllm"))
    assert json.loads(options["--compilation-config"]) == {
        "pass_config": {"enable_sequence_parallelism": True}}
    assert _checked("vllm", export_plan(plans["dp2"], "vllm"))[1]["--data-parallel-size"] == "2"


def test_vllm_on_several_nodes(plans):
    """Two replicas of tp 2 x pp 2 on 2 nodes of 4: vLLM's multi-node dp, one line per node;
    a replica larger than a node: the Ray executor."""
    base = plans["dp2"]
    two_nodes = replace(base, cluster=replace(base.cluster, nodes=2, devices_per_node=4,
                                              num_devices=8))
    text = export_plan(two_nodes, "vllm")
    assert len(_lines(text)) == 2
    common = {"--tensor-parallel-size": "2", "--pipeline-parallel-size": "2",
              "--data-parallel-size": "2", "--dtype": "bfloat16", "--max-model-len": "64",
              "--data-parallel-size-local": "1", "--data-parallel-address": "$HEAD",
              "--data-parallel-rpc-port": "$DP_RPC_PORT"}
    assert _checked("vllm", text, 0)[1] == common
    assert _checked("vllm", text, 1)[1] == {**common, "--data-parallel-start-rank": "1",
                                            "--headless": None}
    small = replace(base, cluster=replace(base.cluster, nodes=4, devices_per_node=2,
                                          num_devices=8))
    assert _checked("vllm", export_plan(small, "vllm"))[1]["--distributed-executor-backend"] \
        == "ray"


def test_sglang_gets_the_plans_degrees_and_its_uneven_split(plans):
    env, options = _checked("sglang", export_plan(plans["uneven"], "sglang"))
    assert env == {"SGLANG_PP_LAYER_PARTITION": "1,3"}
    assert options == {"--model-path": "$MODEL", "--tp-size": "2", "--pp-size": "2",
                       "--dp-size": "1", "--dtype": "bfloat16", "--context-length": "64"}
    assert _checked("sglang", export_plan(plans["even"], "sglang"))[0] == {}


def test_tensorrt_llm_runs_its_own_split_only(plans):
    env, options = _checked("tensorrt-llm", export_plan(plans["even"], "tensorrt-llm"))
    assert env == {} and options == {"--tp_size": "2", "--pp_size": "2", "--max_seq_len": "64"}
    text = export_plan(replace(plans["even"], parallelism=replace(
        plans["even"].parallelism, dp=2)), "tensorrt-llm")
    assert "# dp 2: start 2 such servers, each on tp x pp = 4 GPUs" in text
    with pytest.raises(ExportError) as err:
        export_plan(plans["uneven"], "tensorrt-llm", what="p.json")
    message = str(err.value)
    assert "the decoder layers per stage are [1, 3], and tensorrt-llm splits them [2, 2]" \
        in message
    assert message.endswith(
        "plan llama-tiny --cluster 4xH100-SXM-80GB --batch 8 --seq 64 --dtype bfloat16 "
        "--phase prefill --objective latency --target tensorrt-llm --out plan-tensorrt-llm.json")


@pytest.mark.parametrize("target", INFERENCE_TARGETS)
def test_a_plan_the_engine_cannot_express_says_what_differs(plans, target):
    with pytest.raises(ExportError) as err:
        export_plan(plans["mixed_tp"], target, what="p.json")
    message = str(err.value)
    assert f"{target} cannot run p.json as planned: the stages have tp 2/1, and {target} " \
           "runs one tp for every stage" in message
    assert f"--target {target} --out plan-{target}.json" in message
    arch = {**plans["base"].extra["arch"], "num_heads": 6}
    odd = replace(plans["base"], extra={**plans["base"].extra, "arch": arch})
    if target == "tensorrt-llm":
        return  # no head rule checked for it (planner/engines/flags.json)
    with pytest.raises(ExportError, match="tp 2 and the 2 KV heads|tp 2 does not divide"):
        export_plan(replace(odd, extra={**odd.extra, "arch": {**arch, "num_heads": 5}}),
                    target)


def test_sequence_parallelism_only_where_the_engine_has_it(plans):
    for target in ("sglang", "tensorrt-llm"):
        with pytest.raises(ExportError, match=f"sequence parallelism, which {target} has no"):
            export_plan(plans["sp"], target)


@pytest.mark.parametrize("target", TRAINING_TARGETS)
def test_training_targets_name_what_is_missing(plans, target, capsys):
    message = refused(["export", plans["path"], "--to", target], capsys)
    assert f"{target} trains models, and {plans['path']} is a prefill plan (inference)" \
        in message
    assert f"plan MODEL ... --phase train --target {target}" in message


def test_cli_export_prints_the_command_or_one_error(plans, capsys):
    code, out, _ = call(["export", plans["path"], "--to", "vllm"], capsys)
    assert code == 0 and out == export_plan(plans["base"], "vllm", what=str(plans["path"]))
    edited = plans["folder"] / "mixed.json"
    edited.write_text(json.dumps({**json.loads(plans["path"].read_text()), "stages": [
        {**s, "tp": 1, "devices": [[2]], "sharding": {"templates": [], "boundary": []}}
        if i == 1 else s for i, s in enumerate(json.loads(plans["path"].read_text())["stages"])
    ]}))
    message = refused(["export", edited, "--to", "sglang"], capsys)
    assert "the stages have tp 2/1" in message and "--target sglang" in message


def test_target_restricts_the_search_and_reports_the_unrestricted_gain(plans, capsys):
    """llama-tiny prefill on 4 H100s: the unrestricted optimum uses sequence parallelism,
    which sglang has none of; `--target sglang` finds the best plan without it, records
    both objectives, and exports."""
    out = plans["folder"] / "sglang.json"
    code, text, err = call([*TINY, "--target", "sglang", "--out", out], capsys)
    assert code == 0, err
    plan = Plan.load(out)
    record = plan.extra["target"]
    assert record["name"] == "sglang" and plan.solver.status == "OPTIMAL"
    assert plan.parallelism.sequence_parallel is False
    assert len({s.tp for s in plan.stages}) == 1
    assert record["restricted"]["objective"] == plan.solver.objective
    assert record["ratio"] == plan.solver.objective / record["unrestricted"]["objective"]
    assert record["ratio"] >= 1
    assert f"target sglang: this plan ({'dp'}" in " ".join(text.split())
    _checked("sglang", export_plan(plan, "sglang"))
