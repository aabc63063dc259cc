"""Per-rank bytes of TMGF's proxy memory: replicated on one rank vs sharded over W = 4 gloo ranks.

For each proxy count P, the real :class:`trainer.memory.proxy.ProxyMemory` is built on one process
(``replicated``) and on W gloo ranks (``sharded``: each rank holds its ``dist.shard_range`` of the
proxies, all slots); a rank's figure is the ``nbytes`` of the memory tensor it holds. A memory larger
than ``--alloc-gib`` per rank is built on torch's ``meta`` device instead (same shape, nothing
allocated: 10^6 proxies x 6 slots x 384 x 4 B = 9.2 GB replicated does not fit beside the other work
of this machine); those rows are marked ``meta``. Every figure is checked against
:func:`trainer.memory.proxy.proxy_memory_bytes`, which computes it from the same shard ranges.

    python bench/proxy_memory.py                      # 10^4, 10^5, 10^6 proxies, 6 x 384, W = 4

The last line, ``proxy memory per rank, sharded W=4 vs replicated: F×``, is the largest rank's
sharded bytes over the replicated bytes, worst over the sizes (1/W = 0.25 when P divides by W).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from bench.cli import Parser, int_list, positive_int, run_cli

PROG = "bench/proxy_memory.py"
GIB = 2**30


@dataclass
class Row:
    """One layout at one proxy count: what each rank holds."""

    proxies: int
    layout: str
    world: int
    per_rank_bytes: list[int]
    allocated: bool
    """False: built on the meta device (shape only) because it exceeds ``--alloc-gib`` per rank."""


def _build(rank: int, world: int, layout: str, proxies: int, slots: int, dim: int,
           alloc_bytes: int) -> tuple[int, bool]:
    """The rank's memory: allocated on the CPU when it fits ``alloc_bytes``, else on the meta device."""
    from trainer.memory.proxy import ProxyMemory, proxy_memory_bytes

    allocated = proxy_memory_bytes(layout, proxies, slots, dim, world)[rank] <= alloc_bytes
    mem = ProxyMemory(slots, proxies, dim, device="cpu" if allocated else "meta", layout=layout)
    if allocated:
        mem.memory.fill_(1.0)  # touch the pages: the bytes are really held
    assert (mem.layout, mem.rank, mem.world_size) == (layout, rank, world)
    return int(mem.memory.nbytes), allocated


def _sharded_rank(rank: int, world: int, sizes: list[int], slots: int, dim: int, alloc_bytes: int) -> list[Any]:
    return [_build(rank, world, "sharded", p, slots, dim, alloc_bytes) for p in sizes]


def measure(sizes: list[int], world: int = 4, slots: int = 6, dim: int = 384, alloc_gib: float = 1.0) -> list[Row]:
    """Replicated (this process) and sharded (``world`` gloo ranks) memories at each proxy count."""
    from bench.scaling import spawn
    from trainer.memory.proxy import proxy_memory_bytes

    alloc_bytes = int(alloc_gib * GIB)
    rows = []
    for p in sizes:
        nbytes, allocated = _build(0, 1, "replicated", p, slots, dim, alloc_bytes)
        rows.append(Row(p, "replicated", 1, [nbytes], allocated))
    per_rank = spawn(_sharded_rank, world, sizes, slots, dim, alloc_bytes)  # [rank][size] -> (bytes, allocated)
    for i, p in enumerate(sizes):
        rows.append(Row(p, "sharded", world, [r[i][0] for r in per_rank], all(r[i][1] for r in per_rank)))
    for row in rows:
        want = proxy_memory_bytes(row.layout, row.proxies, slots, dim, row.world)
        if row.per_rank_bytes != want:
            raise AssertionError(f"{row}: the ranks hold {row.per_rank_bytes} B, proxy_memory_bytes says {want}")
    return rows


def report(rows: list[Row], world: int, slots: int, dim: int, alloc_gib: float) -> tuple[list[str], str]:
    """The table of :func:`measure`'s rows and the summary line ``proxy memory per rank, sharded W=4 vs
    replicated: F×`` (the largest rank's sharded bytes over the replicated bytes, worst over the sizes)."""
    table = [f"# {PROG}: ProxyMemory fp32, {slots} slots x {dim}; bytes = nbytes of each rank's memory "
             f"tensor; 'meta' = over --alloc-gib {alloc_gib:g} per rank, built on the meta device (not allocated)",
             f"{'proxies':>10} {'layout':>10} {'W':>2} {'largest rank':>14} {'GiB':>8} {'all ranks GiB':>13}  built"]
    for row in rows:
        big = max(row.per_rank_bytes)
        table.append(f"{row.proxies:>10,} {row.layout:>10} {row.world:>2} {big:>14,} {big / GIB:>8.3f} "
                     f"{sum(row.per_rank_bytes) / GIB:>13.3f}  {'allocated' if row.allocated else 'meta'}")
    ratio = max(max(s.per_rank_bytes) / max(r.per_rank_bytes)
                for r in rows if r.layout == "replicated"
                for s in rows if s.layout == "sharded" and s.proxies == r.proxies)
    return table, f"proxy memory per rank, sharded W={world} vs replicated: {ratio:.3f}×"


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = Parser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--proxies", type=int_list, default="10000,100000,1000000", help="comma-separated proxy counts P")
    ap.add_argument("--world", type=positive_int, default=4, help="gloo ranks of the sharded layout")
    ap.add_argument("--slots", type=positive_int, default=6, help="feature slots (TMGF: 1 global + 5 parts)")
    ap.add_argument("--dim", type=positive_int, default=384, help="feature width (ViT-S)")
    ap.add_argument("--alloc-gib", type=float, default=1.0,
                    help="largest memory per rank really allocated; larger ones are built on the meta device")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.alloc_gib < 0:
        ap.error(f"--alloc-gib {args.alloc_gib}: expected >= 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist; create it or pass another path")
    rows = measure(list(args.proxies), args.world, args.slots, args.dim, args.alloc_gib)
    table, summary = report(rows, args.world, args.slots, args.dim, args.alloc_gib)
    print("\n".join(table))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
