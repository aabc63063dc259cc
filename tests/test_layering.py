"""The package map of docs/design.md, kept: every import of every module points down the layers.

Imports anywhere in a module count (a function-level import is still a dependency). A failure names
the module, the import and the rule; change the code, or docs/design.md and this table together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "trainer", "launch", "demo")

ALLOWED: dict[str, set[str]] = {
    "shards": set(),
    "trainer": set(),  # the package's __init__
    "trainer.dist": set(),
    "trainer.config": {"shards"},
    "trainer.report": {"shards"},  # metrics.jsonl only: no torch, no model
    "trainer.models": {"shards", "trainer.dist", "trainer.config"},
    "trainer.data": {"shards", "trainer.dist", "trainer.config"},
    "trainer.memory": {"trainer.dist"},
    "trainer.cluster": {"trainer.dist"},
    "trainer.losses": {"trainer.dist", "trainer.config", "trainer.memory", "trainer.cluster"},
    "trainer.evaluation": {"trainer.dist", "trainer.data", "trainer.cluster"},
    "trainer.engine": {"shards", "trainer.dist", "trainer.config", "trainer.models", "trainer.data",
                       "trainer.memory", "trainer.evaluation"},
    "trainer.methods": {"shards", "trainer.dist", "trainer.config", "trainer.models", "trainer.data",
                        "trainer.memory", "trainer.cluster", "trainer.losses", "trainer.evaluation",
                        "trainer.engine"},
    "trainer.train": {"shards", "trainer"},
    "trainer.export": {"shards", "trainer"},
    "trainer.visualize": {"shards", "trainer"},
    "launch": {"shards", "trainer"},
    "demo": {"shards", "trainer", "launch"},
}
"""Layer → the layers it may import (``trainer`` = any of its parts). Own-layer imports are free."""


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "trainer" and len(parts) > 1:
        return f"trainer.{parts[1]}"
    return parts[0]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from trainer import dist`` imports the module trainer.dist
            found += [(f"{name}.{a.name}" if name in ("trainer", "trainer.engine") else name, node.lineno)
                      for a in node.names]
    return found


def test_every_import_points_down() -> None:
    bad = []
    for module, path in _modules():
        own = _layer(module)
        assert own in ALLOWED, f"{module}: no layer in the table (add it to docs/design.md and ALLOWED)"
        for name, line in _imports(module, path):
            target = _layer(name)
            if target is None or target == own or name == "trainer":
                continue
            allowed = ALLOWED[own]
            if target in allowed or (target.startswith("trainer.") and "trainer" in allowed):
                continue
            bad.append(f"{path.relative_to(REPO)}:{line}: {own} imports {name} ({target} is not below it)")
    assert not bad, "\n".join(bad)


def test_shards_and_config_do_not_load_torch() -> None:
    """The packer runs without torch, and parsing a config loads no model code."""
    probe = ("import sys, shards.pack, shards.verify, shards.synth, trainer.config; "
             "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
