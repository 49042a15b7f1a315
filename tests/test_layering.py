"""The layers import one way (DESIGN.md): offline/ -> embsum's model packages and index/;
the model packages never import storage or jobs; storage never imports torch, the model or
jobs. The installed distribution maps index/ and offline/ to `embsum.index` and
`embsum.offline`, so it claims no generic top-level name in a user's environment."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """file -> every module name it imports (absolute imports; this project uses no others)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file}: {name}" for file, names in imported_modules(ROOT / folder).items() for name in sorted(names)
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden)]


def test_model_layer_imports_no_storage_and_no_jobs():
    assert offenders("embsum", ("embsum.index", "embsum.offline", "index", "offline", "duckdb", "faiss")) == []


def test_storage_layer_imports_no_model_no_jobs_no_torch():
    """index/ reaches its own modules by relative imports: it names no `embsum` package at all
    (so neither the model nor the jobs), and no torch."""
    assert offenders("index", ("embsum", "offline", "torch", "transformers", "peft")) == []


@pytest.mark.parametrize("generic", ["index", "offline"])
def test_no_generic_top_level_names(generic):
    """Code reaches storage and jobs as embsum.index / embsum.offline only."""
    for folder in ("embsum", "index", "offline", "tests", "benchmarks"):
        assert offenders(folder, (generic,)) == [], folder
    spec = importlib.util.find_spec(f"embsum.{generic}")
    assert spec is not None and Path(spec.origin).parent == ROOT / generic
