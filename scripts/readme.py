"""Regenerate or check the command outputs quoted in README.md.

Usage::

    .venv/bin/python scripts/readme.py --write    # run the commands, rewrite README.md (make readme)
    .venv/bin/python scripts/readme.py --check    # run them, exit 1 and print a diff if stale

Every quoted output in README.md sits in a fenced block right after a marker line
``<!-- readme-output: NAME -->``; ``BLOCKS`` below says which commands make block NAME.
The commands run in order in one scratch folder (so ``plan explain plan70b.json`` reads the
plan the demo block wrote), with ``plan`` being this interpreter's own ``plan`` script and a
terminal 120 columns wide. Figures that change from run to run (solver wall time, measured
step times) are masked when checking, not when writing.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_MARKER = re.compile(r"(<!-- readme-output: (?P<name>[\w-]+) -->\n```\n)(?P<body>.*?)(```)", re.S)
_FLOAT = r"\d+\.\d+(?:e[-+]?\d+)?"


@dataclass(frozen=True)
class Block:
    """One quoted output.

    Attributes:
        name: the marker's NAME.
        commands: ``plan ...`` command lines, run in order.
        shown: how many of the last commands are quoted (earlier ones only prepare files).
        prompt: quote each command as ``$ command`` followed by what it printed to stderr
            and stdout (error examples); otherwise quote the stdout of the shown commands.
        exit_code: the exit code every shown command must end with.
        volatile: regexes of figures that differ between runs, masked when checking.
    """

    name: str
    commands: tuple[str, ...]
    shown: int = 1
    prompt: bool = False
    exit_code: int = 0
    volatile: tuple[str, ...] = field(default=())


BLOCKS = (
    Block("demo", ("plan llama-3-70b --cluster 2x8xH100 --batch 8 --seq 2048 --out plan70b.json",),
          volatile=(rf"(?<=gap \d\.\d\d%, ){_FLOAT} s",)),
    Block("explain", ("plan explain plan70b.json",)),
    Block("export", ("plan export plan70b.json --to vllm",)),
    Block("run-check", ("plan llama-tiny --cluster 4xcpu --batch 4 --seq 32 --tp 2 --out plan.json",
                        "plan run plan.json --check"),
          volatile=(_FLOAT,)),
    Block("generate", ("plan llama-tiny --cluster 2xcpu --phase decode --batch 4 --seq 16 "
                       "--context 48 --pp 2 --microbatches 2 --alternatives 0 --out decode.json",
                       "plan run decode.json --check"),
          volatile=(_FLOAT,)),
    Block("errors", ("plan lama-3-70b",
                     "plan llama-3-70b --cluster 8xH100 --tp 16",
                     "plan llama-3-8b --cluster 1xH100 --phase decode --batch 64 --context 8192"),
          shown=3, prompt=True, exit_code=2),
)


def _plan_executable() -> str:
    script = Path(sys.executable).parent / "plan"
    if not script.exists():
        raise SystemExit(f"error: {script} does not exist: run `make setup` first")
    return str(script)


def render(block: Block, workdir: Path) -> str:
    """Run ``block``'s commands in ``workdir`` and return the text to quote."""
    env = dict(os.environ, COLUMNS="120", TERM="dumb", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    quoted = []
    for i, command in enumerate(block.commands):
        argv = shlex.split(command)
        argv[0] = _plan_executable()
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=900)
        shown = i >= len(block.commands) - block.shown
        expected = block.exit_code if shown else 0
        if done.returncode != expected:
            raise SystemExit(f"error: README block {block.name!r}: `{command}` exited "
                             f"{done.returncode}, expected {expected}:\n{done.stderr[-3000:]}")
        if not shown:
            continue
        if block.prompt:
            quoted.append(f"$ {command}\n{done.stderr}{done.stdout}")
        else:
            quoted.append(done.stdout)
    return "".join(text if text.endswith("\n") else text + "\n" for text in quoted)


def _mask(text: str, block: Block) -> str:
    for pattern in block.volatile:
        text = re.sub(pattern, "<varies>", text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def regenerate(readme: str, only: set[str] | None = None) -> tuple[str, list[str]]:
    """README text with the named blocks (all by default) re-rendered, and the diffs of the
    stale ones (volatile figures masked)."""
    by_name = {b.name: b for b in BLOCKS}
    found = [m.group("name") for m in _MARKER.finditer(readme)]
    unknown = sorted(set(found) - set(by_name))
    missing = sorted(set(by_name) - set(found))
    if unknown or missing:
        raise SystemExit(f"error: README markers and scripts/readme.py BLOCKS differ: unknown "
                         f"{unknown}, missing {missing}")
    rendered: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fx-planner-readme-") as tmp:
        for block in BLOCKS:  # in order: later blocks read files the earlier ones wrote
            if only is None or block.name in only or _feeds(block, only):
                rendered[block.name] = render(block, Path(tmp))
    diffs = []

    def substitute(m: re.Match) -> str:
        name, old = m.group("name"), m.group("body")
        if name not in rendered or (only is not None and name not in only):
            return m.group(0)
        new = rendered[name]
        if _mask(old, by_name[name]) != _mask(new, by_name[name]):
            diffs.append("\n".join(difflib.unified_diff(
                old.splitlines(), new.splitlines(), f"README.md ({name})", f"now ({name})",
                lineterm="")))
        return m.group(1) + new + m.group(4)

    return _MARKER.sub(substitute, readme), diffs


def _feeds(block: Block, only: set[str]) -> bool:
    """Whether a later selected block reads a file that ``block`` writes (explain needs demo)."""
    outs = {w for c in block.commands for w in re.findall(r"--out (\S+)", c)}
    return any(o in c for b in BLOCKS if b.name in only for c in b.commands for o in outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help=f"only these blocks ({', '.join(b.name for b in BLOCKS)})")
    args = p.parse_args(argv)
    only = set(args.only) if args.only else None
    text, diffs = regenerate(README.read_text(), only)
    if args.write:
        README.write_text(text)
        print(f"README.md: {len(diffs)} block(s) changed")
        return 0
    for diff in diffs:
        print(diff)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
