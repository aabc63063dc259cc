"""Bad inputs of ``python -m trainer.visualize``: one line, exit 2, nothing written (``tests/badinput.py``).

Run directories are made in the scratch folder from a composed pat_smoke config (its ``config.yaml``
as ``trainer.train`` writes it) and, where a row gets that far, the weights of a freshly built model:
no training needed. The datasets are the repository's synthetic cache, named by absolute path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.badinput import REPO, BadInput, check
from trainer.config import Config

VIS = ["-m", "trainer.visualize"]
CACHE = REPO / ".cache" / "reid"


def _run_dir(weights: bool, cache: Path | None = CACHE) -> Callable[[Path], None]:
    """``tmp/run`` with pat_smoke's config.yaml (data under ``cache``; relative when None) and, if asked,
    a model_final.safetensors that fits it."""

    def setup(tmp: Path) -> None:
        from trainer.config import compose, to_yaml
        from trainer.data.prepare import ensure_datasets

        extra = [f"data.cache_dir={cache}"] if cache is not None else []
        cfg = compose(["exp=pat_smoke", f"run_dir={tmp / 'run'}", *extra])
        if cache is not None:
            ensure_datasets(cfg.data)  # made once in the repository's cache, outside the scratch folder
        (tmp / "run").mkdir()
        (tmp / "run" / "config.yaml").write_text(to_yaml(cfg))
        if weights:
            state = _model(cfg).state_dict()
            _save({k: v.contiguous() for k, v in state.items()}, tmp / "run" / "model_final.safetensors")

    return setup


def _model(cfg: Config) -> nn.Module:
    from trainer.models import build_model

    return build_model(cfg.model, num_classes=4)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _foreign_weights(tmp: Path) -> None:
    _run_dir(weights=False)(tmp)
    _save({"fc.weight": torch.zeros(2, 2)}, tmp / "foreign.safetensors")


def _garbage_weights(tmp: Path) -> None:
    _run_dir(weights=False)(tmp)
    (tmp / "broken.safetensors").write_bytes(b"not a safetensors file")


def _broken_config(tmp: Path) -> None:
    (tmp / "config.yaml").write_text("model: {name: [unclosed\n")


def _out_under_a_file(tmp: Path) -> None:
    _run_dir(weights=True)(tmp)
    (tmp / "notes.txt").write_text("a file, not a folder")


ROWS = [
    BadInput("no-run-dir", [*VIS, "{tmp}/nowhere"], names=("nowhere", "no such run directory"),
             fix=("run_dir of a trainer.train run",)),
    BadInput("no-config", [*VIS, "{tmp}"], names=("config.yaml", "missing")),
    BadInput("broken-config", [*VIS, "{tmp}"], names=("config.yaml", "not a readable run config"),
             setup=_broken_config),
    BadInput("no-weights", [*VIS, "{tmp}/run"], setup=_run_dir(weights=False),
             names=("model_final.safetensors", "no complete checkpoint"), fix=("--weights PATH",)),
    BadInput("unknown-target", [*VIS, "{tmp}/run", "--target", "market1501"], setup=_run_dir(weights=True),
             names=("--target market1501", "smoke_b"), fix=("expected one of",)),
    BadInput("data-not-found", [*VIS, "{tmp}/run"], setup=_run_dir(weights=True, cache=None),
             names=("data.root=.cache/reid/shards", "smoke_b"), fix=("--data-root",)),
    BadInput("weights-missing", [*VIS, "{tmp}/run", "--weights", "{tmp}/nope.safetensors"],
             setup=_run_dir(weights=False), names=("--weights", "nope.safetensors", "no such file")),
    BadInput("weights-foreign", [*VIS, "{tmp}/run", "--weights", "{tmp}/foreign.safetensors"],
             setup=_foreign_weights, names=("foreign.safetensors", "does not fit"), fix=("weights of this run",)),
    BadInput("weights-garbage", [*VIS, "{tmp}/run", "--weights", "{tmp}/broken.safetensors"],
             setup=_garbage_weights, names=("broken.safetensors", "cannot read it")),
    BadInput("query-out-of-range", [*VIS, "{tmp}/run", "--query", "100000"], setup=_run_dir(weights=True),
             names=("--query 100000", "indices 0.."), fix=("--queries N",)),
    BadInput("out-under-a-file", [*VIS, "{tmp}/run", "--out", "{tmp}/notes.txt/vis"], setup=_out_under_a_file,
             names=("--out", "notes.txt", "is not a folder")),
    BadInput("topk-zero", [*VIS, "{tmp}/run", "--topk", "0"], names=("--topk", "expected >= 1")),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
