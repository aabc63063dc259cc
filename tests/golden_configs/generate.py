"""Write ``configs.json``: every experiment's composed config, flattened to dotted keys.

The fixture pins what each ``configs/exp/*.yaml`` composes to, so that restructuring the config tree
(groups, defaults, renamed fields) is checked against the values the experiments had before it
(``tests/test_config_groups.py``). Regenerate it only when an experiment's values change on purpose::

    .venv/bin/python -m tests.golden_configs.generate
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "configs.json"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.img_size": [256, 128], ...}`` from a dataclass tree (tuples as lists, as JSON has them)."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: _plain(node)}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# Interpolated values depend on other keys: pin them for every value those keys take in the paper.
VARIANTS = [f"exp=multisource data.target={t}" for t in ("market1501", "dukemtmc", "cuhk03np_detected", "msmt17")]


def cases() -> list[str]:
    """Each experiment by name, then the override lines of :data:`VARIANTS`."""
    from trainer.config import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml")) + VARIANTS


def composed(case: str) -> dict[str, Any]:
    from trainer.config import compose

    return flatten(compose(case.split() if "=" in case else [f"exp={case}"]))


def main() -> None:
    table = {case: composed(case) for case in cases()}
    FIXTURE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(table)} cases)")


if __name__ == "__main__":
    main()
