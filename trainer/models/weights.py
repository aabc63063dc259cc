"""Load pretrained ViT weights from a local file into a timm ``VisionTransformer`` backbone.

Formats: timm/PyTorch ``.pth``/``.pt`` (``torch.load(weights_only=True)``; ``{'model': ...}`` and
``{'state_dict': ...}`` wrappers and DDP's ``module.`` prefix are unwrapped), Google's JAX ``.npz``
(read by timm's own JAX loader into a matching temporary timm ViT) and ``.safetensors``.

Adaptation to the target backbone (the rules of PAT's ``load_param``, for any grid):

* keys of the classifier/distillation heads (``head*``, ``pre_logits*``, ``dist_token``) are skipped;
* extra tokens (PAT's part tokens = the backbone's register tokens) start as copies of ``cls_token``
  and their position rows as copies of the cls position row; a checkpoint's extra tokens that the
  target lacks are skipped (with their position rows);
* a whole model of ours (keys under ``backbone.``, e.g. a PAT or TMGF ``model_final.safetensors``)
  gives its backbone; its other keys (heads, necks, branches) are skipped;
* the grid part of ``pos_embed`` is resized from the pretrained grid (e.g. 14x14) to the model's
  (e.g. 16x8) with timm's ``resample_abs_pos_embed``, bilinear, no antialiasing, align_corners=False
  (= PAT's ``F.interpolate(mode='bilinear')``);
* everything else must match by name and shape: missing keys, unexpected keys and shape mismatches are
  reported together in one error (a patch-size change is a shape mismatch: not resampled).

The target is ``model.backbone`` when the model has one, else the model itself; report keys are
relative to that target. A ``rename`` hook maps foreign key names (e.g. a conv-stem checkpoint) to
the backbone's and may drop a key by returning None.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
_SKIP_TOP_LEVEL = ("head", "head_dist", "pre_logits", "dist_token")
_MAX_LISTED = 25


@dataclass
class LoadReport:
    """What ``load_pretrained`` did, key by key (keys relative to the loaded module)."""

    path: str
    """The file loaded."""
    loaded: list[str] = field(default_factory=list)
    """Model keys copied from the checkpoint (possibly resized: see ``resized``)."""
    derived: list[str] = field(default_factory=list)
    """Model keys built from other checkpoint keys (extra tokens from ``cls_token``)."""
    resized: list[str] = field(default_factory=list)
    """Model keys whose grid was resampled (``pos_embed``)."""
    skipped: list[str] = field(default_factory=list)
    """Checkpoint keys dropped on purpose (heads, distillation token, ``rename`` -> None)."""

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors from {self.path} (derived: {self.derived}, "
                f"resized: {self.resized}, skipped: {self.skipped})")


# ----------------------------------------------------------------------------------------------
# Reading files


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    if all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """A JAX ViT ``.npz`` as a timm state dict, via timm's loader on a ViT shaped like the file."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    with np.load(path, allow_pickle=False) as npz:
        shapes = {k: npz[k].shape for k in npz.files}
    prefix = next((p for p in ("", "opt/target/") if f"{p}embedding/kernel" in shapes), None)
    if prefix is None or f"{prefix}Transformer/posembed_input/pos_embedding" not in shapes:
        raise ValueError(f"{path}: not a JAX ViT checkpoint (no 'embedding/kernel' and "
                         f"'Transformer/posembed_input/pos_embedding'; keys start {sorted(shapes)[:5]})")
    kh, kw, in_chans, dim = shapes[f"{prefix}embedding/kernel"]
    depth = 0
    while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in shapes:
        depth += 1
    blk = f"{prefix}Transformer/encoderblock_0/"
    try:
        _, heads, _ = shapes[f"{blk}MultiHeadDotProductAttention_1/query/kernel"]
        hidden = shapes[f"{blk}MlpBlock_3/Dense_0/kernel"][1]
    except KeyError as e:
        raise ValueError(f"{path}: JAX ViT layout not recognised (missing {e.args[0]!r})") from None
    has_cls = f"{prefix}cls" in shapes
    n_grid = shapes[f"{prefix}Transformer/posembed_input/pos_embedding"][1] - int(has_cls)
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise ValueError(f"{path}: position table of {n_grid} grid tokens is not a square grid")
    vit = VisionTransformer(
        img_size=(side * kh, side * kw), patch_size=(kh, kw), in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True, class_token=has_cls,
        global_pool="token" if has_cls else "avg", num_classes=0, weight_init="skip",
    )
    vit.load_pretrained(str(path), prefix=prefix)  # timm's public JAX loader
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weight file as a flat ``name -> tensor`` dict (CPU), by file suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # e.g. a whole pickled nn.Module: refuse to execute it
            raise ValueError(f"{path}: not a plain tensor checkpoint (torch.load weights_only=True failed: "
                             f"{str(e).splitlines()[0]})") from None
        return _unwrap(obj, path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path), device="cpu"), path)
    if suffix == ".npz":
        return _read_npz(path)
    raise ValueError(f"{path}: unknown weight format {suffix!r}; expected one of {SUFFIXES}")


# ----------------------------------------------------------------------------------------------
# Adapting to the model


def _num_ckpt_prefix(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens with a position row before the grid, register tokens among them) in the checkpoint.

    timm's order is [cls, dist (DeiT distilled), registers, grid]."""
    n_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    return int("cls_token" in state) + int("dist_token" in state) + n_reg, n_reg


def _infer_grid(n_tokens: int, model_grid: tuple[int, int], old_grid: tuple[int, int] | None, path: Path) -> tuple[int, int]:
    if old_grid is not None:
        old = (int(old_grid[0]), int(old_grid[1]))
        if old[0] * old[1] != n_tokens:
            raise ValueError(f"{path}: old_grid={old} has {old[0] * old[1]} cells but pos_embed has {n_tokens} grid rows")
        return old
    if n_tokens == model_grid[0] * model_grid[1]:
        return model_grid
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise ValueError(f"{path}: cannot infer the pretrained grid from {n_tokens} position rows; pass old_grid=(rows, cols)")


def _adapt_pos_embed(
    state: dict[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor], target: nn.Module,
    old_grid: tuple[int, int] | None, path: Path, report: LoadReport,
) -> torch.Tensor:
    pos = state["pos_embed"]
    want = target.pos_embed
    n_prefix = int(target.num_prefix_tokens)  # cls + register (part) tokens
    n_reg = n_prefix - 1
    ck_prefix, ck_reg = _num_ckpt_prefix(ckpt)  # counted before any key was skipped
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != want.shape[2] or pos.shape[1] <= ck_prefix:
        raise ValueError(f"{path}: pos_embed expected (1, N, {want.shape[2]}), found {tuple(pos.shape)}")
    model_grid = tuple(int(g) for g in target.patch_embed.grid_size)
    grid_pe = pos[:, ck_prefix:]
    old = _infer_grid(grid_pe.shape[1], model_grid, old_grid, path)
    if old != model_grid:
        grid_pe = resample_abs_pos_embed(
            grid_pe, new_size=list(model_grid), old_size=list(old), num_prefix_tokens=0,
            interpolation="bilinear", antialias=False,
        )
        report.resized.append("pos_embed")
    cls_pe = pos[:, :1]
    if n_reg and ck_reg == n_reg:  # the checkpoint has the same extra tokens: keep their rows
        reg_pe = pos[:, ck_prefix - ck_reg : ck_prefix]
    else:
        reg_pe = cls_pe.expand(1, n_reg, -1)
    return torch.cat([cls_pe, reg_pe, grid_pe], dim=1)


def _listed(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def fit_errors(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               may_miss: Callable[[str], bool] = lambda k: False, ignore: Collection[str] = ()) -> str:
    """Every way ``state`` does not fit the ``own`` state dict, as one line ("" when it fits):
    missing keys (unless ``may_miss``), unexpected keys, shape mismatches; ``ignore`` keys on either side."""
    missing = [k for k in own if k not in state and k not in ignore and not may_miss(k)]
    unexpected = [k for k in state if k not in own and k not in ignore]
    mismatched = [f"{k} (expected {tuple(own[k].shape)}, found {tuple(v.shape)})"
                  for k, v in state.items() if k in own and k not in ignore and v.shape != own[k].shape]
    return "; ".join(f"{label}: {_listed(keys)}" for label, keys in
                     (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys)


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    old_grid: tuple[int, int] | None = None,
    rename: Callable[[str], str | None] | None = None,
    allow_missing: Collection[str] = (),
) -> LoadReport:
    """Load ``path`` into ``model.backbone`` (or ``model``), adapting tokens and positions; see the module doc.

    ``old_grid`` is the pretrained patch grid when it is neither square nor the model's own.
    ``allow_missing`` lists model keys, or prefixes ending in ``.``, that the checkpoint may lack
    (new parameters such as camera embeddings); they keep their initialisation.
    Raises FileNotFoundError / ValueError (bad format, or one error listing every key that does not fit).
    """
    path = Path(path)
    target = getattr(model, "backbone", model)
    if getattr(target, "cls_token", None) is None or getattr(target, "pos_embed", None) is None:
        raise TypeError(f"load_pretrained needs a ViT with cls_token and pos_embed, got {type(target).__name__}")
    report = LoadReport(path=str(path))
    state: dict[str, torch.Tensor] = {}
    ckpt: dict[str, torch.Tensor] = {}  # every renamed key, the skipped ones too (they own pos rows)
    raw = read_state_dict(path)
    if "cls_token" not in raw and "backbone.cls_token" in raw:
        # a whole model of ours (PAT, TMGF: model_final.safetensors): its backbone initialises this one
        report.skipped.extend(k for k in raw if not k.startswith("backbone."))
        raw = {k[len("backbone."):]: v for k, v in raw.items() if k.startswith("backbone.")}
    for key, value in raw.items():
        name = rename(key) if rename is not None else key
        if name is not None:
            ckpt[name] = value
        if name is None or name.split(".")[0] in _SKIP_TOP_LEVEL:
            report.skipped.append(key)
            continue
        state[name] = value

    own = target.state_dict()
    if "pos_embed" in state:
        state["pos_embed"] = _adapt_pos_embed(state, ckpt, target, old_grid, path, report)
    if "reg_token" in own and "cls_token" in state:
        if "reg_token" not in state or state["reg_token"].shape != own["reg_token"].shape:
            if "reg_token" in state:
                report.skipped.append("reg_token")
            state["reg_token"] = state["cls_token"].expand_as(own["reg_token"]).clone()
            report.derived.append("reg_token")

    if "reg_token" in state and "reg_token" not in own:  # e.g. PAT's part tokens into a model without them
        del state["reg_token"]
        report.skipped.append("reg_token")

    def allowed(key: str) -> bool:
        return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allow_missing)

    misfit = fit_errors(own, state, may_miss=allowed)
    if misfit:
        raise ValueError(f"{path}: weights do not fit {type(target).__name__}; {misfit}")

    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    report.loaded = [k for k in state if k not in report.derived]
    return report
