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

A file that is missing, unreadable, of an unknown format or that does not fit the model is a
:class:`WeightsError` (a ``UserError``: one line naming the file, what is wrong and the fix).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from shards.errors import UserError

SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
_SKIP_TOP_LEVEL = ("head", "head_dist", "pre_logits", "dist_token")
_MAX_LISTED = 25
_FEW = 3
"""Names of each kind shown in the one-line error of a file that does not fit (the counts say the rest)."""
_FIX = ("pass model.pretrained=FILE holding weights of this architecture (same backbone, width, depth and "
        "patch size), or model.pretrained='' to train from scratch")


class WeightsError(UserError):
    """Pretrained weights that cannot be used: the message names the file, the problem and the fix."""


class WeightsNotFound(WeightsError, FileNotFoundError):
    """``model.pretrained`` names no file (also a ``FileNotFoundError``, as ``open`` would raise)."""


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
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                           f"{type(obj).__name__}; {_FIX}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]}); {_FIX}")
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
        raise WeightsError(f"{path}: not a JAX ViT checkpoint (no 'embedding/kernel' and "
                           f"'Transformer/posembed_input/pos_embedding'; keys start {sorted(shapes)[:5]}); {_FIX}")
    kh, kw, in_chans, dim = shapes[f"{prefix}embedding/kernel"]
    depth = 0
    while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in shapes:
        depth += 1
    blk = f"{prefix}Transformer/encoderblock_0/"
    try:
        _, heads, _ = shapes[f"{blk}MultiHeadDotProductAttention_1/query/kernel"]
        hidden = shapes[f"{blk}MlpBlock_3/Dense_0/kernel"][1]
    except KeyError as e:
        raise WeightsError(f"{path}: JAX ViT layout not recognised (missing {e.args[0]!r}); {_FIX}") from None
    has_cls = f"{prefix}cls" in shapes
    n_grid = shapes[f"{prefix}Transformer/posembed_input/pos_embedding"][1] - int(has_cls)
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise WeightsError(f"{path}: position table of {n_grid} grid tokens is not a square grid; {_FIX}")
    vit = VisionTransformer(
        img_size=(side * kh, side * kw), patch_size=(kh, kw), in_chans=in_chans, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True, class_token=has_cls,
        global_pool="token" if has_cls else "avg", num_classes=0, weight_init="skip",
    )
    vit.load_pretrained(str(path), prefix=prefix)  # timm's public JAX loader
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weight file as a flat ``name -> tensor`` dict (CPU), by file suffix.

    Raises :class:`WeightsNotFound` for a missing file and :class:`WeightsError` for an unknown
    suffix or a file its reader cannot parse (truncated, another format under the suffix, a pickle
    that is not plain tensors: never executed)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"model.pretrained={path}: no such file; pass the path of a local weight file "
                              f"({'/'.join(SUFFIXES)}), or model.pretrained='' to train from scratch")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unknown weight format {suffix!r}; expected one of {SUFFIXES} (convert the file, "
                           f"e.g. to .safetensors, or pass another model.pretrained)")
    from safetensors import SafetensorError

    try:
        return _read(path, suffix)
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:  # e.g. a whole pickled nn.Module: refuse to execute it
        raise WeightsError(f"{path}: not a plain tensor checkpoint, or a damaged one (torch.load weights_only=True "
                           f"refused it: {_unpickler_reason(e)}); save the model's state_dict() instead, or "
                           f"{_FIX}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile, SafetensorError) as e:
        # the readers' own errors for a truncated or mislabelled file
        raise WeightsError(f"{path}: cannot read it as {suffix} ({type(e).__name__}: {_first_line(e)}); check the "
                           f"file (a complete copy, the right suffix), or {_FIX}") from None


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's multi-paragraph refusal that says what it met (``Unsupported global: …``)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip()  # on its line or on the next
        return reason.splitlines()[0].split(" was not an allowed global")[0][:160] if reason else "unreadable"
    return _first_line(exc)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def _read(path: Path, suffix: str) -> dict[str, torch.Tensor]:
    if suffix in (".pth", ".pt"):
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path), device="cpu"), path)
    return _read_npz(path)


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
            raise WeightsError(f"{path}: old_grid={old} has {old[0] * old[1]} cells but pos_embed has {n_tokens} grid "
                               f"rows; pass model.pretrained_grid=[rows, cols] of the pretrained model")
        return old
    if n_tokens == model_grid[0] * model_grid[1]:
        return model_grid
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise WeightsError(f"{path}: cannot infer the pretrained grid from {n_tokens} position rows; pass "
                       f"old_grid=(rows, cols) (model.pretrained_grid=[rows, cols])")


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
        raise WeightsError(f"{path}: pos_embed expected (1, N, {want.shape[2]}), found {tuple(pos.shape)}; {_FIX}")
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


def _listed(items: list[str], limit: int) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def fit_errors(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
               may_miss: Callable[[str], bool] = lambda k: False, ignore: Collection[str] = (),
               listed: int = _MAX_LISTED) -> str:
    """Every way ``state`` does not fit the ``own`` state dict, as one line ("" when it fits):
    ``N missing: …; N unexpected: …; N shape mismatch: …`` — missing keys (unless ``may_miss``),
    unexpected keys, shape mismatches, each with its count and its first ``listed`` names;
    ``ignore`` keys on either side."""
    missing = [k for k in own if k not in state and k not in ignore and not may_miss(k)]
    unexpected = [k for k in state if k not in own and k not in ignore]
    mismatched = [f"{k} (expected {tuple(own[k].shape)}, found {tuple(v.shape)})"
                  for k, v in state.items() if k in own and k not in ignore and v.shape != own[k].shape]
    return "; ".join(f"{len(keys)} {label}: {_listed(keys, listed)}" for label, keys in
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
    Raises :class:`WeightsNotFound` (a FileNotFoundError) or :class:`WeightsError` (a ValueError: bad
    format, or one line counting the missing, unexpected and mis-shaped keys with a few names of each).
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
    # tokens of another width are not adapted: fit_errors reports them with every other mis-shaped key
    if "pos_embed" in state and state["pos_embed"].ndim == 3 and state["pos_embed"].shape[2] == own["pos_embed"].shape[2]:
        state["pos_embed"] = _adapt_pos_embed(state, ckpt, target, old_grid, path, report)
    if "reg_token" in own and "cls_token" in state and state["cls_token"].shape == own["cls_token"].shape:
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

    misfit = fit_errors(own, state, may_miss=allowed, listed=_FEW)
    if misfit:
        raise WeightsError(f"{path}: weights do not fit the model's {type(target).__name__} ({misfit}); {_FIX}")

    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(dtype=own[key].dtype))
    report.loaded = [k for k in state if k not in report.derived]
    return report
