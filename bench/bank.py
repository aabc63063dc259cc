"""Per-step cost of PAT's memory bank: our sharded bank vs a restatement of the official handling.

Per step (batch B, P parts, width D, N rows): momentum update with the batch, then CSL forward +
backward against the whole bank.

- ``ours``: :class:`trainer.memory.PartMemoryBank` (preallocated ``P×N×D`` fp32 tensor on the
  compute device, index-addressed) + :func:`trainer.losses.csl_step` (streamed LSE/top-k).
- ``official``: a restatement of the repo's per-step handling (docs/methods/pat.md §Memory bank, §CSL): the bank is a
  python list of per-image ``3×768`` CPU tensors keyed by path strings (``in``/``list.index``
  lookups, pop/insert on update), the whole list is ``torch.stack``-ed and copied to the device
  every step, and the loss builds the full ``B×N`` distance matrix per part, removes the sample
  itself by boolean indexing and sorts all ``N−1`` distances.

Communicated bytes are analytic: for ours, what each rank receives per step from the collectives
(:func:`trainer.losses.communication_bytes`, independent of N; shown for ``--world`` ranks); for
the official code (single process, no collectives), the host→device copy of the stacked bank.

    python bench/bank.py --quick            # a small check (CPU-friendly)
    python bench/bank.py                    # N = 10k … 1M (official up to 80k); use a GPU
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bench.cli import Parser, int_list, non_negative_int, positive_int, run_cli
from trainer.losses import communication_bytes, csl_step
from trainer.memory import PartMemoryBank


@dataclass
class Row:
    """One measurement."""

    impl: str
    rows: int
    ms_per_step: float
    ms_update: float
    ms_loss: float
    comm_bytes: int
    peak_mem_mb: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def bench_ours(n: int, batch: int, parts: int, dim: int, k: int, steps: int, device: torch.device,
               world: int) -> Row:
    """Our bank, one process (the collectives are identities; their bytes are counted analytically)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    bank = PartMemoryBank(n, parts, dim, device=device)
    bank.feats.copy_(torch.randn(parts, n, dim, generator=g).to(device))
    bank.filled.fill_(True)
    feats = [torch.randn(batch, parts, dim, generator=g).to(device) for _ in range(steps + 1)]
    idxs = [torch.randint(0, n, (batch,), generator=g).to(device) for _ in range(steps + 1)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    upd, loss_ms = [], []
    for s in range(steps + 1):  # step 0 warms up
        f = feats[s].clone().requires_grad_()

        # Bound as defaults: each closure is timed within this iteration, with this step's tensors.
        def update(s: int = s, f: torch.Tensor = f) -> None:
            bank.update(idxs[s], f.detach())

        def loss(s: int = s, f: torch.Tensor = f) -> None:
            csl_step(f, idxs[s], bank, k=k, update="none").loss.backward()

        u, l_ = _timeit(update, device), _timeit(loss, device)
        if s:
            upd.append(u)
            loss_ms.append(l_)
    comm = communication_bytes(batch // world, world, parts, dim, k)["total"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    mu, ml = statistics.median(upd), statistics.median(loss_ms)
    return Row("ours", n, mu + ml, mu, ml, comm, peak)


class OfficialBank:
    """The official per-step handling, restated (list of per-image tensors keyed by path)."""

    def __init__(self, momentum: float = 0.1) -> None:
        self.name: list[str] = []
        self.agent: list[torch.Tensor] = []
        self.vid: list[int] = []
        self.momentum = momentum

    def update(self, paths: list[str], feats: torch.Tensor, vids: list[int]) -> list[int]:
        """Per image: membership test and ``list.index`` (O(N) each), pop/insert; returns positions."""
        feats = feats.detach().cpu()
        position = []
        for j, key in enumerate(paths):
            cur = feats[:, j]
            if key not in self.name:
                self.name.append(key)
                self.vid.append(vids[j])
                self.agent.append(cur.clone())
                position.append(self.name.index(key))
            else:
                ind = self.name.index(key)
                old = self.agent.pop(ind)
                self.agent.insert(ind, old * (1 - self.momentum) + self.momentum * cur)
                position.append(ind)
        return position


def official_loss(feats: torch.Tensor, centers: torch.Tensor, position: torch.Tensor, vids: list[int], k: int,
                  scale: float) -> torch.Tensor:
    """Full-bank CSL as the official code computes it (expansion, boolean self-removal, full sort)."""
    loss = feats.new_zeros(())
    num_parts, b, _ = feats.shape
    n = centers.shape[1]
    for p in range(num_parts):
        x, c = feats[p], centers[p]
        dist = (x * x).sum(1, keepdim=True) + (c * c).sum(1)[None, :] - 2.0 * x @ c.t()
        cols = torch.arange(n, device=dist.device).expand_as(dist)
        rest, order = dist[cols != position[:, None]].view(b, n - 1).sort(dim=1)
        _ = torch.tensor(vids, device=dist.device)[order[:, :k]]  # neighbour ids for PSD
        _ = torch.tensor(vids, device=dist.device)[order[:, :k]]  # (the unused camera flag: same cost)
        num = torch.exp(-scale * rest[:, :k]).sum(1).log()
        den = torch.exp(-scale * rest).sum(1).log()
        part = (den - num).sum() / b
        loss = loss + torch.where(torch.isnan(part), torch.zeros_like(part), part)
    return loss / num_parts


def bench_official(n: int, batch: int, parts: int, dim: int, k: int, steps: int, device: torch.device) -> Row:
    g = torch.Generator(device="cpu").manual_seed(0)
    bank = OfficialBank()
    init = torch.randn(n, parts, dim, generator=g)
    # Filled directly (inserting N keys one by one through update() would be O(N²) and is not timed).
    bank.name = [f"img_{i:07d}.jpg" for i in range(n)]
    bank.agent = list(init.unbind(0))
    bank.vid = [i % 1000 for i in range(n)]
    feats = [torch.randn(batch, parts, dim, generator=g).to(device) for _ in range(steps + 1)]
    idxs = [torch.randint(0, n, (batch,), generator=g) for _ in range(steps + 1)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    upd, loss_ms = [], []
    for s in range(steps + 1):
        f = feats[s].clone().requires_grad_()
        fp = f.transpose(0, 1)  # the official layout: parts first
        paths = [f"img_{int(i):07d}.jpg" for i in idxs[s]]
        box: dict[str, torch.Tensor] = {}

        # Bound as defaults: each closure is timed within this iteration, with this step's tensors.
        def update(paths: list[str] = paths, fp: torch.Tensor = fp, box: dict[str, torch.Tensor] = box) -> None:
            pos = bank.update(paths, fp, [0] * batch)
            box["centers"] = torch.stack(bank.agent, dim=1).to(device)  # 3×N×768, every step
            box["position"] = torch.tensor(pos, device=device)

        def loss(fp: torch.Tensor = fp, box: dict[str, torch.Tensor] = box) -> None:
            official_loss(fp, box["centers"], box["position"], bank.vid, k, 0.02).backward()

        u, l_ = _timeit(update, device), _timeit(loss, device)
        if s:
            upd.append(u)
            loss_ms.append(l_)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    mu, ml = statistics.median(upd), statistics.median(loss_ms)
    return Row("official", n, mu + ml, mu, ml, parts * n * dim * 4, peak)


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/bank.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = Parser(prog="bench/bank.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 steps (a functional check)")
    ap.add_argument("--rows", type=int_list, default="10000,20000,40000,80000,160000,320000,1000000",
                    help="comma-separated bank sizes N")
    ap.add_argument("--official-max", type=non_negative_int, default=80000,
                    help="largest N for the official restatement")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--parts", type=positive_int, default=3)
    ap.add_argument("--dim", type=positive_int, default=768)
    ap.add_argument("--k", type=positive_int, default=10)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--world", type=positive_int, default=8, help="ranks assumed for our communicated bytes")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--threads", type=non_negative_int, default=0,
                    help="torch CPU threads (0 = torch's default; 1 gives stable figures on a busy host)")
    args = ap.parse_args(argv)
    if args.batch % args.world:
        ap.error(f"--batch {args.batch} must be divisible by --world {args.world}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu or auto")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist; create it or pass another path")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.official_max, args.steps = [2000, 10000], 10000, 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = list(args.rows)

    # Communication: O(batch·dim + batch·k·world) per rank, no N anywhere.
    comm = communication_bytes(args.batch // args.world, args.world, args.parts, args.dim, args.k)
    feat_bytes = args.batch * args.parts * args.dim * 4
    cand_bytes = args.world * args.batch * args.parts * (args.k * 16 + 8)
    assert comm["total"] <= 2 * feat_bytes + cand_bytes + args.batch * 16, comm
    print(f"device={device} threads={torch.get_num_threads()}  B={args.batch} P={args.parts} D={args.dim} k={args.k}  "
          f"ours: {comm['total'] / 2**20:.2f} MiB/step/rank received at world={args.world} (any N)")

    rows: list[Row] = []
    print(f"{'impl':9s} {'N':>9s} {'ms/step':>10s} {'update':>9s} {'loss':>9s} {'comm MiB':>9s} {'peak MiB':>9s}")
    for n in sizes:
        for impl in ("ours", "official"):
            if impl == "official" and n > args.official_max:
                continue
            if impl == "ours":
                r = bench_ours(n, args.batch, args.parts, args.dim, args.k, args.steps, device, args.world)
            else:
                r = bench_official(n, args.batch, args.parts, args.dim, args.k, args.steps, device)
            rows.append(r)
            peak = f"{r.peak_mem_mb:9.0f}" if r.peak_mem_mb is not None else f"{'-':>9s}"
            print(f"{r.impl:9s} {r.rows:9d} {r.ms_per_step:10.2f} {r.ms_update:9.2f} {r.ms_loss:9.2f} "
                  f"{r.comm_bytes / 2**20:9.2f} {peak}", flush=True)
    for n in sizes:
        pair = {r.impl: r for r in rows if r.rows == n}
        if len(pair) == 2:
            print(f"speed-up at N={n}: {pair['official'].ms_per_step / pair['ours'].ms_per_step:.1f}x")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"device": str(device), "args": vars(args), "rows": [asdict(r) for r in rows]}, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
