"""The import order between the three packages (docs/architecture.md, "Layering").

- ``cost_models`` imports neither ``planner`` nor ``codegen``, anywhere in a file (under
  ``if TYPE_CHECKING:`` and inside functions too);
- ``planner`` imports ``codegen`` only lazily, inside ``planner/__init__.py``'s
  ``parallelize`` and inside the CLI functions that implement ``plan run``, ``plan
  compile`` and ``plan launch`` (see ``CLI_COMMANDS``);
- ``codegen`` may import both;
- the package graph of module-level imports has no cycle.

The files are read with ``ast``, never imported: the test needs no torch.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cost_models", "planner", "codegen")

# Which packages each package may import (anywhere in a file).
ALLOWED = {
    "cost_models": set(),
    "planner": {"cost_models"},  # + codegen, lazily, in LAZY_CODEGEN only
    "codegen": {"planner", "cost_models"},
}
# planner's lazy codegen imports: in these functions (or functions nested in them).
CLI_COMMANDS = {"run", "compile", "launch"}  # @_subcommand("...") in planner/cli.py
LAZY_CODEGEN = {
    "planner/__init__.py": {"parallelize"},
    # `plan run`'s refusal check before any rank starts (codegen.check.preflight); only
    # `_run` calls it.
    "planner/cli.py": {"_check_runnable_here"},
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, "/"-separated
    line: int
    module: str  # absolute dotted name
    functions: tuple[str, ...]  # enclosing function names, outermost first
    type_checking: bool = False  # under `if TYPE_CHECKING:`

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    @property
    def where(self) -> str:
        inside = f" (in {'.'.join(self.functions)})" if self.functions else " (module level)"
        if self.type_checking:
            inside += " under TYPE_CHECKING"
        return f"{self.file}:{self.line}: imports {self.module}{inside}"


def _source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, rel: str) -> str:
    """The absolute module of a ``from ... import`` in file ``rel``, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = _module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dynamic_import(node: ast.Call) -> str | None:
    """``importlib.import_module("x")`` or ``__import__("x")`` with a literal name."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def _imports_of(source: str, rel: str) -> list[Import]:
    """Every import in ``source`` (the file ``rel``), wherever it sits."""
    tree = ast.parse(source, filename=rel)
    out: list[Import] = []

    def visit(node: ast.AST, functions: tuple[str, ...], tc: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner, inner_tc = functions, tc
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = functions + (child.name,)
            elif isinstance(child, ast.If) and ast.unparse(child.test).split(".")[-1] == "TYPE_CHECKING":
                for stmt in child.body:  # the else branch runs: visit it as usual
                    visit(ast.Module(body=[stmt], type_ignores=[]), functions, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), functions, tc)
                continue
            elif isinstance(child, ast.Import):
                out.extend(Import(rel, child.lineno, a.name, functions, tc) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child, rel)
                out.append(Import(rel, child.lineno, module, functions, tc))
                if child.module is None:  # `from . import x`: x may be a package or module
                    out.extend(Import(rel, child.lineno, f"{module}.{a.name}".lstrip("."),
                                      functions, tc) for a in child.names)  # fmt: skip
            elif isinstance(child, ast.Call) and (name := _dynamic_import(child)):
                out.append(Import(rel, child.lineno, name, functions, tc))
            visit(child, inner, inner_tc)

    visit(tree, (), False)
    return out


def _imports(path: Path) -> list[Import]:
    return _imports_of(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def _cli_command_functions() -> set[str]:
    """Names of the planner/cli.py functions decorated ``@_subcommand(<run|compile|launch>)``."""
    tree = ast.parse((ROOT / "planner" / "cli.py").read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name)
                    and dec.func.id == "_subcommand" and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                    and dec.args[0].value in CLI_COMMANDS):  # fmt: skip
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return [imp for path in _source_files() for imp in _imports(path)]


def _lazy_allowed() -> dict[str, set[str]]:
    allowed = {f: set(names) for f, names in LAZY_CODEGEN.items()}
    allowed["planner/cli.py"] |= _cli_command_functions()
    return allowed


def _violations(imports: list[Import]) -> list[str]:
    lazy = _lazy_allowed()
    bad = []
    for imp in imports:
        here = imp.file.split("/")[0]
        there = imp.package
        if there not in PACKAGES or there == here or there in ALLOWED[here]:
            continue
        if here == "planner" and there == "codegen" and set(imp.functions) & lazy.get(imp.file, set()):
            continue
        bad.append(imp.where)
    return bad


def test_packages_import_in_order(imports):
    bad = _violations(imports)
    assert not bad, (
        "imports against the layering (cost_models imports neither planner nor codegen, "
        "not even under TYPE_CHECKING; planner imports codegen only inside "
        f"{sorted((f, sorted(n)) for f, n in _lazy_allowed().items())}):\n  " + "\n  ".join(bad)
    )


def test_no_package_cycle_at_module_level(imports):
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    evidence: dict[tuple[str, str], str] = {}
    for imp in imports:
        here, there = imp.file.split("/")[0], imp.package
        if imp.functions or there not in PACKAGES or there == here:
            continue
        graph[here].add(there)
        evidence.setdefault((here, there), imp.where)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    for pkg in PACKAGES:
        cycle = cycle_from(pkg)
        assert cycle is None, "module-level import cycle " + " -> ".join(cycle) + ":\n  " + "\n  ".join(
            evidence[(a, b)] for a, b in zip(cycle, cycle[1:])
        )


def test_the_allowed_lazy_imports_exist():
    """The exceptions name real functions: a rename in planner/cli.py or planner/__init__.py
    must update this test rather than silently widen or narrow it."""
    commands = _cli_command_functions()
    assert {"_run", "_compile"} <= commands, commands
    for file, names in LAZY_CODEGEN.items():
        tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert names <= defined, f"{file}: no function {sorted(names - defined)}"


def test_the_checker_catches_what_it_should():
    """The walk sees imports under TYPE_CHECKING, in functions, relative and dynamic ones."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from planner.layers import Layer\n"
        "def f():\n    import codegen.emit\n"
        "from .. import planner\n"
        "import importlib\nimportlib.import_module('codegen.runtime')\n"
        "from .types import LayerLike\n"
    )
    imports = _imports_of(src, "cost_models/_probe.py")
    assert "cost_models.types" in {i.module for i in imports}
    assert [i.line for i in imports if i.type_checking] == [3]
    bad = _violations(imports)
    assert [b.split(":")[1] for b in bad] == ["3", "5", "6", "8"], bad
    planner_init = _imports_of(
        "def parallelize():\n    from codegen.runtime import parallelize\n"
        "def other():\n    from codegen import runtime\n"
        "from codegen.emit import compile_plan\n",
        "planner/__init__.py",
    )
    assert [b.split(":")[1] for b in _violations(planner_init)] == ["4", "5"]
