"""The package's shape, measured: imports that run up the layers, functions over 60 lines, lines over 120 characters.

Layers, top to bottom (a unit is a folder or a top-level module of ``recache/``; it may import its own modules and
any unit of a lower layer, never one of its own layer or above):

    __main__                  ``python -m recache``
    cli, __init__             the command line; the package root (it imports ``api`` on first use)
    api                       recache.enable / disable / refresh / summary on diffusers pipelines
    evaluation, training      the protocol's runner and reports; training of the embedded models
    policies                  ReCache, BudCache search and alignment, the heuristics
    sampling                  samplers, batched rollouts, diffusers rollouts, the sampler interface
    hooks                     diffusers hooks
    metrics                   fidelity, classifier scores, rewards
    models                    the embedded DiT, classifier and FLUX digits model
    schedule, mechanisms      compute masks and budgets; what fills a cached step
    protocol, checkpoint, viz, data
    io, distributed
    errors, _version

    .venv/bin/python bench/architecture.py          # prints the three counts and every offender; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS = [
    ("errors", "_version"),
    ("io", "distributed"),
    ("protocol", "checkpoint", "viz", "data"),
    ("schedule", "mechanisms"),
    ("models",),
    ("metrics",),
    ("hooks",),
    ("sampling",),
    ("policies",),
    ("evaluation", "training"),
    ("api",),
    ("cli", "__init__"),
    ("__main__",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MAX_FUNCTION_LINES, MAX_LINE = 60, 120
ROOT = Path(__file__).resolve().parent.parent


def unit_of(path: Path, package: Path) -> str:
    """The layer unit of a file of the package: its folder under the package, or its module name."""
    parts = path.relative_to(package).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_units(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, unit) of every ``recache`` import in a module, at any depth (function-local ones count too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = node.module.split(".")
            if module[0] != "recache":
                continue
            names = module[1:2] or [alias.name for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("recache.")]
    return found


def upward_imports(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        unit = unit_of(path, package)
        if unit not in RANK:
            out.append(f"{path.relative_to(ROOT)}: unit {unit!r} has no layer")
            continue
        for line, target in imported_units(ast.parse(path.read_text())):
            if target != unit and RANK.get(target, -1) >= RANK[unit]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {unit} imports {target}")
    return out


def long_functions(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} is {length} lines")
    return out


def long_lines(paths: list[Path]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{i}: {len(line)} characters"
            for path in paths for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]


def report(root: Path = ROOT) -> dict[str, list[str]]:
    package = root / "recache"
    code = sorted(p for folder in ("recache", "tests", "bench") for p in (root / folder).rglob("*.py"))
    return {"upward imports between layers": upward_imports(package),
            f"functions over {MAX_FUNCTION_LINES} lines": long_functions(code),
            f"lines over {MAX_LINE} characters": long_lines(code)}


def main() -> int:
    found = report()
    for what, offenders in found.items():
        print(f"{what}: {len(offenders)}")
        for offender in offenders:
            print(f"  {offender}")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
