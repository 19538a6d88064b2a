"""The README's Python example and quoted command outputs are what the code prints today."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_prints_its_comments(tmp_path):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    expected = [m.group(1).strip() for m in re.finditer(r"print\(.*\)\s+# (.*)", code)]
    assert len(expected) >= 4
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example writes plan.json
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = out.getvalue().strip().splitlines()
    assert printed[: len(expected)] == expected
    assert (tmp_path / "plan.json").is_file()


def _readme_script():
    spec = importlib.util.spec_from_file_location("readme_script", ROOT / "scripts" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_readme_command_outputs_are_what_the_commands_print_today():
    """Every quoted command output in README.md is re-run; only run-to-run figures (solver
    wall time, measured step times) may differ. `make readme` rewrites them."""
    script = _readme_script()
    _, diffs = script.regenerate((ROOT / "README.md").read_text())
    assert not diffs, "README.md is stale; run `make readme`:\n" + "\n".join(diffs)
