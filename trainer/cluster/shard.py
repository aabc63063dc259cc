"""Rows of an N-row table split over the ranks, and the collectives that move rows between their owners.

Every stage of the sharded clustering keeps only the rows it owns (``dist.shard_range``: rank r owns
the contiguous rows ``[lo, hi)``). When a row computation needs rows owned elsewhere it *asks* their
owners (:meth:`Shards.ask`, :meth:`Shards.ask_rows`): the requested ids go out with one
``all_to_all``, every owner evaluates the answer on its own rows, and the answers come back with a
second ``all_to_all`` in request order. A request is an id plus optional per-id arguments, so the
owner can answer a question about its row (the position of ``i`` in the k-NN list of ``c``) instead
of shipping the row.

Work that the ranks do in several rounds (to bound the memory of a round) calls the collectives in
every round, so every rank runs the same number of rounds (:meth:`Shards.blocks`); a rank whose
rows are used up takes part with empty requests.

Without a process group (or with ``distributed=False``) this process owns every row and every call
is a local function call, so the single-process pipeline runs the very same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as tdist

from trainer import dist


class Shards:
    """The row ranges of ``n`` items over the ranks and the exchanges between them.

    ``bytes_sent`` counts the payload this rank sent to other ranks (its traffic, for benchmarks).
    """

    def __init__(self, n: int, distributed: bool = False) -> None:
        group = distributed and dist.get_world_size() > 1
        self.n = int(n)
        self.world = dist.get_world_size() if group else 1
        self.rank = dist.get_rank() if group else 0
        self.starts = np.array([dist.shard_range(n, r, self.world)[0] for r in range(self.world)] + [n], np.int64)
        self.lo, self.hi = int(self.starts[self.rank]), int(self.starts[self.rank + 1])
        self.bytes_sent = 0

    @property
    def group(self) -> bool:
        return self.world > 1

    @property
    def rows(self) -> int:
        """Number of rows this rank owns."""
        return self.hi - self.lo

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """Rank owning each id."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def round_size(self, lo: int = 256, hi: int = 8192, parts: int = 16) -> int:
        """Rows per round: about 1/``parts`` of the largest shard, within ``[lo, hi]``.

        A round's transient arrays then stay a fraction of the rank's persistent ones at every W
        (a fixed round size would be a fixed cost per rank that does not shrink with W)."""
        return max(lo, min(hi, -(-self.max_rows // parts)))

    @property
    def max_rows(self) -> int:
        """Rows of the largest shard (of this process's rows without a group)."""
        return int(np.diff(self.starts).max()) if self.group else self.rows

    def blocks(self, m: int, size: int) -> list[tuple[int, int]]:
        """Local row blocks ``[a, b)`` covering ``m`` rows, as many on every rank (empty ones at the end)."""
        count = max(1, math.ceil(max(self.max_rows, m) / size)) if self.group else max(1, math.ceil(m / size))
        return [(min(m, t * size), min(m, (t + 1) * size)) for t in range(count)]

    # -- collectives ------------------------------------------------------------------------

    def alltoall(self, send: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exchange rows: ``send`` holds ``counts[r]`` rows for rank ``r``, in rank order; returns the rows
        received (grouped by source rank, in rank order) and how many came from each rank.

        Any dtype and trailing shape (sent as bytes; every rank passes the same trailing shape)."""
        counts = np.asarray(counts, np.int64)
        if not self.group:
            return send, counts
        dev = dist.comm_device()
        c = torch.from_numpy(counts.copy()).to(dev)
        rc = torch.empty_like(c)
        tdist.all_to_all_single(rc, c)
        recv_counts = rc.cpu().numpy()
        tail = send.shape[1:]
        row_bytes = int(np.prod(tail, dtype=np.int64)) * send.dtype.itemsize
        flat = np.ascontiguousarray(send).reshape(-1).view(np.uint8)
        out = torch.empty(int(recv_counts.sum()) * row_bytes, dtype=torch.uint8, device=dev)
        tdist.all_to_all_single(out, torch.from_numpy(flat).to(dev), (recv_counts * row_bytes).tolist(),
                                (counts * row_bytes).tolist())
        self.bytes_sent += int((counts.sum() - counts[self.rank]) * row_bytes)
        got = out.cpu().numpy().view(send.dtype).reshape(-1, *tail)
        return got, recv_counts

    def ask(self, ids: np.ndarray, answer: Callable[..., np.ndarray], *args: np.ndarray) -> np.ndarray:
        """``answer(local_rows, *args)`` evaluated by the owner of each id, returned in the order of ``ids``.

        ``local_rows`` are the ids minus the owner's ``lo``; ``args`` are per-id arrays sent along;
        ``answer`` returns one row (any fixed trailing shape and dtype) per id."""
        ids = np.asarray(ids, np.int64)
        if not self.group:
            return answer(ids - self.lo, *args)
        own = self.owner(ids)
        order = np.argsort(own, kind="stable")
        counts = np.bincount(own, minlength=self.world)
        rid, rcounts = self.alltoall(ids[order], counts)
        rargs = [self.alltoall(np.asarray(a)[order], counts)[0] for a in args]
        back, _ = self.alltoall(answer(rid - self.lo, *rargs), rcounts)
        out = np.empty_like(back)
        out[order] = back
        return out

    def ask_rows(self, ids: np.ndarray, answer: Callable[..., tuple[np.ndarray, Sequence[np.ndarray]]],
                 *args: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Variable-length rows: ``answer(local_rows, *args)`` returns ``(lengths, flats)`` (each flat array
        the rows' values one after the other); returns the same for ``ids``, in their order.

        ``ids`` must be sorted (ascending): then they are already grouped by owner, in rank order."""
        ids = np.asarray(ids, np.int64)
        if not self.group:
            lens, flats = answer(ids - self.lo, *args)
            return lens, list(flats)
        if len(ids) > 1 and np.any(ids[1:] < ids[:-1]):
            raise ValueError("Shards.ask_rows: ids must be sorted")
        counts = np.bincount(self.owner(ids), minlength=self.world)
        rid, rcounts = self.alltoall(ids, counts)
        rargs = [self.alltoall(np.asarray(a), counts)[0] for a in args]
        lens, flats = answer(rid - self.lo, *rargs)
        lens = np.asarray(lens, np.int64)
        back_lens, _ = self.alltoall(lens, rcounts)
        seg = np.concatenate([[0], np.cumsum(rcounts)])
        csum = np.concatenate([[0], np.cumsum(lens)])
        per_source = csum[seg[1:]] - csum[seg[:-1]]  # values answered to each rank
        return back_lens, [self.alltoall(f, per_source)[0] for f in flats]

    def send_to_owners(self, ids: np.ndarray, *payload: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Send ``(ids, payload...)`` to the owner of each id; returns what this rank received, the ids
        made local (minus ``lo``), in source-rank order (within a source: its order)."""
        ids = np.asarray(ids, np.int64)
        if not self.group:
            return ids - self.lo, list(payload)
        own = self.owner(ids)
        order = np.argsort(own, kind="stable")
        counts = np.bincount(own, minlength=self.world)
        rid, _ = self.alltoall(ids[order], counts)
        return rid - self.lo, [self.alltoall(np.asarray(p)[order], counts)[0] for p in payload]

    def sum(self, value: int) -> int:
        """Sum of an integer over the ranks."""
        if not self.group:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=dist.comm_device())
        return int(dist.all_reduce(t).item())

    def gather_counts(self, value: int) -> np.ndarray:
        """One integer from every rank, in rank order."""
        if not self.group:
            return np.array([int(value)], np.int64)
        t = torch.tensor([int(value)], dtype=torch.int64, device=dist.comm_device())
        return dist.all_gather(t).cpu().numpy()

    def gather_rows(self, x: np.ndarray) -> np.ndarray:
        """All-gather the ranks' row blocks in rank order (the full table on every rank)."""
        if not self.group:
            return x
        t = torch.from_numpy(np.ascontiguousarray(x)).to(dist.comm_device())
        return dist.all_gather_variable(t).cpu().numpy()


__all__ = ["Shards"]
