"""Command-line arguments, --out, factories and subcommands: one error path everywhere."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests.bad_input.cli_helpers import assert_one_error, call, refused, run

TINY = ["gpt-tiny", "--cluster", "2xcpu", "--batch", "2", "--seq", "16", "--alternatives", "0"]


@pytest.mark.parametrize("argv, expected", [
    (["gpt-tiny", "--alternatives", "-3"], "argument --alternatives: must be >= 0, got -3"),
    (["gpt-tiny", "--alternatives", "many"], "argument --alternatives: expected a whole number"),
    (["gpt-tiny", "--time-limit", "0"], "argument --time-limit: must be a number > 0"),
    (["gpt-tiny", "--time-limit", "nan"], "argument --time-limit: must be a number > 0"),
    (["gpt-tiny", "--batch", "0"], "batch size must be >= 1 (got 0)"),
    (["gpt-tiny", "--batch", "-2"], "batch size must be >= 1 (got -2)"),
    (["mlp", "--batch", "1000000000000"], "batch size 1000000000000 is more than the planner plans for (--batch 1048576 at most)"),
    (["gpt-tiny", "--seq", "0"], "sequence length must be >= 1 (got 0)"),
    (["gpt-tiny", "--seq", "-5"], "sequence length must be >= 1"),
    (["gpt-tiny", "--phase", "decode", "--context", "0"], "context length must be >= 1"),
    (["gpt-tiny", "--headroom", "1.5"], "memory headroom (--headroom) must be in [0, 1)"),
    (["gpt-tiny", "--headroom", "nan"], "memory headroom (--headroom) must be in [0, 1)"),
    (["gpt-tiny", "--dtype", "bogus"], "dtype \"bogus\" is not one of float32, bfloat16, float16"),
    (["gpt-tiny", "--phase", "pretrain"], "argument --phase: invalid choice"),
    (["gpt-tiny", "--cluster", "2xcpu", "--tp", "0"], "argument --tp: must be >= 1, got 0"),
    (["gpt-tiny", "--cluster", "2xcpu", "--pp", "-1"], "argument --pp: must be >= 1, got -1"),
    (["gpt-tiny", "--cluster", "2xcpu", "--dp", "two"], "argument --dp: expected a whole number"),
    (["gpt-tiny", "--cluster", "2xcpu", "--microbatches", "0"], "argument --microbatches: must be >= 1"),
    (["gpt-tiny", "--bogus"], "unrecognized arguments: --bogus"),
    (["shwo", "plan.json"], "Did you mean `plan show`?"),
    ([""], "MODEL must be a preset name"),
    (["lama-3-70b"], "Did you mean llama-3-70b"),
])
def test_bad_arguments(capsys, argv, expected):
    refused(argv, capsys, expected)


@pytest.mark.parametrize("argv, expected", [
    (["llama-tiny", "--seq", "100000", "--layers-only"],
     "llama-tiny has 256 positions (max_position_embeddings); --seq 100000 is too long. Use "
     "--seq 256 or less, or raise the limit with --set max_position_embeddings=100000"),
    (["llama-tiny", "--phase", "decode", "--seq", "16", "--context", "100000"],
     "--context 100000 is too long. Use --context 256 or less, or raise the limit with "
     "--set max_position_embeddings=100000"),
    (["hf:llama", "--set", "max_position_embeddings=256", "--set", "num_hidden_layers=2",
      "--seq", "100000", "--layers-only"], "--set max_position_embeddings=100000"),
    (["gpt2-tiny", "--seq", "200", "--layers-only"],
     "gpt2-tiny has 128 positions (n_positions); --seq 200 is too long. Use --seq 128 or less"),
    (["gpt-tiny", "--seq", "1000", "--layers-only"],
     "gpt-tiny has 128 positions (block_size); --seq 1000 is too long"),
])
def test_sequence_beyond_the_position_limit(capsys, argv, expected):
    refused(argv, capsys, expected)


def test_raising_the_position_limit_with_set_is_accepted(capsys):
    code, out, err = call(["llama-tiny", "--seq", "300", "--set", "max_position_embeddings=300",
                           "--layers-only", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["model"]["input_shapes"] == [[1, 300]]


# ----------------------------------------------------------------------------- --out


def test_out_empty(tmp_path, capsys):
    refused([*TINY, "--out", ""], capsys, "--out is empty")


def test_out_is_a_directory(tmp_path, capsys):
    refused([*TINY, "--out", tmp_path], capsys, "is a directory", out_file=tmp_path / "x")
    refused([*TINY, "--out", f"{tmp_path}/new/"], capsys, "is a directory",
            out_file=tmp_path / "x")
    assert not (tmp_path / "new").exists()


def test_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    refused([*TINY, "--out", blocker / "plan.json"], capsys, "is not a directory",
            out_file=blocker)
    refused([*TINY, "--out", blocker / "deeper" / "plan.json"], capsys, "is not a directory",
            out_file=blocker)


def test_out_in_an_unwritable_place(capsys):
    # root ignores file modes, so use a place nobody can create files in
    refused([*TINY, "--out", "/proc/fx-planner-test/plan.json"], capsys, "cannot write --out")
    refused([*TINY, "--out", "/proc/plan.json"], capsys, "cannot write --out")
    assert not Path("/proc/plan.json").exists()


def test_out_is_a_special_file(capsys):
    refused([*TINY, "--out", "/dev/null"], capsys, "is not a regular file")


def test_out_existing_file_that_is_not_a_plan_needs_force(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    refused([*TINY, "--out", notes], capsys, "exists and is not a plan file; pass --force",
            out_file=notes)
    assert notes.read_text() == '{"mine": true}'
    code, _, err = call([*TINY, "--out", notes, "--force"], capsys)
    assert code == 0, err
    assert json.loads(notes.read_text())["schema"] == "fx-planner/plan/v2"
    # an existing plan is overwritten without --force
    code, out, err = call([*TINY[:-1], "1", "--out", notes], capsys)
    assert code == 0, err
    assert "replacing the plan that was there" in " ".join(out.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # no temp files


def test_out_with_layers_only(tmp_path, capsys):
    refused(["mlp", "--layers-only", "--out", tmp_path / "p.json"], capsys,
            "--out writes a plan and --layers-only stops before planning",
            out_file=tmp_path / "p.json")


def test_out_creates_missing_folders(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "plan.json"
    code, stdout, err = call([*TINY, "--out", out], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["schema"] == "fx-planner/plan/v2"
    assert f"plan written to {out}" in " ".join(stdout.split())
    assert [p.name for p in out.parent.iterdir()] == ["plan.json"]


def test_a_failed_plan_leaves_no_file(tmp_path, capsys):
    cluster = tmp_path / "small.json"
    cluster.write_text(json.dumps({"nodes": 1, "devices_per_node": 2, "device": "cpu",
                                   "memory_bytes": 1000}))
    out = tmp_path / "out" / "plan.json"
    refused(["gpt-tiny", "--cluster", cluster, "--batch", "2", "--seq", "16", "--out", out],
            capsys, "no plan fits", out_file=out)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_save_is_atomic_when_writing_fails(tmp_path, capsys, monkeypatch):
    plan_module = sys.modules["planner.plan"]  # `planner.plan` is also the API function

    out = tmp_path / "plan.json"
    out.write_text('{"schema": "fx-planner/plan/v1", "old": true}')
    real_dumps = json.dumps

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_module.os, "fsync", failing_fsync)
    refused([*TINY, "--out", out], capsys, "No space left on device")
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"schema": "fx-planner/plan/v1", "old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert real_dumps is json.dumps


# ----------------------------------------------------------------------------- factories


FACTORIES = textwrap.dedent("""
    import sys
    import torch
    from planner.models import MLP, MLPConfig
    def exits():
        sys.exit(3)
    def exits_quietly():
        sys.exit()
    def returns_junk():
        return 42
    def broken():
        raise RuntimeError("weights missing")
""")


@pytest.mark.parametrize("factory, expected", [
    ("exits", "factory {path}:exits called sys.exit(3) instead of returning a model"),
    ("exits_quietly", "called sys.exit(None)"),
    ("returns_junk", "returned int; return an nn.Module"),
    ("broken", "raised RuntimeError: weights missing"),
    ("missing", "has no callable 'missing'"),
])
def test_bad_factory(tmp_path, capsys, factory, expected):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    refused([f"{path}:{factory}", "--layers-only"], capsys, expected.format(path=path))


def test_factory_module_that_exits_on_import(tmp_path, capsys):
    path = tmp_path / "script.py"
    path.write_text("import sys\nsys.exit(3)\ndef make():\n    pass\n")
    refused([f"{path}:make", "--layers-only"], capsys, "called sys.exit(3)",
            "must not exit when imported")


def test_factory_file_missing(tmp_path, capsys):
    refused([f"{tmp_path}/nope.py:make"], capsys, "does not exist")


# ----------------------------------------------------------------------------- subcommands


@pytest.mark.parametrize("argv, expected", [
    (["calibrate", "--cluster", "2xcpu", "--reps", "0"], "argument --reps: must be >= 1"),
    (["calibrate", "--cluster", "2xcpu", "--repeats", "x"], "argument --repeats: expected a whole number"),
    (["calibrate", "--cluster", "x.json"], "does not exist"),
    (["profile", "mlp", "--batch", "0"], "batch size must be >= 1"),
    (["profile", "mlp", "--dtype", "bogus"], "dtype \"bogus\" is not one of"),
    (["profile", "mlp", "--min-time", "-1"], "--min-time must be >= 0 seconds, got -1"),
    (["profile", "mlp", "--min-time", "nan"], "--min-time must be >= 0 seconds, got nan"),
    (["profile", "llama-tiny", "--seq", "100000"], "--seq 100000 is too long"),
    (["bench", "--suite", "/nonexistent/suite"], "is not a directory"),
    (["show"], "the following arguments are required: plan_file"),
    (["compile", "plan.json"], "the following arguments are required: --out"),
])
def test_bad_subcommand_arguments(capsys, argv, expected):
    refused(argv, capsys, expected)


def test_bench_with_a_broken_suite(tmp_path, capsys):
    (tmp_path / "cases.json").write_text('{"cases": [{"name": 1}]}')
    refused(["bench", "--suite", tmp_path], capsys, "is not a valid suite")
    (tmp_path / "cases.json").write_text("{not json")
    refused(["bench", "--suite", tmp_path], capsys, "is not a valid suite")


# ----------------------------------------------------------------------------- --help


SUBCOMMANDS = ["", "show", "explain", "run", "compile", "profile", "calibrate", "bench", "devices"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_shows_every_default(capsys, monkeypatch, sub):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    code, out, _ = call([sub, "--help"] if sub else ["--help"], capsys)
    assert code == 0
    options = []  # one entry per option: its line and the help lines that follow it
    for line in out.split("options:", 1)[1].splitlines():
        if re.match(r"^\s{1,4}-", line):
            options.append(line)
        elif options and line.startswith(" " * 5):
            options[-1] += " " + line.strip()
    assert options
    for line in options:
        if line.strip().startswith("-h, --help"):
            continue
        assert "default" in line, f"plan {sub}: no default shown in {line.strip()!r}"
    if sub == "":
        assert "(default: 8xH100)" in out


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("argv, expected", [  # a few: each starts python, torch, transformers
    (["hf:llama", "--set", "num_hidden_layers={bad", "--layers-only"], "num_hidden_layers"),
    (["{tmp}/f.py:exits"], "called sys.exit(3)"),
])
def test_end_to_end_exit_2_and_no_traceback(tmp_path, argv, expected):
    (tmp_path / "f.py").write_text("import sys\ndef exits():\n    sys.exit(3)\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = run(argv)
    assert_one_error(r.returncode, r.stdout, r.stderr, expected)
    assert r.stdout == ""
