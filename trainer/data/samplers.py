"""Batch samplers: the rank-aware identity (P×K) sampler and the exact-once inference sampler.

``PKSampler`` builds the *global* batch sequence of an epoch from (seed, epoch) alone, with the
semantics of the reference ``RandomIdentitySampler`` (docs/methods/pat.md §Data and recipe), and hands every rank whole
identities of each global batch (fast-reid's ``reorder_index`` idea), so the union of the ranks'
local batches at a step is exactly the global batch, whatever the world size. Its state is
(seed, epoch, cursor): a resumed run yields exactly the remaining batches of the epoch. The pass
semantics are pluggable: PAT's identity sampler, or TMGF's class-uniform sampler over proxy labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from trainer import dist


def _rng(*words: int) -> np.random.Generator:
    """An independent stream per tuple of non-negative integers (e.g. seed, epoch, round)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def pk_epoch(pids: np.ndarray, P: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """One pass of the reference ``RandomIdentitySampler``: ``(steps, P, K)`` global indices.

    Per pid: shuffle its indices (fewer than K → K drawn with replacement), cut into chunks of K,
    drop the remainder. Then, while at least P pids have chunks left, draw P distinct pids
    uniformly among them and take the next chunk of each. Samples with ``pid < 0`` (outliers)
    are never drawn. Cost: O(N log N) numpy for the chunks, O(P) Python work per batch.
    """
    pids = np.asarray(pids)
    valid = np.flatnonzero(pids >= 0)
    if len(valid) == 0:
        return np.zeros((0, P, K), dtype=np.int64)
    # group by pid with a random order inside each group: sort by (pid, random key)
    order = valid[np.lexsort((rng.random(len(valid)), pids[valid]))]
    uniq, starts, counts = np.unique(pids[order], return_index=True, return_counts=True)
    # chunk table: rows of K indices; big pids contribute counts // K rows, small pids one row
    n_chunks = np.where(counts >= K, counts // K, 1)
    chunk_start = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
    table = np.empty((int(n_chunks.sum()), K), dtype=np.int64)
    big = counts >= K
    if big.any():
        # chunk j of pid u takes order[starts[u] + j*K : starts[u] + (j+1)*K]
        pid_of_chunk = np.repeat(np.flatnonzero(big), n_chunks[big])
        j = np.arange(len(pid_of_chunk)) - np.repeat(np.cumsum(n_chunks[big]) - n_chunks[big], n_chunks[big])
        first = starts[pid_of_chunk] + j * K
        rows = chunk_start[pid_of_chunk] + j
        table[rows] = order[first[:, None] + np.arange(K)[None, :]]
    small = np.flatnonzero(~big)
    if len(small):
        draws = rng.integers(0, counts[small][:, None], size=(len(small), K))
        table[chunk_start[small]] = order[starts[small][:, None] + draws]
    # selection: avail[:n] holds pid slots with chunks left; partial Fisher-Yates picks P of them
    m = len(uniq)
    avail = np.arange(m)
    used = np.zeros(m, dtype=np.int64)
    n = m
    steps = int(n_chunks.sum()) // P  # upper bound (every batch uses P chunks), trimmed below
    out = np.empty((steps, P, K), dtype=np.int64)
    step = 0
    nc = n_chunks.tolist()
    cs = chunk_start.tolist()
    while n >= P:
        picks = rng.integers(np.arange(P), n)  # position j swaps with a uniform position in [j, n)
        av = avail  # local alias
        for j in range(P):
            r = int(picks[j])
            av[j], av[r] = av[r], av[j]
        sel = av[:P].copy()
        rows = [cs[u] + int(used[u]) for u in sel.tolist()]
        out[step] = table[rows]
        step += 1
        used[sel] += 1
        # remove exhausted pids by swapping them to the end, highest position first
        for pos in range(P - 1, -1, -1):
            u = int(av[pos])
            if used[u] == nc[u]:
                n -= 1
                av[pos], av[n] = av[n], av[pos]
    return out[:step]


def class_uniform_epoch(pids: np.ndarray, P: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """One pass of the reference ``ClassUniformlySampler`` (TMGF/O2CAP, docs/methods/tmgf.md §Recipe):
    ``(steps, P, K)``.

    Classes (``pid >= 0``) in random order, each exactly once: K of its images without
    replacement if it has at least K, else K drawn without replacement from its list repeated K
    times (duplicates allowed). Read in order as batches of P classes, the last partial batch
    dropped (``drop_last=True``).
    """
    pids = np.asarray(pids)
    valid = np.flatnonzero(pids >= 0)
    if len(valid) == 0:
        return np.zeros((0, P, K), dtype=np.int64)
    order = valid[np.lexsort((rng.random(len(valid)), pids[valid]))]  # each class's images shuffled
    uniq, starts, counts = np.unique(pids[order], return_index=True, return_counts=True)
    chunks = np.empty((len(uniq), K), dtype=np.int64)
    big = np.flatnonzero(counts >= K)
    chunks[big] = order[starts[big][:, None] + np.arange(K)[None, :]]
    small = np.flatnonzero(counts < K)
    if len(small):
        # the class's list repeated K times, shuffled, first K: the K smallest random keys of n·K copies
        reps = counts[small] * K
        owner = np.repeat(np.arange(len(small)), reps)
        member = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        keys = rng.random(len(owner))
        pick = np.lexsort((keys, owner))  # per class, copies in random order
        rank = np.arange(len(owner)) - np.repeat(np.cumsum(reps) - reps, reps)
        first = pick[rank < K]  # K per class, classes in order
        images = order[starts[small][owner[first]] + member[first] % counts[small][owner[first]]]
        chunks[small] = images.reshape(len(small), K)
    perm = rng.permutation(len(uniq))
    steps = len(uniq) // P
    return chunks[perm[: steps * P]].reshape(steps, P, K)


POLICIES = {"identity": pk_epoch, "class_uniform": class_uniform_epoch}
"""Pass generators by name: ``identity`` (PAT's RandomIdentitySampler), ``class_uniform`` (TMGF's proxy sampler)."""


class PKSampler:
    """Rank-aware P×K identity batch sampler (use as a DataLoader ``batch_sampler``).

    Args:
        pids: label per global index (relabelled pids, or pseudo labels; ``< 0`` = never drawn).
        P: identities per *global* batch (divisible by ``world_size``).
        K: images per identity.
        seed: the run seed; the global batch sequence of an epoch depends on (seed, epoch) only.
        world_size, rank: default to the process group's (``trainer.dist``).
        steps_per_epoch: fixed epoch length (TMGF: 200). The epoch's stream is the concatenation
            of passes seeded by (seed, epoch, round), round = 0, 1, … (the reference ``IterLoader``
            restarting its sampler), cut at this length. ``None``: one pass.
        policy: ``identity`` (default, :func:`pk_epoch`) or ``class_uniform``
            (:func:`class_uniform_epoch`, TMGF's sampler over proxy labels).

    Rank r receives identities ``r·P/W … (r+1)·P/W − 1`` of every global batch, each as K
    consecutive indices. The cursor counts batches *consumed* by training: the loader advances
    it (see :class:`trainer.data.loader.TrainLoader`), iteration itself does not, because
    DataLoader workers prefetch ahead of the training step. It is the run's position inside the
    epoch: the engine reads it after every step and records it in checkpoints; nothing else counts.
    """

    def __init__(self, pids: Sequence[int] | np.ndarray, P: int, K: int, seed: int = 0,
                 world_size: int | None = None, rank: int | None = None,
                 steps_per_epoch: int | None = None, policy: str = "identity") -> None:
        if policy not in POLICIES:
            raise ValueError(f"PKSampler: policy={policy!r}, expected one of {sorted(POLICIES)}")
        self.policy = policy
        self.pids = np.asarray(pids, dtype=np.int64).copy()
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.rank = dist.get_rank() if rank is None else int(rank)
        if P <= 0 or K <= 0:
            raise ValueError(f"PKSampler: P={P}, K={K}: expected positive integers")
        if P % self.world_size:
            raise ValueError(f"PKSampler: P={P} identities per global batch is not divisible by "
                             f"world_size={self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"PKSampler: rank={self.rank} outside world_size={self.world_size}")
        if seed < 0:
            raise ValueError(f"PKSampler: seed={seed}: expected a non-negative integer")
        if steps_per_epoch is not None and steps_per_epoch <= 0:
            raise ValueError(f"PKSampler: steps_per_epoch={steps_per_epoch}: expected a positive integer or None")
        num_ids = len(np.unique(self.pids[self.pids >= 0]))
        if num_ids < P:
            raise ValueError(f"PKSampler: {num_ids} identities with samples, fewer than P={P}: no batch can be formed")
        self.P, self.K, self.seed = int(P), int(K), int(seed)
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.cursor = 0
        self._cache: tuple[int, np.ndarray] | None = None

    def set_pids(self, pids: Sequence[int] | np.ndarray) -> None:
        """Replace the labels (TMGF: pseudo labels after re-clustering); call at an epoch boundary.

        The current epoch's batches are regenerated from the new labels.
        """
        pids = np.asarray(pids, dtype=np.int64)
        if pids.shape != self.pids.shape:
            raise ValueError(f"PKSampler.set_pids: {pids.shape[0]} labels, expected {self.pids.shape[0]} "
                             "(one per sample)")
        num_ids = len(np.unique(pids[pids >= 0]))
        if num_ids < self.P:
            raise ValueError(f"PKSampler.set_pids: {num_ids} labels with samples, fewer than P={self.P}")
        self.pids = pids.copy()
        self._cache = None

    # -- the global stream ---------------------------------------------------------------------
    def global_batches(self, epoch: int | None = None) -> np.ndarray:
        """``(steps, P, K)`` global indices of an epoch (cached for the current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        gen = POLICIES[self.policy]
        if self.steps_per_epoch is None:
            batches = gen(self.pids, self.P, self.K, _rng(self.seed, epoch, 0))
        else:
            parts, have, rnd = [], 0, 0
            while have < self.steps_per_epoch:
                part = gen(self.pids, self.P, self.K, _rng(self.seed, epoch, rnd))
                parts.append(part)
                have += len(part)
                rnd += 1
            batches = np.concatenate(parts)[: self.steps_per_epoch]
        self._cache = (epoch, batches)
        return batches

    @property
    def local_P(self) -> int:
        return self.P // self.world_size

    def local_batch(self, global_batch: np.ndarray) -> list[int]:
        """This rank's whole identities of one ``(P, K)`` global batch, flattened."""
        p = self.local_P
        return global_batch[self.rank * p : (self.rank + 1) * p].reshape(-1).tolist()

    def iter_steps(self) -> Iterator[tuple[int, list[int]]]:
        """(step, local batch) from the cursor to the end of the epoch; does not move the cursor."""
        batches = self.global_batches()
        for step in range(self.cursor, len(batches)):
            yield step, self.local_batch(batches[step])

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.iter_steps():
            yield batch

    def __len__(self) -> int:
        """Steps (batches) per epoch."""
        return len(self.global_batches())

    # -- state ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its first batch."""
        self.seek(epoch, 0)

    def seek(self, epoch: int, cursor: int) -> None:
        """Stand at batch ``cursor`` of ``epoch`` (a resume inside an epoch; 0 starts it)."""
        self.epoch = int(epoch)
        self.cursor = int(cursor)
        if self.cursor and not 0 < self.cursor <= len(self):  # 0 needs no check: no epoch is generated for it
            raise ValueError(f"PKSampler: cursor={self.cursor} outside the epoch's {len(self)} steps")

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more batches of the epoch as consumed."""
        self.cursor += n

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"PKSampler.load_state_dict: seed={state['seed']} differs from this sampler's "
                             f"seed={self.seed}")
        self.seek(int(state["epoch"]), int(state["cursor"]))


class InferenceSampler:
    """Exact-once contiguous slice of ``range(n)`` for this rank (``dist.shard_range``): no padding, no duplicates."""

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.n = int(n)
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        self.start, self.stop = dist.shard_range(self.n, self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


__all__ = ["pk_epoch", "class_uniform_epoch", "POLICIES", "PKSampler", "InferenceSampler"]
