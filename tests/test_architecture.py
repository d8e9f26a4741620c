"""Import rules (README's layout): cli → study → engine / trainer / personalize / tools → format / datasets →
config / errors / identity / logs / cluster. No back-edges: the engine never imports the trainer nor the
reverse, the tools that read runs import neither, and the data contract (format/) imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreamshard"

# part of dreamshard -> the parts it must never import
STAGES = {"engine", "trainer", "personalize", "study", "cli", "tools"}
FORBIDDEN = {
    "format": STAGES | {"datasets"},
    "datasets": STAGES | {"format"},
    "tools": STAGES - {"tools"},
    "engine": {"trainer", "personalize", "study", "cli", "tools"},
    "trainer": {"engine", "personalize", "study", "cli", "tools"},
    "personalize": {"trainer", "study", "cli", "tools"},  # it loads the base pipeline through engine.models
    "study": {"cli", "tools"},
    "config": STAGES | {"format", "datasets"},
    "identity": STAGES | {"format", "datasets", "config", "cluster", "logs"},
    "errors": STAGES | {"format", "datasets", "config", "identity"},
    "cluster": STAGES | {"format", "datasets"},
}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set[str]:
    """The top-level dreamshard parts a module imports, at module level or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "dreamshard"]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "dreamshard" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    forbidden = FORBIDDEN.get(part_of(path), set())
    assert not imported_parts(path) & forbidden, f"{path.relative_to(PACKAGE)} imports {sorted(imported_parts(path) & forbidden)}"


def test_the_rule_checker_sees_a_back_edge(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dreamshard.trainer.loop import train\n")
    assert imported_parts(module) == {"trainer"}
    assert len(MODULES) > 30  # the walk found the package


def test_embedded_ray_listens_on_loopback_only(ray_cluster):
    import ray

    assert ray_cluster.startswith("127.0.0.1:")  # the GCS
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
