"""TransReID-SSL's IBN convolutional stem as a timm patch embedding (TMGF's ``model.tmgf_stem=ibn``).

7x7/2 conv -> IBN -> 3x3 conv -> IBN -> 3x3 conv -> BN (ReLU after each), then a ``patch/2`` conv
projection: total stride ``patch`` (16: a 384x128 image gives a 24x8 grid).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STEM_WIDTH = 64
"""Channels of the IBN conv stem (TransReID-SSL's ``hidden_dim``)."""


class IBN(nn.Module):
    """Instance-Batch Normalisation (IBN-Net): InstanceNorm2d(affine) on the first ``channels // 2``
    channels, BatchNorm2d on the rest, concatenated back in order."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split_at = channels // 2
        self.inorm = nn.InstanceNorm2d(self.split_at, affine=True)
        self.bnorm = nn.BatchNorm2d(channels - self.split_at)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.split_at, x.shape[1] - self.split_at], dim=1)
        return torch.cat([self.inorm(a.contiguous()), self.bnorm(b.contiguous())], dim=1)


class IBNStem(nn.Module):
    """7x7/2 conv -> IBN -> ReLU -> 3x3 conv -> IBN -> ReLU -> 3x3 conv -> BN -> ReLU (convs bias-free)."""

    def __init__(self, in_chans: int = 3, width: int = STEM_WIDTH) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.norm1 = IBN(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = IBN(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)), inplace=True)
        x = F.relu(self.norm2(self.conv2(x)), inplace=True)
        return F.relu(self.norm3(self.conv3(x)), inplace=True)


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class IBNStemPatchEmbed(nn.Module):
    """timm ``embed_layer``: IBN stem (stride 2) then a ``patch/2`` conv projection: stride ``patch`` in all.

    Provides what timm's ``VisionTransformer`` reads from a patch embedding (``img_size``,
    ``patch_size``, ``grid_size``, ``num_patches``) and returns B x N x D tokens, row-major.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        if unsupported or dynamic_img_pad:
            raise ValueError(f"IBNStemPatchEmbed supports fixed-size inputs only; got {sorted(unsupported)}"
                             f"{' and dynamic_img_pad' if dynamic_img_pad else ''}")
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if any(p % 2 for p in self.patch_size):
            raise ValueError(f"IBN stem needs an even patch size (stem stride 2), got {self.patch_size}")
        kernel = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.stem = IBNStem(in_chans, STEM_WIDTH)
        self.proj = nn.Conv2d(STEM_WIDTH, embed_dim, kernel_size=kernel, stride=kernel, bias=bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        # Conv arithmetic: 7x7/2 pad 3, then kernel = stride = patch/2.
        stem_hw = [(s - 1) // 2 + 1 for s in self.img_size]
        self.grid_size = (stem_hw[0] // kernel[0], stem_hw[1] // kernel[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if self.num_patches == 0:
            raise ValueError(f"img_size {self.img_size} is smaller than one patch {self.patch_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model was built for img_size {self.img_size}")
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)
