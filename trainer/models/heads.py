"""BN-neck heads (Luo et al.'s "bag of tricks" neck, as TransReID/PAT and TMGF use it).

The triplet loss sees the feature before the BatchNorm, the classifier the feature after it.
The BN bias is frozen at zero (``requires_grad=False``) so the BN only rescales: the classifier's
hyperplanes then pass through the origin, which suits the cosine/Euclidean ranking used at test.
"""

from __future__ import annotations

import torch
from torch import nn


def frozen_bias_bn(dim: int) -> nn.BatchNorm1d:
    """BatchNorm1d with weight 1, bias 0 and the bias frozen."""
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class BNNeck(nn.Module):
    """``feat -> (BN(feat), classifier(BN(feat)))``; the classifier is absent when ``num_classes == 0``."""

    def __init__(self, dim: int, num_classes: int = 0, classifier_std: float = 0.001) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.bn = frozen_bias_bn(dim)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            # Bias-free, N(0, 0.001): the init of TransReID/PAT's classifier.
            self.classifier = nn.Linear(dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=classifier_std)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat_bn = self.bn(feat)
        logits = self.classifier(feat_bn) if self.classifier is not None else None
        return feat_bn, logits
