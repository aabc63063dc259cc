"""DataLoader builders with the batch contract: a train loader over P×K batches, an exact-once inference loader.

Batches are dicts: ``img`` float32 B×3×H×W, ``pid``, ``camid``, ``domain``, ``index`` int64 (B,).

The store picks how a batch is made (``data.pipeline``, :mod:`trainer.data.decoded`): image by image
(:class:`ReIDDataset`: decode + transform per sample, then collate), or whole batches from a decoded
store (:class:`~trainer.data.decoded.DecodedBatches`: pixels out of the page cache, batched
augmentation) or from JPEG bytes decoded on the device (:class:`~trainer.data.decoded.JpegBatches`).
A training batch whose device is a GPU is augmented there: the workers hand over uint8 pixels (or
JPEG bytes) and the parameters drawn from the per-sample seeds, and the loader finishes the batch on
the device as it hands it over (:func:`~trainer.data.decoded.finish`). The augmented tensors are the
same on every path.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer import dist
from trainer.data.augment import BatchAugment
from trainer.data.catalogue import SampleIndex
from trainer.data.dataset import ReIDDataset, sample_seeds
from trainer.data.decoded import (
    DecodedBatches,
    DecodedSampleStore,
    DeviceDecodeStore,
    Finished,
    JpegBatches,
    as_batch,
    finish,
)
from trainer.data.samplers import InferenceSampler, PKSampler
from trainer.data.transforms import Pipeline


class SeededBatchSampler:
    """Wraps a :class:`PKSampler`: each local batch becomes ``[(index, augmentation seed), …]``.

    A seed depends on (seed, epoch, step, slot of the sample in the *global* batch), so the
    augmented global batch is the same for any world size and after a resume.
    """

    def __init__(self, sampler: PKSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        first_slot = s.rank * s.local_P * s.K
        for step, batch in s.iter_steps():
            seeds = sample_seeds(s.seed, s.epoch, step, first_slot + np.arange(len(batch))).tolist()
            yield list(zip(batch, seeds))

    def __len__(self) -> int:
        return len(self.sampler) - self.sampler.cursor


class _SeededIndices:
    """Wraps an index sampler: yields ``(index, seed)`` with the seed a function of (seed, index) only,
    so a random transform in an inference pass (e.g. PAT's bank initialisation) is the same for any
    world size and worker count."""

    def __init__(self, sampler: InferenceSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        idx = np.arange(self.sampler.start, self.sampler.stop)
        seeds = sample_seeds(self.seed, _INFERENCE_EPOCH, 0, idx)  # a stream disjoint from training's epochs
        return iter(zip(idx.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return len(self.sampler)


_INFERENCE_EPOCH = 1 << 62


def survive_foreign_sigterm(worker_id: int = 0) -> None:
    """worker_init_fn: this DataLoader worker ignores a SIGTERM that its rank did not send.

    scancel and SLURM preemption signal every process of the job step, torchrun the process group
    of each rank: the workers get the SIGTERM meant for the rank. Torch's worker handler exits on
    any SIGTERM, so the rank would die on "worker exited unexpectedly" instead of checkpointing at
    the next step boundary (``trainer.engine.stop.StopFlag``). Python handlers cannot see the
    sender, so SIGTERM is blocked here and a thread takes it with ``sigwaitinfo``: from the rank
    (its ``terminate()`` at shutdown) it exits as torch's handler does; from anyone else it is
    dropped — the rank got the same signal and stops the loader itself. Threads started later in
    the worker inherit the block.
    """
    del worker_id
    rank_pid = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == rank_pid:
                os._exit(0)

    threading.Thread(target=take, name="sigterm-from-rank", daemon=True).start()


class _WorkerSeeder:
    """worker_init_fn: global RNGs of worker w seeded from (seed, epoch, w) — for foreign transforms —
    and :func:`survive_foreign_sigterm`."""

    def __init__(self, seed: int, sampler: PKSampler | None) -> None:
        self.seed = seed
        self.sampler = sampler

    def __call__(self, worker_id: int) -> None:
        survive_foreign_sigterm()
        epoch = self.sampler.epoch if self.sampler is not None else 0  # read in the fresh worker: the current epoch
        # step slot 2**63 + worker id: a stream disjoint from the per-sample augmentation seeds
        base = int(sample_seeds(self.seed, epoch, 1 << 63, np.array([worker_id]))[0])
        random.seed(base)
        np.random.seed(base & 0xFFFFFFFF)
        torch.manual_seed(base & ((1 << 63) - 1))


class TrainLoader:
    """Iterable over one epoch of training batches; advances the sampler's consumed-batch cursor.

    ``for batch in loader`` yields the remaining batches of the current epoch and advances the
    sampler's cursor as each batch is handed over (prefetching workers run ahead, so the cursor
    cannot live in the sampler's iterator). :attr:`cursor` is the training position the engine
    reads after every step and checkpoints; :meth:`seek` puts it back on resume, so a checkpoint
    taken after k steps resumes at batch k exactly. ``state_dict``/``load_state_dict``/``set_epoch``
    delegate to the sampler.
    """

    def __init__(self, loader: DataLoader, sampler: PKSampler,
                 finisher: tuple[BatchAugment, torch.device] | None = None) -> None:
        self.loader = loader
        self.sampler = sampler
        self.finisher = finisher
        """(augmentation, device) that finish the workers' deferred batches; None: they come finished."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.sampler.advance(1)
            yield batch if self.finisher is None else finish(batch, *self.finisher)

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.sampler)

    @property
    def cursor(self) -> int:
        """Batches of the current epoch handed over to training (the sampler's cursor)."""
        return self.sampler.cursor

    def seek(self, epoch: int, step: int) -> None:
        """Stand at batch ``step`` of ``epoch`` (0: the epoch's start)."""
        self.sampler.seek(epoch, step)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_pids(self, pids: Any) -> None:
        self.sampler.set_pids(pids)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset


def _own_generator(seed: int) -> torch.Generator:
    """DataLoader draws a base seed per iterator from its generator, by default from torch's
    global RNG: a resumed run creates its iterator at another point of that stream than an
    uninterrupted one, which would shift every later random draw (dropout, drop-path)."""
    return torch.Generator().manual_seed(seed)


def _loader_kwargs(num_workers: int, pin_memory: bool | None, prefetch_factor: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
    if num_workers > 0 and prefetch_factor is not None:
        kw["prefetch_factor"] = prefetch_factor
    return kw


def _dataset(store: SampleIndex, transform: Callable[..., torch.Tensor],
             defer: bool) -> tuple[Dataset, BatchAugment | None]:
    """The dataset serving ``store`` through ``transform``, and the augmentation that finishes its batches
    on the device (None: the workers hand over finished batches). ``defer``: augment on the device (a
    decoded store's batches; a device-decode store's always are)."""
    if isinstance(store, (DecodedSampleStore, DeviceDecodeStore)):
        if not isinstance(transform, Pipeline):
            raise TypeError(f"data.pipeline with a {type(store).__name__}: the transform must be a Pipeline "
                            f"(build_transforms), got {type(transform).__name__}")
        augment = BatchAugment.from_pipeline(transform)
        if isinstance(store, DeviceDecodeStore):
            return JpegBatches(store, augment), augment
        return DecodedBatches(store, augment, defer=defer), augment if defer else None
    return ReIDDataset(store, transform), None


def build_train_loader(store: SampleIndex, transform: Callable[..., torch.Tensor], P: int, K: int, seed: int,
                       num_workers: int = 4, steps_per_epoch: int | None = None, pids: Any = None,
                       rank: int | None = None, world_size: int | None = None, pin_memory: bool | None = None,
                       prefetch_factor: int | None = None, persistent_workers: bool = False,
                       policy: str = "identity", device: torch.device | str | None = None) -> TrainLoader:
    """A :class:`TrainLoader` of this rank's P/W × K local batches (rank/world from ``trainer.dist``).

    ``pids`` overrides the store's labels (TMGF pseudo labels; ``< 0`` never sampled); ``policy``
    picks the pass semantics (``identity``: PAT's RandomIdentitySampler; ``class_uniform``: TMGF's
    proxy sampler, with ``steps_per_epoch=200``).
    Augmentation is seeded per sample, so ``persistent_workers`` does not change results; it is
    off by default so the per-epoch worker seeding of foreign transforms takes effect. ``device``: where
    training runs (default ``trainer.dist.info().device``); a decoded store's batches are augmented
    there when it is a GPU.
    """
    labels = store.pid if pids is None else np.asarray(pids)
    sampler = PKSampler(labels, P, K, seed=seed, world_size=world_size, rank=rank, steps_per_epoch=steps_per_epoch,
                        policy=policy)
    dev = dist.info().device if device is None else torch.device(device)
    dataset, augment = _dataset(store, transform, defer=dev.type != "cpu")
    loader = DataLoader(
        dataset,
        batch_sampler=SeededBatchSampler(sampler),
        collate_fn=None if isinstance(dataset, ReIDDataset) else as_batch,
        worker_init_fn=_WorkerSeeder(seed, sampler),
        generator=_own_generator(seed),
        persistent_workers=persistent_workers and num_workers > 0,
        **_loader_kwargs(num_workers, pin_memory, prefetch_factor),
    )
    return TrainLoader(loader, sampler, None if augment is None else (augment, dev))


def build_inference_loader(store: SampleIndex, transform: Callable[..., torch.Tensor], batch_size: int,
                           num_workers: int = 4, rank: int | None = None, world_size: int | None = None,
                           pin_memory: bool | None = None, seed: int = 0,
                           device: torch.device | str | None = None) -> DataLoader | Finished:
    """This rank's contiguous exact-once slice (``dist.shard_range``), in index order, last batch kept.

    Ranks get unequal counts when ``len(store)`` is not divisible by the world size: gather with
    ``dist.all_gather_variable`` and key by ``index``. A random ``transform`` (a train pipeline
    used for an inference pass) is seeded per sample from (``seed``, index): the pass gives the
    same tensors for any world size and number of workers. A decoded store's batches are augmented in
    the workers (CPU); a device-decode store's are decoded and augmented on ``device`` (default
    ``trainer.dist.info().device``) as they are handed over.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    dataset, augment = _dataset(store, transform, defer=False)
    loader = DataLoader(
        dataset,
        sampler=_SeededIndices(InferenceSampler(len(store), rank, world_size), seed),
        collate_fn=None if isinstance(dataset, ReIDDataset) else as_batch,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        generator=_own_generator(seed),
        worker_init_fn=survive_foreign_sigterm,
        **_loader_kwargs(num_workers, pin_memory, None),
    )
    if augment is None:
        return loader
    return Finished(loader, augment, dist.info().device if device is None else torch.device(device))


__all__ = ["SeededBatchSampler", "TrainLoader", "build_train_loader", "build_inference_loader"]
