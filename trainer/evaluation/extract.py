"""Exact-once distributed feature extraction.

Every rank runs the model over its own *disjoint* slice of the dataset (the exact-once inference
sampler gives rank ``r`` the contiguous rows ``dist.shard_range(n, r)``: no padding, no duplicates,
uneven counts allowed), then ``(index, feature)`` pairs are all-gathered with
``dist.all_gather_variable`` and placed by index. The result is identical on every rank and equal
to a single-process pass, whatever the world size. Every index ``0 … n-1`` must arrive exactly
once; anything else (a padding sampler, a dropped last batch, a wrong ``num_samples``) is an error,
never a silently shifted feature matrix.

``gather=False`` keeps the features where they were computed: only the indices are all-gathered (the
exact-once check still covers every rank) and each rank gets its own rows ``dist.shard_range(n)``,
for work that divides by the world size (the queries of a sharded evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trainer import dist


def _check_batch(batch: Any, keys: Sequence[str]) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"extraction loader: expected dict batches with 'img' and 'index', got {type(batch).__name__}")
    for key in ("img", "index", *keys):
        if key not in batch:
            raise KeyError(f"extraction loader: batch has no key {key!r} (has {sorted(batch)})")


def _gather_rows(local: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """All-gather ``[n_r, width]`` rows of every rank, in rank order (a rank may hold none)."""
    comm = dist.comm_device()
    if local.numel() == 0:
        local = torch.zeros((0, width), dtype=dtype)
    return dist.all_gather_variable(local.to(comm, dtype)).reshape(-1, width)


@torch.no_grad()
def extract(model_fn: Callable[..., torch.Tensor], loader: Iterable[Mapping[str, Any]],
            num_samples: int, device: torch.device | str | None = None, *, keys: Sequence[str] = (),
            inputs: Sequence[str] = ("img",), out_device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, gather: bool = True) -> dict[str, torch.Tensor]:
    """Features (and per-sample ``keys`` such as ``pid``/``camid``) of all ``num_samples`` rows, by index.

    Args:
        model_fn: maps the ``inputs`` (``img``: ``B×3×H×W`` on ``device``) to features ``B×D``. An ``nn.Module`` is
            put in eval mode for the pass and restored afterwards; any other callable is called as is.
        loader: yields dict batches with ``img`` and ``index`` (int64 global row, the batch contract);
            on each rank it must cover that rank's disjoint share of ``0 … num_samples-1``.
        num_samples: size of the dataset (rows of the result).
        device: where the model runs (default: this rank's device from ``trainer.dist``).
        keys: extra per-sample integer fields to return, each a 1-D batch tensor (e.g. ``pid``).
        inputs: batch fields passed to ``model_fn`` positionally, moved to ``device`` (TMGF's camera
            embedding needs ``("img", "camid")``).
        out_device: where the returned tensors live.
        dtype: feature dtype of the result (features are cast after the model, e.g. from bf16).
        gather: ``False`` returns only this rank's rows ``dist.shard_range(num_samples)`` (index order),
            which its loader must have given it (the exact-once inference sampler does); only the
            indices are exchanged.

    Returns:
        ``{"features": Tensor[num_samples, D], key: Tensor[num_samples] …}`` — the same on every rank
        (``gather=False``: ``stop - start`` rows of this rank's share).

    Raises:
        RuntimeError: if an index is missing, duplicated or out of range, or (``gather=False``) a rank
            got other rows than its share (on every rank alike).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples}: expected >= 0")
    device = torch.device(device) if device is not None else dist.info().device
    module = model_fn if isinstance(model_fn, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    idx_parts: list[torch.Tensor] = []
    feat_parts: list[torch.Tensor] = []
    key_parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    try:
        for batch in loader:
            _check_batch(batch, (*keys, *inputs))
            index = torch.as_tensor(batch["index"]).reshape(-1).long()
            feats = model_fn(*(torch.as_tensor(batch[k]).to(device, non_blocking=True) for k in inputs))
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != index.numel():
                shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
                raise ValueError(f"model_fn returned {shape} for a batch of {index.numel()} images: "
                                 "expected a B×D feature tensor")
            idx_parts.append(index.cpu())
            feat_parts.append(feats.detach().to("cpu", dtype))
            for k in keys:
                v = torch.as_tensor(batch[k]).reshape(-1)
                if v.numel() != index.numel():
                    raise ValueError(f"batch[{k!r}] has {v.numel()} values for {index.numel()} images: "
                                     "expected one per sample")
                key_parts[k].append(v.long().cpu())
    finally:
        if module is not None:
            module.train(was_training)

    # Every rank must agree on the feature width, including ranks that got no samples.
    local_width = feat_parts[0].shape[1] if feat_parts else 0
    width_t = torch.tensor([local_width], dtype=torch.long, device=dist.comm_device())
    width = int(dist.all_reduce(width_t, op="max").item())
    if feat_parts and any(f.shape[1] != width for f in feat_parts):
        raise ValueError(f"feature widths differ across batches or ranks (expected {width})")

    local_idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long)
    local_feat = torch.cat(feat_parts) if feat_parts else torch.zeros((0, width), dtype=dtype)
    index = _gather_rows(local_idx[:, None], 1, torch.long).reshape(-1).cpu()
    _check_exactly_once(index, num_samples)
    out_device = torch.device(out_device)
    if not gather:
        return _own_rows(local_idx, local_feat, key_parts, num_samples, out_device)
    place = index.to(out_device)
    features = _gather_rows(local_feat, width, dtype).to(out_device)
    out = torch.empty((num_samples, width), dtype=dtype, device=out_device)
    result = {"features": out.index_copy_(0, place, features)}
    for k in keys:
        local = torch.cat(key_parts[k]) if key_parts[k] else torch.zeros(0, dtype=torch.long)
        values = _gather_rows(local[:, None], 1, torch.long).reshape(-1).to(out_device)
        result[k] = torch.empty(num_samples, dtype=torch.long, device=out_device).index_copy_(0, place, values)
    return result


def _own_rows(local_idx: torch.Tensor, local_feat: torch.Tensor, key_parts: dict[str, list[torch.Tensor]],
              num_samples: int, out_device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's share ``dist.shard_range(num_samples)``, placed by index (no features exchanged)."""
    start, stop = dist.shard_range(num_samples)
    own = local_idx.numel() == stop - start and bool(((local_idx >= start) & (local_idx < stop)).all())
    # Agreed by every rank (W flags): a rank holding the wrong rows must not stop alone.
    wrong = torch.zeros(dist.get_world_size(), dtype=torch.long, device=dist.comm_device())
    wrong[dist.get_rank()] = int(not own)
    bad = torch.nonzero(dist.all_reduce(wrong)).flatten().tolist()
    if bad:
        raise RuntimeError(f"feature extraction with gather=False: rank(s) {bad} did not get their own contiguous "
                           f"rows dist.shard_range({num_samples}); use the exact-once inference sampler")
    place = (local_idx - start).to(out_device)  # exact-once + own range: a permutation of 0 … stop-start-1
    rows = stop - start
    result = {"features": torch.empty((rows, local_feat.shape[1]), dtype=local_feat.dtype, device=out_device)
              .index_copy_(0, place, local_feat.to(out_device))}
    for k, parts in key_parts.items():
        values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        result[k] = torch.empty(rows, dtype=torch.long, device=out_device).index_copy_(0, place, values.to(out_device))
    return result


def _check_exactly_once(index: torch.Tensor, num_samples: int) -> None:
    bad = (index < 0) | (index >= num_samples)
    if bool(bad.any()):
        raise RuntimeError(f"feature extraction: index {int(index[bad][0])} outside [0, {num_samples}) "
                           "(num_samples does not match the dataset?)")
    counts = torch.bincount(index, minlength=num_samples)
    if bool((counts != 1).any()):
        missing = torch.nonzero(counts == 0).flatten()
        dup = torch.nonzero(counts > 1).flatten()
        raise RuntimeError(
            f"feature extraction is not exact-once over {num_samples} samples: {missing.numel()} missing "
            f"(e.g. {missing[:5].tolist()}), {dup.numel()} duplicated (e.g. {dup[:5].tolist()}); "
            "use the exact-once inference sampler (contiguous disjoint slices, no padding, no drop_last)")


def extract_features(model_fn: Callable[..., torch.Tensor], loader: Iterable[Mapping[str, Any]],
                     num_samples: int, device: torch.device | str | None = None, *,
                     inputs: Sequence[str] = ("img",), out_device: torch.device | str = "cpu",
                     gather: bool = True) -> torch.Tensor:
    """``Tensor[num_samples, D]`` of features by index, gathered on every rank (see :func:`extract`;
    ``gather=False``: this rank's rows ``dist.shard_range(num_samples)`` only)."""
    return extract(model_fn, loader, num_samples, device, inputs=inputs, out_device=out_device,
                   gather=gather)["features"]


__all__ = ["extract", "extract_features"]
