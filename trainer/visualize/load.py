"""A run directory back into a model: its config (:mod:`trainer.visualize.rundir`), weights and target stores.

The model is built as the run's method built it (same registry, same config), but without
``model.pretrained``: the run's own weights replace every tensor anyway, and the file a run started
from need not exist where the run is looked at. Sizes the data decided at training time (PAT's
classifier, TMGF's camera embedding) are read from the weights, so no training split is opened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shards.errors import UserError
from trainer.config import Config, ModelConfig
from trainer.data.catalogue import SampleIndex
from trainer.engine.checkpoint import list_checkpoints
from trainer.methods.common import Target, open_store
from trainer.models import build_model
from trainer.visualize.rundir import check_run

FINAL = "model_final.safetensors"


@dataclass
class LoadedRun:
    """What the pictures are made from."""

    run_dir: Path
    cfg: Config
    weights: Path
    """The file the weights were read from (``model_final.safetensors`` or a checkpoint's ``state.pt``)."""
    model: nn.Module
    """In eval mode, on the CPU."""


def find_weights(run_dir: Path, weights: str | None) -> Path:
    """``--weights`` (a ``.safetensors``, a ``state.pt`` or a checkpoint folder), else the run's final
    model, else its newest complete checkpoint."""
    if weights:
        path = Path(weights)
        if path.is_dir():
            path = path / "state.pt"
        if not path.is_file():
            raise UserError(f"--weights {weights}: no such file ({path.absolute()}); pass {FINAL}, a checkpoint "
                            "folder RUN_DIR/checkpoints/step_... or its state.pt")
        return path
    if (run_dir / FINAL).is_file():
        return run_dir / FINAL
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if ckpts:
        return ckpts[-1] / "state.pt"
    raise UserError(f"{run_dir}: no {FINAL} and no complete checkpoint under {run_dir / 'checkpoints'}; train the run "
                    "first, or pass --weights PATH")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a ``.safetensors`` export or of a checkpoint's ``state.pt`` (``state["model"]``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: the readers' errors name no fix
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"--weights {path}: cannot read it ({type(exc).__name__}: {first}); pass {FINAL} or a "
                        "checkpoint's state.pt of this run") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"--weights {path}: not a trainer checkpoint (no 'model' entry); pass {FINAL} or a "
                        "checkpoint's state.pt of this run")
    return dict(state["model"])


def _model_config(cfg: Config, state: dict[str, torch.Tensor], target_cams: int) -> tuple[ModelConfig, int]:
    """The model config and classifier size the run's weights were made with."""
    model_cfg = dataclasses.replace(cfg.model, pretrained=None)
    if cfg.model.name == "tmgf":
        cam = state.get("cam_embed")  # sized by the training data's cameras (TMGFMethod.build_model)
        cams = int(cam.shape[0]) if cam is not None else max(cfg.model.num_cams, target_cams, 1)
        return dataclasses.replace(model_cfg, num_cams=cams), 0
    head = state.get("head.classifier.weight")
    return model_cfg, int(head.shape[0]) if head is not None else 0


def load_model(cfg: Config, path: Path, target_cams: int, config_file: Path) -> nn.Module:
    """The model of ``cfg`` (read from ``config_file``) with the weights of ``path`` (every key, strictly),
    in eval mode."""
    state = read_weights(path)
    model_cfg, num_classes = _model_config(cfg, state, target_cams)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: leave the caller's RNG as it was
        model = build_model(model_cfg, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        raise UserError(f"--weights {path}: does not fit the model of {config_file} "
                        f"({text[:400]}); pass the weights of this run") from None
    return model.eval()


def open_target(cfg: Config, name: str) -> Target:
    """Query and gallery of target ``name`` (original pids and cameras, as the evaluation reads them)."""
    return Target(name, open_store(cfg, [name], "query", False), open_store(cfg, [name], "gallery", False))


def max_camid(*stores: SampleIndex) -> int:
    return max((int(s.camid.max()) for s in stores if len(s)), default=-1)


def load_run(run_dir: str | Path, weights: str | None = None, target: str | None = None,
             data_root: str | None = None) -> tuple[LoadedRun, Target]:
    """The run's model and one of its targets; every user mistake is found before anything is written."""
    run_dir = Path(run_dir)
    cfg, name = check_run(run_dir, target, data_root)
    path = find_weights(run_dir, weights)
    tgt = open_target(cfg, name)
    cams = max_camid(tgt.query, tgt.gallery) + 1
    model = load_model(cfg, path, cams, run_dir / "config.yaml")
    model_cams = getattr(model, "num_cams", None)
    if model_cams is not None and cams > int(model_cams):
        raise UserError(f"--target {name}: camera ids up to {cams - 1}, but the model's camera embedding has "
                        f"{model_cams} cameras (TMGF is tested on its training dataset's own cameras); pass "
                        "another --target")
    return LoadedRun(run_dir, cfg, path, model), tgt

