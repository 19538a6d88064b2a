"""Sharding coverage sweep: tiny transformers decoder-only models × tp/pp pins, run and checked.

For every model type in ``planner.models.coverage.COVERAGE_MODELS`` (hidden 64, 4 layers)
and every configuration in ``CONFIGS`` (``tp 2 × dp 2``, ``pp 2 × dp 2``, ``tp 2 × pp 2``
on ``4xcpu``, batch 2, sequence 8, float32), this script plans the model with those pins
(``planner.api.plan_traced``), runs every plan with 4 gloo ranks under one torchrun job per
batch of cases (``codegen.check --cases``), and checks on every rank:

- the outputs equal the unsharded model's within 1e-4 (last stage);
- the collectives inserted in the stage's graph equal the plan's record, kind and bytes;
- the rank's parameter bytes equal the plan's memory model (the sum of its layers'
  parameter bytes at that tp, with a tied table the stage borrows from another stage);
- every parameter the recorded strategy shards is sliced on the rank, and no other.

It prints one row per (model, configuration) and, with ``--write``, puts the table into
docs/codegen.md between the ``coverage-table`` markers. ``tests/codegen/test_coverage.py``
runs ``SUBSET`` with the same checks in ``make test``.

    .venv/bin/python benchmarks/coverage.py                 # every type, ~30 min here
    .venv/bin/python benchmarks/coverage.py --types llama phi3 --write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "tp2": {"tp": 2, "pp": 1, "dp": 2},
    "pp2": {"tp": 1, "pp": 2, "dp": 2},
    "tp2pp2": {"tp": 2, "pp": 2, "dp": 1},
}
BATCH, SEQ, NPROC, TOL = 2, 8, 4, 1e-4
DOC = ROOT / "docs" / "codegen.md"
MARK_BEGIN, MARK_END = "<!-- coverage-table:begin -->", "<!-- coverage-table:end -->"


def make_cases(types, configs):
    """Plan every (type, config); returns (cases to run, rows of failures to plan)."""
    import planner
    from planner.api import plan_traced
    from planner.models import load_model
    from planner.models.coverage import COVERAGE_MODELS

    cases, failed = [], []
    for mt in types:
        overrides = COVERAGE_MODELS[mt]
        try:
            lm = load_model("hf:" + mt, overrides, batch_size=BATCH, seq_len=SEQ)
            traced = planner.trace(lm.model, lm.args, lm.kwargs)
        except Exception as exc:  # noqa: BLE001 - reported as a row
            failed += [{"type": mt, "config": c, "status": f"trace: {exc}"[:160]} for c in configs]
            continue
        for c in configs:
            try:
                plan = plan_traced(traced, planner.Cluster.parse("4xcpu"),
                                   planner.Workload(batch_size=BATCH, seq_len=SEQ,
                                                    dtype="float32"),
                                   pins=CONFIGS[c], sequence_parallel=False)
            except Exception as exc:  # noqa: BLE001
                failed.append({"type": mt, "config": c, "status": f"plan: {exc}"[:160]})
                continue
            cases.append({"type": mt, "config": c, "model": "hf:" + mt,
                          "overrides": overrides, "plan": plan.to_dict(), "_plan": plan,
                          "_traced": traced})
    return cases, failed


def check(case, ranks) -> dict:
    """The checks of the module docstring for one case; a row of the table."""
    from planner.sharding import same_params

    plan, traced = case["_plan"], case["_traced"]
    gm = traced.graph_module
    errs = [r["max_abs_err"] for r in ranks if r["max_abs_err"] is not None]
    problems = []
    table = plan.cost_table()  # per layer, with a tied table a stage borrows (Borrow)
    worst = max(errs) if errs else float("nan")
    if not errs or worst > TOL:
        problems.append(f"max abs err {worst:.2e}")
    for r in ranks:
        stage = plan.stages[r["stage"]]
        first, last = stage.layers
        want = sorted(list(x) for x in (stage.sharding.collectives() if stage.sharding else []))
        if r["inserted"] != want:
            problems.append(f"rank {r['rank']} collectives {r['inserted']} != plan {want}")
        predicted = sum(table.layer_memory_bytes(j, first, stage.tp)
                        for j in range(first, last + 1))
        if r["param_bytes"] != predicted:
            problems.append(f"rank {r['rank']} holds {r['param_bytes']} parameter bytes, the "
                            f"plan's memory model {predicted}")
        strategy = stage.sharding.strategy([lay.name for lay in traced.layers],
                                           [lay.kind for lay in traced.layers]) \
            if stage.sharding else {}
        def canonical(names):  # a tied table has two names for one tensor
            return {min(same_params(gm, [n])) for n in names}

        if canonical(r["sharded"]) != canonical(strategy):
            problems.append(f"rank {r['rank']} sliced {sorted(r['sharded'])}, the strategy "
                            f"shards {sorted(strategy)}")
    block = next((t for s in plan.stages if s.sharding for t in s.sharding.templates
                  if any(traced.layers[j].kind == "block" for j in t.layers)), None)
    per_block = "-"
    if block is not None:
        kinds = {}
        for c in block.collectives:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        per_block = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    return {"type": case["type"], "config": case["config"],
            "status": "pass" if not problems else "FAIL: " + "; ".join(problems)[:300],
            "max_abs_err": worst, "block_collectives": per_block,
            "strategy": block.candidate if block is not None else "-",
            "sharded_params": len(block.params) if block is not None else 0}


def run(cases, workdir: Path, chunk: int) -> list[dict]:
    from tests.codegen.plans import run_cases

    rows = []
    for i in range(0, len(cases), chunk):
        part = cases[i:i + chunk]
        try:
            results = run_cases(part, NPROC, workdir / f"job{i}", timeout_s=1800)
        except (AssertionError, Exception) as exc:  # noqa: BLE001 - find the failing case
            if len(part) == 1:
                rows.append({"type": part[0]["type"], "config": part[0]["config"],
                             "status": "FAIL: " + _last_error(str(exc)), "max_abs_err": None,
                             "block_collectives": "-", "strategy": "-", "sharded_params": 0})
                continue
            rows += run(part, workdir / f"retry{i}", 1)
            continue
        for k, case in enumerate(part):
            rows.append(check(case, [results[r][k] for r in range(NPROC)]))
    return rows


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else text[-200:]).strip()[:200]


def table(rows) -> str:
    from planner.models.coverage import FEATURES

    out = ["| model type | layout feature | config | block strategy | sharded params "
           "per block | collectives per block | max abs err | result |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['max_abs_err']:.1e}" if isinstance(r.get("max_abs_err"), float) else "-"
        out.append(f"| {r['type']} | {FEATURES.get(r['type'], '')} | {r['config']} | "
                   f"{r.get('strategy', '-')} | {r.get('sharded_params', 0)} | "
                   f"{r.get('block_collectives', '-')} | {err} | {r['status']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from planner.models.coverage import COVERAGE_MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="*", default=list(COVERAGE_MODELS))
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--chunk", type=int, default=12, help="cases per torchrun job")
    p.add_argument("--write", action="store_true", help="write the table into docs/codegen.md")
    p.add_argument("--json", help="also write the rows as JSON here")
    a = p.parse_args(argv)
    start = time.perf_counter()
    cases, failed = make_cases(a.types, a.configs)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(cases, Path(tmp), a.chunk) + failed
    order = {t: i for i, t in enumerate(a.types)}
    rows.sort(key=lambda r: (order[r["type"]], list(CONFIGS).index(r["config"])))
    text = table(rows)
    passed = sum(r["status"] == "pass" for r in rows)
    summary = (f"{passed}/{len(rows)} cases pass ({len(a.types)} model types x "
               f"{len(a.configs)} configurations), {time.perf_counter() - start:.0f} s")
    print(text)
    print(summary)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    if a.write:
        doc = DOC.read_text()
        cmd = "`.venv/bin/python benchmarks/coverage.py --write`"
        block = f"{MARK_BEGIN}\n{text}\n\n{summary}; written by {cmd}.\n{MARK_END}"
        if MARK_BEGIN in doc:
            head, rest = doc.split(MARK_BEGIN, 1)
            doc = head + block + rest.split(MARK_END, 1)[1]
        else:
            doc = doc.rstrip() + "\n\n## Sharding coverage\n\n" + block + "\n"
        DOC.write_text(doc)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
