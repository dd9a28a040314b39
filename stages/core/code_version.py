"""A stage's code version: the digest of the source of the modules it really runs, so that a cached artifact
is reused after an edit it cannot have seen (a tool, `flows/`, another algorithm) and recomputed after one it
can (its program, the library modules that program imports, the config schema).

The modules a stage runs are its program's import closure inside the package: every `import` in their source,
at module level or inside a function, and the packages' `__init__` files on the way. What the source imports by
name at run time (the runner the stage program, `rl` its algorithm) is named by the registry
(`Stage.modules_for`). The source is read, never imported: the orchestrator computes keys without torch.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from rlhf_pipeline.stages.core.registry import PACKAGE

ROOT = Path(__file__).resolve().parents[1]  # the folder of PACKAGE
OUTSIDE_DIGEST = frozenset({f"{PACKAGE}.core.plots", f"{PACKAGE}.modeling.model_card"})


def module_file(module: str) -> Path | None:
    """The source file of one of the package's modules (a package's `__init__.py`), None outside it."""
    if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
        return None
    parts = module.split(".")[2:]
    candidates = [ROOT.joinpath(*parts).with_suffix(".py")] if parts else []
    for candidate in (*candidates, ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def imported_modules(module: str) -> frozenset[str]:
    """The package's modules that `module`'s source imports, anywhere in it."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module} is not a module of {PACKAGE}")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    return frozenset(name for name in names if module_file(name) is not None)


def with_packages(module: str) -> list[str]:
    """The module and the packages above it inside PACKAGE, whose `__init__` runs first."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(2, len(parts) + 1)]


def import_closure(modules: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    pending = [name for module in modules for name in with_packages(module)]
    while pending:
        module = pending.pop()
        if module in seen or module in OUTSIDE_DIGEST:
            continue
        seen.add(module)
        for imported in imported_modules(module):
            pending.extend(with_packages(imported))
    return seen


def code_version(modules: Iterable[str]) -> str:
    """The digest of the closure's files: their paths inside the package and their bytes."""
    digest = hashlib.sha256()
    files = {module_file(module) for module in import_closure(modules)}
    for path in sorted(path for path in files if path is not None):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
