"""TMGF (Li et al., WACV 2023 workshops): a ViT with an IBN conv stem, camera embeddings and a
dual-branch multi-grained head.

Tokens: IBN conv stem + kernel-8 projection (total stride 16: 384x128 -> 24x8 grid), cls token,
``pos_embed``, and ``cam_embed_coef * E[camid]`` added to every token (0-based camera ids). The trunk
runs blocks 1..L-1 and returns the tokens WITHOUT the final LayerNorm. Each branch b is a copy of
block L followed by a copy of the final LayerNorm; its patch tokens (H x W grid, row-major) are
average-pooled into K_b horizontal stripes (top to bottom), its cls token feeds the global feature.
Every output (global, then the parts of branch 1, then branch 2, ...) goes through its own BatchNorm1d
(weight 1, bias 0 and frozen) and is L2-normalised.

Forward contract (the same in train and eval mode; BN uses batch statistics in train mode)::

    model(img: B x 3 x H x W, camid: int64[B]) -> B x S x D,  S = 1 + sum(K_b) = model.num_slots

slot 0 is the global feature, slots 1.. the parts ``[b1 top..bottom, b2 top..bottom, ...]``.
Attributes: ``num_slots``, ``num_parts`` (S - 1), ``feat_dim`` (D), ``num_cams``, ``grid``.

Stripes: stripe k of K covers grid rows ``floor(k H / K) .. ceil((k + 1) H / K) - 1`` (adaptive
average pooling). When K divides H (24 rows and K in {2, 3, 4}) this is exactly the official
``AvgPool2d(kernel=(H/K, W), stride=H/K)``; otherwise (tiny test grids) neighbouring stripes share a row.

Branch copies are made at construction and RE-SEEDED from the trunk's block L / final LayerNorm every
time pretrained weights are loaded (:meth:`TMGF.load_pretrained_weights`, which ``build_model`` calls):
so they always start as copies of the loaded weights, exactly like the official deep copy after
``load_param``. Re-seeding copies values into the existing parameters (their identity never changes,
so an optimizer built earlier stays valid). The trunk's own block L and final LayerNorm stay in the
module only as the seed: they are never run and are frozen (``requires_grad=False``), so DDP sees no
unused trainable parameter.

The paper's ablations (Tables 2-4) are config switches, ``TMGF_VARIANTS``; the tables, the
experiments that reproduce them and the architecture in prose are in ``docs/methods/tmgf.md``. The
IBN stem is :mod:`trainer.models.ibn_stem`, the TransReID checkpoint names
:mod:`trainer.models.tmgf_weights`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig

from .backbones import build_vit, grid_size
from .heads import frozen_bias_bn
from .ibn_stem import IBNStemPatchEmbed
from .registry import register_model
from .tmgf_weights import CAMERA_KEYS, OPTIONAL_STEM_KEYS, transreid_key
from .weights import LoadReport, WeightsError, fit_errors, load_pretrained, read_state_dict

TMGF_VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "tmgf": {},  # two branches, [2, 3] stripes, global = mean of the branches' cls tokens
    "tmgf1": {"tmgf_granularities": ()},  # baseline: one branch, global cls only (S = 1)
    "tmgf2": {"tmgf_granularities": (2,)},  # one branch, 2 stripes (S = 3)
    "tmgf3": {"tmgf_granularities": (3,)},  # one branch, 3 stripes (S = 4)
    "tmgf4": {"tmgf_duplicate_last_block": False},  # one shared block L, both partitions on its tokens
    "tmgf5": {"tmgf_global": "cls1"},  # global = cls of branch 1
    "tmgf6": {"tmgf_global": "cls2"},  # global = cls of branch 2
}
"""The paper's model variants (Tables 2 and 4) as ``ModelConfig`` overrides of the full model."""


# ----------------------------------------------------------------------------------------------
# Parts


def stripe_pool(patches: torch.Tensor, grid: tuple[int, int], stripes: int) -> torch.Tensor:
    """B x (H*W) x D row-major patch tokens -> B x K x D means of K horizontal stripes, top to bottom."""
    rows, cols = grid
    batch, n, dim = patches.shape
    if n != rows * cols:
        raise ValueError(f"{n} patch tokens do not form the {rows}x{cols} grid")
    row_means = patches.reshape(batch, rows, cols, dim).mean(dim=2)  # every row has W cells: equal weights
    return F.adaptive_avg_pool1d(row_means.transpose(1, 2), stripes).transpose(1, 2)


def _global_branch(spec: str, num_branches: int) -> int | None:
    if spec == "mean":
        return None
    index = int(spec[3:]) - 1
    if not 0 <= index < num_branches:
        raise ValueError(f"model.tmgf_global={spec!r}, but the model has {num_branches} branch(es)")
    return index


# ----------------------------------------------------------------------------------------------
# Model


@register_model("tmgf")
class TMGF(nn.Module):
    """TMGF's ViT: IBN stem, camera embedding, L-1 shared blocks, per-branch copies of block L + LN,
    stripe parts, one frozen-bias BN per output, L2 normalisation (see the module doc).

    Reads ``backbone``, ``img_size``, ``drop_path_rate``, ``pretrained``/``pretrained_grid``, ``num_cams``,
    ``cam_embed_coef`` and the ``tmgf_*`` fields; PAT's ``num_parts``, ``part_regions``, ``neck_feat`` and
    ``freeze_patch_embed`` do not apply (TMGF trains its stem; only the BN-neck biases are frozen).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = 0) -> None:
        super().__init__()
        if num_classes != 0:
            raise ValueError(f"num_classes={num_classes}; tmgf has no classifier (build it with num_classes=0)")
        if cfg.num_cams < 1:
            raise ValueError(f"model.num_cams={cfg.num_cams}; tmgf needs the number of cameras (> 0) "
                             "for its camera embedding")
        kwargs: dict[str, Any] = {"embed_layer": IBNStemPatchEmbed} if cfg.tmgf_stem == "ibn" else {}
        self.backbone = build_vit(cfg.backbone, cfg.img_size, drop_path_rate=cfg.drop_path_rate, **kwargs)
        if self.backbone.num_prefix_tokens != 1 or len(self.backbone.blocks) < 1:
            raise ValueError(f"backbone {cfg.backbone!r}: tmgf needs exactly one prefix (cls) token and >= 1 block")
        self.feat_dim = int(self.backbone.embed_dim)
        self.grid = grid_size(self.backbone)
        self.num_cams = int(cfg.num_cams)
        self.cam_embed_coef = float(cfg.cam_embed_coef)
        self.granularities = tuple(int(g) for g in cfg.tmgf_granularities)
        too_fine = [g for g in self.granularities if g > self.grid[0]]
        if too_fine:
            raise ValueError(f"model.tmgf_granularities={list(self.granularities)}: {too_fine[0]} stripes do not fit "
                             f"the {self.grid[0]}-row grid of img_size {tuple(cfg.img_size)}")
        self.duplicate_last_block = bool(cfg.tmgf_duplicate_last_block)
        num_branches = max(1, len(self.granularities)) if self.duplicate_last_block else 1
        # Branch whose tokens each partition pools (all on branch 0 without duplication).
        self.part_branch = tuple(i if self.duplicate_last_block else 0 for i in range(len(self.granularities)))
        self.global_branch = _global_branch(cfg.tmgf_global, num_branches)
        self.num_parts = sum(self.granularities)
        self.num_slots = 1 + self.num_parts

        self.cam_embed: nn.Parameter | None = None
        if self.cam_embed_coef > 0:
            self.cam_embed = nn.Parameter(torch.zeros(self.num_cams, 1, self.feat_dim))
            nn.init.trunc_normal_(self.cam_embed, std=0.02)

        last, norm = self.backbone.blocks[-1], self.backbone.norm
        self.branches = nn.ModuleList(
            nn.Sequential(OrderedDict(block=copy.deepcopy(last), norm=copy.deepcopy(norm))) for _ in range(num_branches)
        )
        # The trunk's block L / LayerNorm only seed the branches (reseed_branches): never run, never trained.
        last.requires_grad_(False)
        norm.requires_grad_(False)
        self.necks = nn.ModuleList(frozen_bias_bn(self.feat_dim) for _ in range(self.num_slots))

    # -- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def reseed_branches(self) -> None:
        """Copy the trunk's block L and final LayerNorm into every branch (values only)."""
        for branch in self.branches:
            branch.get_submodule("block").load_state_dict(self.backbone.blocks[-1].state_dict())
            branch.get_submodule("norm").load_state_dict(self.backbone.norm.state_dict())

    def load_pretrained_weights(self, path: str | Path, *, old_grid: tuple[int, int] | None = None) -> LoadReport:
        """Load a TransReID(-SSL) or timm ViT checkpoint into the backbone, then re-seed the branches;
        or one of our own whole-TMGF checkpoints (see :meth:`load_tmgf_weights`)."""
        state = read_state_dict(path)
        if any(k.startswith("branches.") for k in state):
            return self.load_tmgf_weights(state, path)
        report = load_pretrained(self, path, old_grid=old_grid, rename=transreid_key, allow_missing=OPTIONAL_STEM_KEYS)
        self.reseed_branches()
        return report

    @torch.no_grad()
    def load_tmgf_weights(self, state: Mapping[str, torch.Tensor], path: str | Path) -> LoadReport:
        """Load a whole TMGF model of ours (e.g. ``model_final.safetensors`` of a source-domain or w/ GT run).

        Everything is copied as it is (trained branches and necks are kept: no re-seeding), except the
        camera embedding: cameras are dataset-specific (the same rule as for TransReID's ``sie_embed``),
        so it keeps its initialisation and is listed in ``skipped``. Any other missing, unexpected or
        mis-shaped key raises one error listing them all (continuing a run is a resume, not this).
        """
        report = LoadReport(path=str(path))
        own = self.state_dict()
        misfit = fit_errors(own, state, ignore=CAMERA_KEYS)
        if misfit:
            raise WeightsError(f"{path}: a TMGF checkpoint that does not fit this TMGF model ({misfit}); pass a TMGF "
                               "model of the same backbone, img_size, granularities and variant, or model.pretrained="
                               "'' to train from scratch")
        for key, value in state.items():
            if key in CAMERA_KEYS:
                report.skipped.append(key)
                continue
            own[key].copy_(value.to(dtype=own[key].dtype))
            report.loaded.append(key)
        return report

    # -- forward -------------------------------------------------------------------------------
    def _check_camid(self, camid: torch.Tensor, batch: int) -> None:
        if camid.shape != (batch,) or camid.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"camid must be an integer tensor of shape ({batch},), got {camid.dtype} "
                             f"{tuple(camid.shape)}")
        lo, hi = (int(v) for v in torch.aminmax(camid))
        if lo < 0 or hi >= self.num_cams:
            raise ValueError(f"camid values span [{lo}, {hi}], but model.num_cams={self.num_cams} "
                             f"(0-based camera ids must be < num_cams)")

    def trunk(self, img: torch.Tensor, camid: torch.Tensor) -> torch.Tensor:
        """B x (1+N) x D tokens after blocks 1..L-1, without the final LayerNorm."""
        bb = self.backbone
        assert bb.cls_token is not None and bb.pos_embed is not None  # timm's defaults, kept by build_vit
        self._check_camid(camid, img.shape[0])
        x = bb.patch_embed(img)
        x = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + bb.pos_embed
        if self.cam_embed is not None:
            x = x + self.cam_embed_coef * self.cam_embed[camid.to(self.cam_embed.device, torch.long)]
        x = bb.norm_pre(bb.pos_drop(x))
        for blk in list(bb.blocks)[:-1]:
            x = blk(x)
        return x

    def branch_tokens(self, img: torch.Tensor, camid: torch.Tensor) -> list[torch.Tensor]:
        """Per branch: B x (1+N) x D tokens after its block L copy and LayerNorm copy."""
        x = self.trunk(img, camid)
        return [branch(x) for branch in self.branches]

    def raw_features(self, img: torch.Tensor, camid: torch.Tensor) -> torch.Tensor:
        """B x S x D outputs before their BatchNorm: [global, parts of b1 top..bottom, b2 ...]."""
        outs = self.branch_tokens(img, camid)
        if self.global_branch is None:
            glob = torch.stack([o[:, 0] for o in outs]).mean(dim=0)
        else:
            glob = outs[self.global_branch][:, 0]
        feats = [glob.unsqueeze(1)]
        for stripes, b in zip(self.granularities, self.part_branch):
            feats.append(stripe_pool(outs[b][:, 1:], self.grid, stripes))
        return torch.cat(feats, dim=1)

    def forward(self, img: torch.Tensor, camid: torch.Tensor) -> torch.Tensor:
        """B x S x D: each slot through its frozen-bias BN, then L2-normalised."""
        raw = self.raw_features(img, camid)
        out = torch.stack([neck(raw[:, i]) for i, neck in enumerate(self.necks)], dim=1)
        return F.normalize(out, dim=-1)

    def extra_repr(self) -> str:
        glob = "mean" if self.global_branch is None else f"cls{self.global_branch + 1}"
        return (f"grid={self.grid}, granularities={list(self.granularities)}, branches={len(self.branches)}, "
                f"global={glob}, num_cams={self.num_cams}, cam_embed_coef={self.cam_embed_coef}")
