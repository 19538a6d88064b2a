"""Hypothesis mutates valid cluster JSON and plan files (drops keys, wrong types, negative
and zero numbers, junk strings, nested junk); the CLI either accepts the file (exit 0) or
refuses it with one `error:` paragraph (exit 2), and never escapes with a traceback."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cli import main

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

JUNK_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 7, -10**9, 10**9, 2**63, 0.0, -0.5, 0.5, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["", "bogus", "1", "2", "float32", "decode", "OPTIMAL", "cpu", "H1000", "²"]),
)
JUNK = st.recursive(JUNK_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


def _paths(node, prefix=()):
    """Every path to a value inside a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, valid):
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "drop", "add", "negate", "zero", "whole"]))
        if not path or op == "whole":
            if op == "whole" or not path:
                doc = draw(JUNK) if draw(st.booleans()) else doc
            continue
        *head, last = path
        parent = doc
        for k in head:
            parent = parent[k]
        value = parent[last]
        if op == "drop":
            del parent[last]
        elif op == "add" and isinstance(value, dict):
            value[draw(st.text(max_size=5))] = draw(JUNK)
        elif op == "negate" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[last] = -value if value else -1
        elif op == "zero":
            parent[last] = 0
        else:
            parent[last] = draw(JUNK)
    return doc


def _check(argv: list[str], capsys) -> int:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code in (0, 2), f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in out + err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
    return code


def _write(folder: Path, doc) -> Path:
    path = folder / "file.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    return path


VALID_CLUSTER = {"nodes": 1, "devices_per_node": 2, "device": "cpu", "memory_bytes": 8 * 10**9,
                 "intra_node_bandwidth": 1e10, "intra_node_latency": 1e-5,
                 "inter_node_bandwidth": 1e9, "inter_node_latency": 1e-4}


@SETTINGS
@given(doc=mutated(VALID_CLUSTER))
def test_mutated_cluster_files_never_crash(capsys, doc):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), doc)
        # a file that passes validation is planned for real (the cost model and the solver
        # see its figures); one that does not is refused right after it is read
        _check(["mlp", "--cluster", str(path), "--batch", "2", "--alternatives", "0",
                "--time-limit", "20"], capsys)


@pytest.fixture(scope="module")
def valid_plan(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["gpt-tiny", "--cluster", "2x2xcpu", "--batch", "4", "--seq", "16", "--pp", "2",
                 "--alternatives", "2", "--out", str(path), "--json"]) == 0
    return json.loads(path.read_text())


@SETTINGS
@given(data=st.data())
def test_mutated_plan_files_never_crash(capsys, valid_plan, data):
    doc = data.draw(mutated(valid_plan))
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), doc)
        code = _check(["show", str(path)], capsys)
        assert _check(["explain", str(path)], capsys) == code
        if code == 0:  # accepted: then it is a plan whose figures can be shown
            assert _check(["show", str(path), "--json"], capsys) == 0
            assert all(math.isfinite(v) for v in (doc["predicted"]["latency_s"],))
