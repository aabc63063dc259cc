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

``model.pretrained`` may also name a timm model, ``timm:<model>[.<pretrained tag>]`` (e.g.
``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``; no tag = timm's default): :func:`resolve_weights`
finds its file where timm itself keeps it — the Hugging Face hub cache (``HF_HUB_CACHE``, default
``$HF_HOME/hub``) for the ``hf_hub_id`` of timm's pretrained config, or torch hub's cache
(``$TORCH_HOME/hub/checkpoints``) for its ``url`` — and downloads it there (``hf_hub_download``, as
timm does) only when it is not cached and the machine is online (``HF_HUB_OFFLINE`` unset). The file
then goes through the same reading and adaptation as a local one, so ``timm:NAME`` and that file give
the same model.

A file that is missing, unreadable, of an unknown format or that does not fit the model, and a timm
name timm does not know or that is neither cached nor downloadable, is a :class:`WeightsError` (a
``UserError``: one line naming the file, what is wrong and the fix).
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from shards.errors import UserError
from trainer.config import TIMM_PREFIX, timm_name_problem

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
    """Tensors of a local weight file, or of a ``timm:NAME`` (see :func:`resolve_weights`), as a flat
    ``name -> tensor`` dict (CPU), by file suffix.

    Raises :class:`WeightsNotFound` for a missing file and :class:`WeightsError` for an unknown
    suffix or a file its reader cannot parse (truncated, another format under the suffix, a pickle
    that is not plain tensors: never executed)."""
    return _read_weights(path)[1]


def _read_weights(spec: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors) for a local path or a ``timm:NAME``."""
    path = resolve_weights(spec)
    if not path.is_file():
        raise WeightsNotFound(f"model.pretrained={path}: no such file; pass the path of a local weight file "
                              f"({'/'.join(SUFFIXES)}), or model.pretrained='' to train from scratch")
    suffix = path.suffix.lower()
    if is_timm_name(spec) and suffix == ".bin":  # a hub repo's pytorch_model.bin is a torch pickle
        suffix = ".pth"
    if suffix not in SUFFIXES:
        raise WeightsError(f"{path}: unknown weight format {suffix!r}; expected one of {SUFFIXES} (convert the file, "
                           f"e.g. to .safetensors, or pass another model.pretrained)")
    from safetensors import SafetensorError

    try:
        return path, _read(path, suffix)
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
# timm:NAME — a timm model's pretrained weights, from timm's own caches

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files timm reads from a hub repo without an ``hf_hub_filename``, in its order (safetensors first)."""


def is_timm_name(spec: object) -> bool:
    """Whether a ``model.pretrained`` value is the ``timm:<model>[.<tag>]`` form."""
    return isinstance(spec, (str, Path)) and str(spec).startswith(TIMM_PREFIX)


@dataclass(frozen=True)
class TimmSource:
    """Where timm keeps the weights of one pretrained tag (from timm's pretrained config)."""

    spec: str
    """The ``model.pretrained`` value, ``timm:...``."""
    repo: str | None
    """Hugging Face hub repo (timm's ``hf_hub_id``), e.g. ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``."""
    revision: str | None
    """Repo revision (an ``@rev`` suffix of ``hf_hub_id``); None = ``main``."""
    filenames: tuple[str, ...]
    """Files of the repo timm would read, in its order."""
    url: str | None
    """timm's direct download URL, cached by torch hub under its file name."""

    def hub_file(self, filename: str) -> Path:
        """Where the hub cache keeps ``filename`` of this repo (read by ``try_to_load_from_cache``)."""
        from huggingface_hub import constants

        folder = "models--" + str(self.repo).replace("/", "--")  # the hub cache's layout
        return Path(constants.HF_HUB_CACHE).absolute() / folder / "snapshots" / (self.revision or "main") / filename

    def url_file(self) -> Path:
        """Where torch hub (timm's ``url`` downloads) caches ``url``."""
        return Path(torch.hub.get_dir()).absolute() / "checkpoints" / os.path.basename(urlparse(str(self.url)).path)


def timm_source(spec: str) -> TimmSource:
    """Where timm keeps ``timm:<model>[.<tag>]``'s weights; a :class:`WeightsError` if timm has none."""
    from timm.models import get_pretrained_cfg

    problem = timm_name_problem(spec)
    if problem is not None:
        raise WeightsError(f"model.pretrained={spec!r}: expected {problem}")
    cfg = get_pretrained_cfg(spec[len(TIMM_PREFIX):])
    assert cfg is not None, "timm_name_problem accepted the name, so timm has its pretrained cfg"
    repo, _, revision = (cfg.hf_hub_id or "").partition("@")
    if not repo and not cfg.url:
        raise WeightsError(f"model.pretrained={spec!r}: timm names no download for these weights; pick another "
                           f"tag, or pass model.pretrained=FILE of a local weight file")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
    # timm also allows a (url, filename) pair in ``url``; every ViT tag has a plain str
    url = cast("str | None", cfg.url or None)
    return TimmSource(spec=spec, repo=repo or None, revision=revision or None, filenames=files, url=url)


def timm_cached_file(source: TimmSource) -> Path | None:
    """The cached file of ``source`` (hub cache first, as timm prefers the hub; then torch hub's), or None."""
    from huggingface_hub import try_to_load_from_cache

    if source.repo:
        for filename in source.filenames:
            hit = try_to_load_from_cache(source.repo, filename, revision=source.revision)
            if isinstance(hit, str):  # not None and not the cache's "known absent" marker
                return Path(hit)
    if source.url and source.url_file().is_file():
        return source.url_file()
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _not_cached(source: TimmSource, why: str) -> str:
    """The one line for weights this machine does not have: the file to place, where, or the alternative."""
    if source.repo:
        name = source.filenames[0]
        place, get = source.hub_file(name), f"hf download {source.repo} {name}"
    else:
        name = source.url_file().name
        place, get = source.url_file(), f"from {source.url}"
    return (f"model.pretrained={source.spec!r}: {why}; place its {name} at {place} (downloaded on a machine with "
            f"network: {get}), or pass model.pretrained=/path/to/{name}, or model.pretrained='' to train from scratch")


def locate_timm_weights(spec: str) -> Path | None:
    """The cached file of a ``timm:`` value, or None when it is not cached but this machine may download
    it. Reads only (no network): raises :class:`WeightsNotFound` when it is neither cached nor
    downloadable (``HF_HUB_OFFLINE``), :class:`WeightsError` for a name timm does not know."""
    source = timm_source(spec)
    found = timm_cached_file(source)
    if found is None and _offline():
        raise WeightsNotFound(_not_cached(source, "not in timm's cache and this machine is offline (HF_HUB_OFFLINE=1)"))
    return found


def _fetch(source: TimmSource) -> Path:
    """Download ``source`` into timm's cache as timm would: the hub repo's first file it has, else the URL
    into torch hub's cache."""
    import timm

    if not source.repo:
        dest = source.url_file()
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(str(source.url), str(dest), progress=False)
        return dest
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    *alternatives, last = source.filenames
    for filename in alternatives:
        try:
            return Path(hf_hub_download(source.repo, filename, revision=source.revision,
                                        library_name="timm", library_version=timm.__version__))
        except RemoteEntryNotFoundError:  # the repo has no such file: timm then tries the next
            pass
    return Path(hf_hub_download(source.repo, last, revision=source.revision,
                                library_name="timm", library_version=timm.__version__))


def _download(source: TimmSource) -> Path:
    """:func:`_fetch`, any failure as one line (what failed, the file to place and where)."""
    try:
        return _fetch(source)
    except Exception as e:  # network, proxy, auth, disk: the machine's state, reported as the user's to fix
        raise WeightsNotFound(_not_cached(source, f"download failed ({type(e).__name__}: {_first_line(e)})")) from None


def resolve_weights(spec: str | Path) -> Path:
    """The local file ``model.pretrained`` names: the path itself, or for ``timm:NAME`` the file in timm's
    cache, downloaded there first when it is missing and the machine is online (see the module doc)."""
    if not is_timm_name(spec):
        return Path(spec)
    found = locate_timm_weights(str(spec))
    return found if found is not None else _download(timm_source(str(spec)))


# ----------------------------------------------------------------------------------------------
# Adapting to the model


def _num_ckpt_prefix(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens with a position row before the grid, register tokens among them) in the checkpoint.

    timm's order is [cls, dist (DeiT distilled), registers, grid]."""
    n_reg = state["reg_token"].shape[1] if "reg_token" in state else 0
    return int("cls_token" in state) + int("dist_token" in state) + n_reg, n_reg


def _infer_grid(n_tokens: int, model_grid: tuple[int, int], old_grid: tuple[int, int] | None,
                path: Path) -> tuple[int, int]:
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
    vit: Any = target  # a timm ViT; its attributes are dynamic (``Tensor | Module``) to mypy
    pos = state["pos_embed"]
    want = vit.pos_embed
    n_prefix = int(vit.num_prefix_tokens)  # cls + register (part) tokens
    n_reg = n_prefix - 1
    ck_prefix, ck_reg = _num_ckpt_prefix(ckpt)  # counted before any key was skipped
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != want.shape[2] or pos.shape[1] <= ck_prefix:
        raise WeightsError(f"{path}: pos_embed expected (1, N, {want.shape[2]}), found {tuple(pos.shape)}; {_FIX}")
    rows, cols = vit.patch_embed.grid_size
    model_grid = (int(rows), int(cols))
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
    """Load ``path`` (a file or ``timm:NAME``) into ``model.backbone`` (or ``model``), adapting tokens and
    positions; see the module doc.

    ``old_grid`` is the pretrained patch grid when it is neither square nor the model's own.
    ``allow_missing`` lists model keys, or prefixes ending in ``.``, that the checkpoint may lack
    (new parameters such as camera embeddings); they keep their initialisation.
    Raises :class:`WeightsNotFound` (a FileNotFoundError) or :class:`WeightsError` (a ValueError: bad
    format, or one line counting the missing, unexpected and mis-shaped keys with a few names of each).
    """
    target = getattr(model, "backbone", model)
    if getattr(target, "cls_token", None) is None or getattr(target, "pos_embed", None) is None:
        raise TypeError(f"load_pretrained needs a ViT with cls_token and pos_embed, got {type(target).__name__}")
    path, raw = _read_weights(path)  # a timm:NAME becomes the cached file it names
    report = LoadReport(path=str(path))
    state: dict[str, torch.Tensor] = {}
    ckpt: dict[str, torch.Tensor] = {}  # every renamed key, the skipped ones too (they own pos rows)
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
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[2] == own["pos_embed"].shape[2]:
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
