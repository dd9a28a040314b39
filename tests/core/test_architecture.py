"""The layout's rules, checked on the source: no import cycles (an import inside a function counts, so none can
hide one), `flows` on top of the torch-free core only, and `flows` importable without the training stack."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"stages": "rlhf_pipeline.stages", "flows": "rlhf_pipeline.flows"}
# What the `train` extra installs and the orchestrator image (the `flows` extra) has not.
TRAINING_STACK = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "gguf",
    "vaderSentiment",
)


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))
            found[name] = path
    return found


def type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: dict[str, Path], module_level_only: bool = False) -> set[str]:
    """The package's modules that the file imports, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if type_checking_only(node) or (module_level_only and in_function):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found.update(name for name in names if name in known)
        nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def test_the_packages_import_no_module_in_a_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, str] = {}
    circles = []

    def walk(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                circles.append(trail[trail.index(imported) :] + [imported] if imported in trail else [name, imported])
            elif imported not in state:
                walk(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert circles == []


def test_flows_imports_only_the_torch_free_core_of_stages_at_module_level():
    known = modules()
    for name, path in known.items():
        if name.startswith(FOLDERS["flows"]):
            stages = {m for m in imports(path, known, module_level_only=True) if m.startswith(FOLDERS["stages"])}
            assert all(m.startswith(f"{FOLDERS['stages']}.core") for m in stages), (name, stages)


def run_without_the_training_stack(code: str) -> None:
    """Python code run in a process where importing the training stack fails, as in the orchestrator image."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Blocked(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {TRAINING_STACK!r}: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )
    subprocess.run([sys.executable, "-c", blocker + code], check=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("package", ["rlhf_pipeline.flows", "rlhf_pipeline.stages.core"])
def test_imports_without_the_training_stack(package):
    names = [name for name in modules() if name.startswith(package)]
    run_without_the_training_stack(f"for name in {names!r}: __import__(name)\n")


def test_the_training_stack_is_what_the_train_extra_adds_to_the_orchestrators():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra: str) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", requirement)[0] for requirement in extras[extra]}

    assert set(TRAINING_STACK) == names("train") - names("flows")


def test_the_orchestrator_draws_the_methods_frontier(tmp_path):
    """A run of several methods ends in the orchestrator with the comparison's plot (matplotlib, which the
    orchestrator image lacked: the run failed after every stage had finished)."""
    picture = tmp_path / "frontier.png"
    run_without_the_training_stack(
        "from rlhf_pipeline.stages.core.comparison import compare_methods, save_comparison_frontier\n"
        "from pathlib import Path\n"
        "from tests.core.test_comparison import report\n"
        "comparison = compare_methods({'ppo': report([1.0, 0.0], 2.5, 0.1), 'dpo': report([0.0, 1.0], 0.8, 0.3)})\n"
        f"save_comparison_frontier(comparison, Path({str(picture)!r}))\n"
    )
    assert picture.read_bytes().startswith(b"\x89PNG")
