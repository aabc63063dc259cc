"""Data: packed shards → sample store (multi-source merge) → transforms → samplers → batches.

The batch contract every loader yields: ``img`` (float32 B×3×H×W, normalised), ``pid`` (int64;
relabelled 0..C−1 over all sources for training, original for query/gallery), ``camid`` (int64,
offset per source), ``domain`` (int64 source id), ``index`` (int64 global index).
"""

from __future__ import annotations

from shards.reader import ShardError
from trainer.data.catalogue import SampleIndex, SourceInfo
from trainer.data.dataset import ReIDDataset, decode, sample_seeds
from trainer.data.loader import SeededBatchSampler, TrainLoader, build_inference_loader, build_train_loader
from trainer.data.samplers import InferenceSampler, PKSampler, class_uniform_epoch, pk_epoch
from trainer.data.store import SampleStore, WidsSampleStore
from trainer.data.transforms import (
    LGT,
    NORM_PRESETS,
    AugRNG,
    Pipeline,
    RandomErasing,
    TransformConfig,
    build_transforms,
    pat_config,
    tmgf_config,
)

__all__ = [
    "ReIDDataset", "decode", "sample_seeds", "SeededBatchSampler", "TrainLoader", "build_inference_loader",
    "build_train_loader", "InferenceSampler", "PKSampler", "pk_epoch", "class_uniform_epoch", "SampleIndex",
    "SampleStore", "ShardError",
    "SourceInfo", "WidsSampleStore", "NORM_PRESETS", "LGT", "AugRNG", "Pipeline", "RandomErasing",
    "TransformConfig", "build_transforms", "pat_config", "tmgf_config",
]
