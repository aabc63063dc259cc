"""Vision-transformer backbones, built by timm, and the one block forward timm cannot give us.

Every backbone is a plain ``timm.models.vision_transformer.VisionTransformer`` with no classifier
head (``num_classes=0``), so its parameter names are timm's and timm checkpoints load by name.
Extra leading tokens (PAT's part tokens) are timm *register tokens* (``reg_tokens=P``): timm then
lays the position table out as ``[cls, reg_1..reg_P, grid]``, exactly PAT's
``[cls, p_1..p_P, patches]`` with its own position row for every part token.

``masked_block_forward`` runs one timm ``Block`` with a boolean attention mask as a single fused
``scaled_dot_product_attention`` call. It reuses the block's own modules (norm1, attn.qkv,
attn.proj, norm2, mlp, layer-scale, drop-path) and so computes exactly what the block computes;
it exists because older timm 1.0.x blocks take no mask and because timm falls back to an unfused
path when its fused-attention switch is off (``TIMM_FUSED_ATTN=0``), which PAT must not silently do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainer.models.stochastic import seed_drop_paths

BackboneBuilder = Callable[..., VisionTransformer]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register ``fn(img_size, drop_path_rate, reg_tokens, **kwargs) -> VisionTransformer`` as ``name``."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_vit`."""
    return sorted(_BACKBONES)


def _timm_vit(arch: str) -> BackboneBuilder:
    def build(img_size: tuple[int, int], drop_path_rate: float, reg_tokens: int, **kwargs: Any) -> VisionTransformer:
        # pretrained=False: weights only ever come from a local file (weights.load_pretrained), never the hub.
        # create_model is typed as returning any Module; every arch registered here is a VisionTransformer
        return cast(VisionTransformer, timm.create_model(
            arch,
            pretrained=False,
            img_size=img_size,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            reg_tokens=reg_tokens,
            **kwargs,
        ))

    return build


for _arch in (
    "vit_base_patch16_224",
    "vit_small_patch16_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
):
    register_backbone(_arch)(_timm_vit(_arch))


@register_backbone("vit_test")
def vit_test(img_size: tuple[int, int], drop_path_rate: float, reg_tokens: int, **kwargs: Any) -> VisionTransformer:
    """Tiny ViT for tests and smoke runs: patch 16, width 64, depth 2, 2 heads (same layer types as ViT-B)."""
    kwargs = {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "qkv_bias": True,
              **kwargs}
    return VisionTransformer(
        img_size=img_size, num_classes=0, drop_path_rate=drop_path_rate, reg_tokens=reg_tokens, **kwargs
    )


def build_vit(
    arch: str,
    img_size: tuple[int, int] | list[int],
    *,
    drop_path_rate: float = 0.1,
    reg_tokens: int = 0,
    **kwargs: Any,
) -> VisionTransformer:
    """Build backbone ``arch`` for ``img_size`` (H, W) with ``reg_tokens`` extra tokens after cls.

    ``kwargs`` go to timm's ``VisionTransformer`` (e.g. ``embed_layer`` for a conv stem). Stochastic
    depth grows linearly from 0 to ``drop_path_rate`` over the blocks (timm's rule, PAT's too); its
    masks are drawn per sample (:mod:`trainer.models.stochastic`).
    """
    if arch not in _BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; expected one of {available_backbones()}")
    size = tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"img_size must be (height, width) with positive entries, got {img_size!r}")
    vit = _BACKBONES[arch](img_size=size, drop_path_rate=float(drop_path_rate), reg_tokens=int(reg_tokens), **kwargs)
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.no_embed_class:
        raise ValueError(f"backbone {arch!r} must be a timm VisionTransformer with a class token and "
                         "a position row for it (no_embed_class=False)")
    seed_drop_paths(vit)  # masks per sample, not per rank (trainer/models/stochastic.py)
    return vit


def grid_size(vit: VisionTransformer) -> tuple[int, int]:
    """Patch grid (rows, cols) of a built backbone."""
    rows, cols = vit.patch_embed.grid_size
    return int(rows), int(cols)


def masked_block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm timm ViT ``Block`` on ``x`` (B×N×D) with a boolean ``attn_mask`` (N×N, True = attend).

    Rows of the mask are queries, columns keys; it is broadcast over batch and heads. Disallowed keys
    get exactly zero weight (softmax over the allowed keys only); every row must allow at least one key.
    """
    blk: Any = block  # timm's submodules are dynamic attributes (``Tensor | Module`` to mypy)
    attn = blk.attn
    batch, tokens, _ = x.shape
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    # SDPA's default scale is head_dim**-0.5, the same as timm's attn.scale.
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if blk.training else 0.0
    )
    o = o.transpose(1, 2).reshape(batch, tokens, -1)
    o = getattr(attn, "norm", nn.Identity())(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def check_maskable(vit: VisionTransformer) -> None:
    """Raise unless every block is a standard timm pre-norm block that ``masked_block_forward`` mirrors."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"blocks.{i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                            "part-aware attention needs timm's standard Block with Attention")
    if not isinstance(vit.patch_drop, nn.Identity):
        raise ValueError("patch dropout removes tokens and would break the part-attention mask; use patch_drop_rate=0")
