"""PAT (Ni et al., ICCV 2023): a ViT with part tokens and part-aware attention, plus the plain ViT baseline.

Tokens are ``[cls, p_1..p_P, patches]``. The part tokens are the backbone's timm register tokens, so
the position table is ``[cls, p_1..p_P, grid]`` and a pretrained cls position seeds every part row
(``weights.load_pretrained``). Every block runs ONE fused ``scaled_dot_product_attention`` with the
boolean mask of :func:`part_attention_mask` (True = may attend; rows are queries, columns keys):

* cls and the patches attend to each other (global attention);
* cls <-> every part token, both ways (the official code; without these links, ``cls_part_links=False``,
  cls attends to itself and the patches only, as the paper's Eq. 3 writes it, and a part to itself
  and its region only, as Eq. 4 writes it);
* part p <-> itself and the patches of its region R_p, both ways (region patches see their part);
* part tokens never see each other.

The official code masks with ``masked_fill(-1000)``, softmax, then multiplies by the mask (weights
of disallowed keys ~e^-1000, zeroed afterwards, no renormalisation). A boolean SDPA mask gives
disallowed keys exactly zero weight and normalises over the allowed ones: the intended semantics;
the two differ by ~e^-1000 relative.

Regions (the official code's, generalised to an H x W grid and P parts): band p has height H/2 (floor) and
top T_p = round(p (H - H/2) / (P - 1)) (0, 4, 8 for P=3, H=16; the centred band for P=1).
``random`` reproduces the official draw: two distinct columns from {0..W} and two distinct rows from
{T_p..T_p+H/2}, each pair sorted, the inclusive rectangle clipped to the grid; one draw per forward,
shared by the whole batch and all blocks. ``fixed`` is the full band: rows T_p..T_p+H/2-1 and every
column. (The official commented-out test line spans rows T_p..T_p+H/2 inclusive, one row too many;
``fixed_band_extra_row=True`` reproduces it.) The draw uses a ``torch.Generator`` owned by the model
(its state rides in ``state_dict`` as extra state), so runs are reproducible and resumable. At
256x128 (a 16x8 grid) the full bands are three overlapping 8x8 squares: the paper's "three
overlapping square areas along the vertical direction" (§3.1) are ``part_regions="fixed"``.

For conventional self-distillation (PAT Table 5's "B+SD") a model with ``emit_block_logits = True``
(set by the method) also returns, in training, the classifier's logits for the cls token of every
block but the last (:attr:`ModelOutput.blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainer.config import REGION_MODES, ModelConfig

from .backbones import build_vit, check_maskable, grid_size, masked_block_forward
from .heads import BNNeck
from .registry import register_model


class ModelOutput(NamedTuple):
    """Training-mode output of the re-id models (a tuple, so DDP and DeepSpeed pass it through)."""

    logits: torch.Tensor
    """B x C identity logits: bias-free classifier on BN(cls)."""
    cls: torch.Tensor
    """B x D last-layer cls token after the final LayerNorm, before the BN-neck (triplet feature)."""
    parts: torch.Tensor | None
    """B x P x D last-layer part tokens after the final LayerNorm (CSL/PSD features); None without parts."""
    blocks: torch.Tensor | None = None
    """(L-1) x B x C logits of blocks 1..L-1's cls token through the final LayerNorm and the BN-neck
    classifier (this batch's BN statistics; running statistics untouched); None unless
    ``emit_block_logits``."""


# ----------------------------------------------------------------------------------------------
# Regions and the mask


@dataclass(frozen=True)
class PartRegion:
    """Inclusive rectangle of grid cells (row-major patch index = row * W + col)."""

    top: int
    bottom: int
    left: int
    right: int

    def cells(self, grid: tuple[int, int]) -> list[int]:
        """Patch indices (0-based, within the patch sequence) covered by the region."""
        _, cols = grid
        return [r * cols + c for r in range(self.top, self.bottom + 1) for c in range(self.left, self.right + 1)]


def band_height(grid_rows: int) -> int:
    """Rows of a nominal part band: half the grid (8 of 16)."""
    return max(1, grid_rows // 2)


def band_tops(grid_rows: int, num_parts: int) -> list[int]:
    """Top row of each band: evenly spaced from 0 to H - H/2 (rounded), centred for a single part."""
    span = grid_rows - band_height(grid_rows)
    if num_parts == 1:
        return [span // 2]
    return [(2 * p * span + num_parts - 1) // (2 * (num_parts - 1)) for p in range(num_parts)]


def fixed_regions(grid: tuple[int, int], num_parts: int, extra_row: bool = False) -> list[PartRegion]:
    """The full nominal bands (H/2 rows x all columns; H/2+1 rows, clipped, with ``extra_row``)."""
    rows, cols = grid
    bh = band_height(rows)
    last = bh if extra_row else bh - 1
    return [PartRegion(t, min(t + last, rows - 1), 0, cols - 1) for t in band_tops(rows, num_parts)]


def _sorted_pair(lo: int, hi: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct integers drawn uniformly from {lo..hi}, sorted (Python's ``sorted(random.sample(...))``)."""
    a, b = (torch.randperm(hi - lo + 1, generator=generator)[:2] + lo).tolist()
    return (a, b) if a < b else (b, a)


def random_regions(grid: tuple[int, int], num_parts: int, generator: torch.Generator) -> list[PartRegion]:
    """The official random sub-rectangle of each band (one draw per part, columns first)."""
    rows, cols = grid
    bh = band_height(rows)
    regions = []
    for top in band_tops(rows, num_parts):
        left, right = _sorted_pair(0, cols, generator)
        t, b = _sorted_pair(top, top + bh, generator)
        regions.append(PartRegion(t, min(b, rows - 1), left, min(right, cols - 1)))
    return regions


def region_membership(grid: tuple[int, int], regions: list[PartRegion],
                      device: torch.device | None = None) -> torch.Tensor:
    """P x (H*W) bool: does part p's region contain patch j."""
    rows, cols = grid
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    if not regions:
        return torch.zeros(0, rows * cols, dtype=torch.bool, device=device)
    box = torch.tensor([[g.top, g.bottom, g.left, g.right] for g in regions], device=device)
    return (r >= box[:, :1]) & (r <= box[:, 1:2]) & (c >= box[:, 2:3]) & (c <= box[:, 3:4])


def part_attention_mask(grid: tuple[int, int], regions: list[PartRegion], device: torch.device | None = None,
                        cls_part_links: bool = True) -> torch.Tensor:
    """N x N bool attention mask over ``[cls, p_1..p_P, patches]`` (N = 1 + P + H*W; True = attend).

    ``cls_part_links=False`` removes the cls <-> part entries (the paper's Eq. 3 and 4)."""
    num_parts = len(regions)
    num_patches = grid[0] * grid[1]
    n = 1 + num_parts + num_patches
    member = region_membership(grid, regions, device)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    glob = torch.ones(n, dtype=torch.bool, device=device)
    glob[1 : 1 + num_parts] = False
    mask |= glob[:, None] & glob[None, :]  # cls <-> patches
    parts = slice(1, 1 + num_parts)
    mask[parts, 0] = cls_part_links  # part -> cls
    mask[0, parts] = cls_part_links  # cls -> part
    idx = torch.arange(1, 1 + num_parts, device=device)
    mask[idx, idx] = True  # part -> itself (not the other parts)
    mask[parts, 1 + num_parts :] = member  # part -> its region
    mask[1 + num_parts :, parts] = member.t()  # region patches -> their part
    return mask


class PartRegionSampler(nn.Module):
    """Draws the part regions of one forward pass; its generator state is checkpointed as extra state."""

    def __init__(self, grid: tuple[int, int], num_parts: int, seed: int = 0, fixed_extra_row: bool = False) -> None:
        super().__init__()
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"part regions need a non-empty grid, got {grid}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_parts = int(num_parts)
        self.fixed_extra_row = bool(fixed_extra_row)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def sample(self, mode: str) -> list[PartRegion]:
        if mode == "fixed":
            return fixed_regions(self.grid, self.num_parts, self.fixed_extra_row)
        if mode == "random":
            return random_regions(self.grid, self.num_parts, self.generator)
        raise ValueError(f"part region mode {mode!r}; expected one of {REGION_MODES}")

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.to(device="cpu", dtype=torch.uint8))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_parts={self.num_parts}"


# ----------------------------------------------------------------------------------------------
# Models


def _freeze_patch_embed(backbone: VisionTransformer) -> None:
    for p in backbone.patch_embed.parameters():
        p.requires_grad_(False)


def neck_logits_batch_stats(head: BNNeck, feats: torch.Tensor) -> torch.Tensor:
    """``classifier(BN(feats))`` with this batch's BN statistics, leaving the running statistics as they
    are: earlier blocks' features must not move the test-time statistics of the final feature. Works for
    the BN the engine may have swapped in (SyncBatchNorm, GlobalBatchNorm), which honour the same flag."""
    if head.classifier is None:
        raise RuntimeError("block logits need a classifier: build the model with num_classes > 0")
    bn = head.bn
    keep = bn.track_running_stats
    bn.track_running_stats = False  # training-mode BN then normalises with batch statistics and stores none
    try:
        return head.classifier(bn(feats))
    finally:
        bn.track_running_stats = keep


def _block_logits(head: BNNeck, block_cls: list[torch.Tensor]) -> torch.Tensor:
    """(L-1) x B x C: each block's (LayerNorm-ed) cls through the neck, one BN batch per block."""
    return torch.stack([neck_logits_batch_stats(head, c) for c in block_cls])


@register_model("pat")
class PartAwareTransformer(nn.Module):
    """PAT: ViT + P part tokens + part-aware attention + BN-neck head.

    ``forward(img)``: training mode returns :class:`ModelOutput`; eval mode returns the B x D test
    feature (pre-BN cls for ``neck_feat='before'``, BN(cls) for ``'after'``), NOT L2-normalised: the
    evaluator normalises. Bank-facing attributes: ``feat_dim``, ``num_parts``.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if cfg.num_parts < 1:
            raise ValueError(f"model.num_parts={cfg.num_parts}; PAT needs at least one part token")
        self.cfg = cfg
        self.num_parts = cfg.num_parts
        self.backbone = build_vit(
            cfg.backbone, cfg.img_size, drop_path_rate=cfg.drop_path_rate, reg_tokens=cfg.num_parts
        )
        check_maskable(self.backbone)
        self.feat_dim = int(self.backbone.embed_dim)
        if cfg.tie_part_tokens:
            # One (1, 1, D) parameter broadcast to all P parts; pos rows stay per part.
            self.backbone.reg_token = nn.Parameter(torch.zeros(1, 1, self.feat_dim))
        # The official init of cls/part tokens (overwritten by pretrained weights).
        assert self.backbone.reg_token is not None  # reg_tokens=num_parts >= 1: timm built them
        nn.init.trunc_normal_(self.backbone.reg_token, std=0.02)
        self.grid = grid_size(self.backbone)
        self.regions = PartRegionSampler(self.grid, cfg.num_parts, cfg.region_seed, cfg.fixed_band_extra_row)
        self.head = BNNeck(self.feat_dim, num_classes)
        if cfg.freeze_patch_embed:
            _freeze_patch_embed(self.backbone)
        # ModelConfig.cls_part_links (True = the official links); read with a default so that a config
        # object from before the field existed builds the official model.
        self.cls_part_links = cfg.cls_part_links
        self.emit_block_logits = False
        """Training forward also returns :attr:`ModelOutput.blocks` (set by a method that needs them)."""
        self._fixed_masks: dict[torch.device, torch.Tensor] = {}

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """The mask for the next forward pass (draws new regions in ``random`` mode)."""
        mode = self.cfg.part_regions if self.training else self.cfg.test_part_regions
        links = self.cls_part_links
        if mode == "fixed":
            if device not in self._fixed_masks:
                self._fixed_masks[device] = part_attention_mask(self.grid, self.regions.sample("fixed"), device, links)
            return self._fixed_masks[device]
        return part_attention_mask(self.grid, self.regions.sample(mode), device, links)

    def forward_tokens(self, img: torch.Tensor, attn_mask: torch.Tensor | None,
                       block_cls: list[torch.Tensor] | None = None) -> torch.Tensor:
        """B x (1+P+H*W) x D tokens after the last block and the final LayerNorm; appends to ``block_cls``
        (when given) the LayerNorm-ed cls token after each block but the last."""
        bb = self.backbone
        # timm's optional tokens: this backbone was built with a cls token, part tokens and a pos embed
        assert bb.cls_token is not None and bb.reg_token is not None and bb.pos_embed is not None
        x = bb.patch_embed(img)
        batch = x.shape[0]
        prefix = torch.cat(
            [bb.cls_token.expand(batch, -1, -1), bb.reg_token.expand(batch, self.num_parts, -1)], dim=1
        )
        x = torch.cat([prefix, x], dim=1) + bb.pos_embed
        x = bb.norm_pre(bb.pos_drop(x))
        last = len(bb.blocks) - 1
        for i, blk in enumerate(bb.blocks):
            x = masked_block_forward(blk, x, attn_mask)
            if block_cls is not None and i < last:
                block_cls.append(bb.norm(x[:, 0]))  # LayerNorm is per token: the cls row of norm(x)
        return bb.norm(x)

    def forward(self, img: torch.Tensor) -> ModelOutput | torch.Tensor:
        block_cls: list[torch.Tensor] | None = [] if self.training and self.emit_block_logits else None
        tokens = self.forward_tokens(img, self.attention_mask(img.device), block_cls)
        cls = tokens[:, 0]
        feat_bn, logits = self.head(cls)
        if not self.training:
            return feat_bn if self.cfg.neck_feat == "after" else cls
        if logits is None:
            raise RuntimeError("training forward needs a classifier: build the model with num_classes > 0")
        blocks = None if block_cls is None else _block_logits(self.head, block_cls)
        return ModelOutput(logits=logits, cls=cls, parts=tokens[:, 1 : 1 + self.num_parts], blocks=blocks)


@register_model("vit")
class ViTBaseline(nn.Module):
    """The baseline of PAT's Table 5: the same ViT and BN-neck, no part tokens (timm's own forward)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_parts = 0
        self.backbone = build_vit(cfg.backbone, cfg.img_size, drop_path_rate=cfg.drop_path_rate)
        self.feat_dim = int(self.backbone.embed_dim)
        self.grid = grid_size(self.backbone)
        self.head = BNNeck(self.feat_dim, num_classes)
        if cfg.freeze_patch_embed:
            _freeze_patch_embed(self.backbone)
        self.emit_block_logits = False
        """Training forward also returns :attr:`ModelOutput.blocks` (set by a method that needs them)."""

    def forward(self, img: torch.Tensor) -> ModelOutput | torch.Tensor:
        blocks = None
        if self.training and self.emit_block_logits:
            # timm's own per-block pass (the same ops as forward_features) keeps every block's tokens
            # timm annotates the union of all its return shapes; this call returns (final, [(spatial, prefix)])
            final, per_block = cast(tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]],
                                    self.backbone.forward_intermediates(img, return_prefix_tokens=True,
                                                                        output_fmt="NLC"))
            cls = final[:, 0]
            block_cls = [self.backbone.norm(prefix[:, 0]) for _, prefix in per_block[:-1]]
        else:
            cls = self.backbone.forward_features(img)[:, 0]
        feat_bn, logits = self.head(cls)
        if not self.training:
            return feat_bn if self.cfg.neck_feat == "after" else cls
        if logits is None:
            raise RuntimeError("training forward needs a classifier: build the model with num_classes > 0")
        if self.emit_block_logits:
            blocks = _block_logits(self.head, block_cls)
        return ModelOutput(logits=logits, cls=cls, parts=None, blocks=blocks)
