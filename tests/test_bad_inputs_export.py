"""Bad inputs of ``python -m trainer.export``: one line, exit 2, nothing written (``tests/badinput.py``).

The run directories are made by hand in the scratch folder: a ``config.yaml`` as ``trainer.train`` writes
it (``pat_smoke``) and, where a row needs them, weights that fit its model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.badinput import BadInput, check

EXPORT = ["-m", "trainer.export", "run"]


@functools.cache
def _config_yaml(*overrides: str) -> str:
    from trainer.config import compose, to_yaml

    return to_yaml(compose(["exp=pat_smoke", "run_dir=run", *overrides]))


def _run(tmp: Path, *overrides: str) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_config_yaml(*overrides))
    return run


def _fitting_weights(run: Path, *overrides: str) -> None:
    """model_final.safetensors of the run's model (untrained; a classifier of 4 identities)."""
    import dataclasses

    from safetensors.torch import save_file

    from trainer.config import compose
    from trainer.models import build_model

    cfg = compose(["exp=pat_smoke", *overrides])
    model = build_model(dataclasses.replace(cfg.model, pretrained=None), num_classes=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model_final.safetensors"))


def _config_only(tmp: Path) -> None:
    _run(tmp)


def _damaged_weights(tmp: Path) -> None:
    (_run(tmp) / "model_final.safetensors").write_bytes(b"not a safetensors file")


def _foreign_weights(tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(_run(tmp) / "model_final.safetensors"))


def _checkpoint_file(content: bytes | None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        step = _run(tmp) / "checkpoints" / "step_000000002"
        step.mkdir(parents=True)
        if content is not None:
            (step / "state.pt").write_bytes(content)
    return setup


def _no_model_entry(tmp: Path) -> None:
    step = _run(tmp) / "checkpoints" / "step_000000002"
    step.mkdir(parents=True)
    torch.save({"epoch": 1}, step / "state.pt")


def _out_is_a_file(tmp: Path) -> None:
    _run(tmp)
    (tmp / "out").write_text("a file")


def _random_test_regions(tmp: Path) -> None:
    _fitting_weights(_run(tmp, "model.test_part_regions=random"), "model.test_part_regions=random")


CKPT = "run/checkpoints/step_000000002"
ROWS = [
    BadInput("no-run-dir", EXPORT, names=("run: no such run directory",), fix=("the run_dir of a trainer.train run",)),
    BadInput("no-config", EXPORT, names=("run/config.yaml: missing",), fix=("trainer.train run directory",),
             setup=lambda tmp: (tmp / "run").mkdir()),
    BadInput("no-weights", EXPORT, names=("run/model_final.safetensors: missing",),
             fix=("--checkpoint run/checkpoints/step_...",), setup=_config_only),
    BadInput("damaged-weights", EXPORT, names=("run/model_final.safetensors: cannot read it",),
             fix=("--checkpoint run/checkpoints/step_...",), setup=_damaged_weights),
    BadInput("foreign-weights", EXPORT, names=("run/model_final.safetensors: does not fit the pat model",
                                               "missing: backbone.cls_token", "1 unexpected: w"),
             fix=("pass this run's weights",), setup=_foreign_weights),
    BadInput("checkpoint-not-a-folder", [*EXPORT, "--checkpoint", CKPT],
             names=(f"--checkpoint {CKPT}: not a checkpoint folder",), fix=("leave --checkpoint out",),
             setup=_checkpoint_file(None)),
    BadInput("checkpoint-damaged", [*EXPORT, "--checkpoint", CKPT], names=(f"{CKPT}/state.pt: cannot read it",),
             fix=("pass another --checkpoint",), setup=_checkpoint_file(b"\x00 not a torch file")),
    BadInput("checkpoint-without-model", [*EXPORT, "--checkpoint", CKPT],
             names=(f"{CKPT}/state.pt: not a trainer checkpoint",), fix=("pass another --checkpoint",),
             setup=_no_model_entry),
    BadInput("unknown-format", [*EXPORT, "--format", "tflite"], names=("--format", "'tflite'"),
             fix=("onnx", "safetensors")),
    BadInput("out-is-a-file", [*EXPORT, "--out", "out"], names=("--out out: a file",), fix=("pass a folder",),
             setup=_out_is_a_file),
    BadInput("random-test-regions", EXPORT, names=("model.test_part_regions='random'",),
             fix=("model.test_part_regions=fixed",), setup=_random_test_regions),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    check(row, tmp_path)
