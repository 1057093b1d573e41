"""Imports flow one way: kernels <- model <- {train, export, serve} <- ui, with bench and the top-level CLI
(berrylm/cli.py, __main__.py) above everything. This reads every module's imports (top level and inside
functions) and fails on an upward or sideways one, and on any import of the old top-level names (`model`,
`serve`, ...) that berrylm no longer installs. Run it as a script to print the import graph between packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "berrylm"
LAYER = {"kernels": 0, "model": 1, "train": 2, "export": 2, "serve": 2, "ui": 3, "bench": 4, "": 5}
OLD_TOP_LEVEL = {"model", "kernels", "train", "export", "serve", "ui", "bench", "berry"}


def stage_of(module: str) -> str | None:
    """'berrylm.serve.tools.sandbox' -> 'serve'; 'berrylm.cli' / 'berrylm' -> '' (top); other libraries -> None."""
    parts = module.split(".")
    if parts[0] != "berrylm":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else ""


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in source; relative imports resolved against module."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names]
    return out


def violations(source: str, module: str) -> list[str]:
    """The layering rule for one module's source: the reasons it breaks it, empty when it keeps it."""
    here = stage_of(module)
    bad = []
    for line, name in imported_modules(source, module):
        top = name.split(".")[0]
        if top in OLD_TOP_LEVEL:
            bad.append(f"{module}:{line} imports '{name}' (old top-level name; use berrylm.{name})")
            continue
        there = stage_of(name)
        if there is None or there == here:
            continue
        if LAYER[there] >= LAYER[here]:
            kind = "sideways" if LAYER[there] == LAYER[here] else "upward"
            bad.append(f"{module}:{line} imports {name} ({kind}: {here or 'berrylm'} -> {there or 'berrylm'})")
    return bad


def modules() -> dict[str, str]:
    """Module name -> source, for every .py file in the package."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = f.read_text()
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, source in modules().items():
        here = stage_of(name) or "berrylm"
        for _, imported in imported_modules(source, name):
            there = stage_of(imported)
            if there is not None and (there or "berrylm") != here:
                graph.setdefault(here, set()).add(there or "berrylm")
    return graph


def test_every_module_imports_only_downward():
    found = modules()
    assert len(found) > 60 and "berrylm.serve.engine" in found and "berrylm.model.toolcall" in found
    bad = [v for name, source in found.items() for v in violations(source, name)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_upward_sideways_and_old_imports():
    """The rule itself: a clean module passes, each kind of bad import is reported."""
    assert violations("import torch\nfrom berrylm.model.config import ModelConfig\nfrom . import sampler\n",
                      "berrylm.serve.engine") == []
    assert "sideways" in violations("from berrylm.export import load_any\n", "berrylm.serve.backend")[0]
    assert "sideways" in violations("def f():\n    from berrylm.serve.tools import sandbox\n", "berrylm.train.eval")[0]
    assert "upward" in violations("from berrylm.serve.engine import Engine\n", "berrylm.model.checkpoint")[0]
    assert "upward" in violations("from ..serve import api\n", "berrylm.kernels.sampling")[0]
    assert "upward" in violations("import berrylm.cli\n", "berrylm.ui.chat")[0]
    assert "old top-level" in violations("from model.config import ModelConfig\n", "berrylm.train.sft")[0]
    assert "old top-level" in violations("import serve.api\n", "berrylm.bench.serve")[0]


def test_tests_use_the_berrylm_names():
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        for line, name in imported_modules(f.read_text(), "tests." + f.stem):
            assert name.split(".")[0] not in OLD_TOP_LEVEL, f"{f.name}:{line} imports {name}"


if __name__ == "__main__":
    for pkg, deps in sorted(package_graph().items(), key=lambda kv: LAYER.get(kv[0], 5)):
        print(f"{pkg:8s} -> {', '.join(sorted(deps, key=lambda d: (LAYER.get(d, 5), d)))}")
