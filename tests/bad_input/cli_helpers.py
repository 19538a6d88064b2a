"""Helpers for the bad-input tests: run `plan` in-process (or as a subprocess) and assert
the one error path: exit 2, one `error: ...` paragraph on stderr, no traceback, and no
output file left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from planner.cli import main

PLAN = [sys.executable, "-m", "planner.cli"]

#: A small HF Llama: traces in a second on meta.
HF_LLAMA = ["hf:llama", "--set", "num_hidden_layers=2", "--set", "hidden_size=64",
            "--set", "intermediate_size=128", "--set", "num_attention_heads=4",
            "--set", "num_key_value_heads=2", "--set", "vocab_size=256"]


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """``plan ARGV`` in this process: (exit code, stdout, stderr). An exception other than
    SystemExit propagates, so an escaped traceback fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse (usage errors, --help)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run(argv: list[str], cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``plan ARGV`` as a subprocess (end to end: exit status, tracebacks, stray output)."""
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([*PLAN, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_one_error(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, stderr one paragraph starting with ``error:``, each of ``expected`` in it."""
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    message = " ".join(lines[-1].split())
    for text in expected:
        assert " ".join(text.split()) in message, f"{text!r} not in {message!r}"
    return message


def refused(argv: list[str], capsys, *expected: str, out_file: str | Path | None = None) -> str:
    """Run in-process and assert the one error path; with ``out_file``, that no file (nor a
    temporary file next to it) was written."""
    before = _listing(out_file)
    code, out, err = call(argv, capsys)
    # in-process there is nothing else on stderr: the whole of it is the one paragraph
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    message = assert_one_error(code, out, err, *expected)
    if out_file is not None:
        assert _listing(out_file) == before, f"{out_file}: files changed after a refusal"
    return message


def _listing(out_file) -> dict | None:
    """The files of ``out_file``'s folder with their contents (to prove nothing changed)."""
    if out_file is None:
        return None
    folder = Path(out_file).parent
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
