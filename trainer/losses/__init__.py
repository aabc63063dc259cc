"""Losses: PAT's CSL (sharded bank), PSD, batch-hard triplet, label-smoothed CE; TMGF/O2CAP's
offline and online association losses on camera-aware proxy memories."""

from __future__ import annotations

from trainer.losses.csl import CSLOutput, communication_bytes, csl_from_gathered, csl_loss, csl_loss_reference, csl_step
from trainer.losses.id import label_smooth_ce
from trainer.losses.o2cap import (
    O2CAPLossConfig,
    ProxyTables,
    offline_association_loss,
    online_association_loss,
    tmgf_loss,
)
from trainer.losses.psd import (
    PATLossOutput,
    neighbour_distribution,
    neighbour_labels,
    pat_total,
    psd_loss,
)
from trainer.losses.triplet import euclidean_dist, hard_example_mining, triplet_loss

__all__ = [
    "CSLOutput", "communication_bytes", "csl_from_gathered", "csl_loss", "csl_loss_reference", "csl_step",
    "label_smooth_ce", "PATLossOutput", "neighbour_distribution", "neighbour_labels",
    "pat_total", "psd_loss", "euclidean_dist", "hard_example_mining", "triplet_loss", "O2CAPLossConfig",
    "ProxyTables", "offline_association_loss", "online_association_loss", "tmgf_loss",
]
