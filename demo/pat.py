"""The PAT demo (``exp=pat_demo``): the whole system on an embedded default.

Synthesizes two domains of persons (domain A to train, domain B as the unseen target), packs and
verifies their shards, trains with 2 local gloo processes submitted through the launcher's local
cluster (the path a cluster user takes), evaluates on the target before and after, prints a table and
writes the run's pictures (:mod:`trainer.report`), printing where they are.

The table's main row is the last epoch. The row ``best on target (oracle, epoch N)`` is the epoch
with the best mAP on the target domain: choosing an epoch on the unseen domain is an oracle in domain
generalization (the official PAT code reports it), so it is labelled as such, never the result.
"""

from __future__ import annotations

import time
from pathlib import Path

from demo.common import NPROC, prepare, print_pictures, table, train_local
from trainer.config import compose


def results_table(end: dict) -> str:
    """Per target: untrained, last epoch, and the target-selected epoch labelled as the oracle it is."""
    rows = [("target", "model", "mAP", "R1", "R5", "mINP")]
    for target, last in end["last"].items():
        best = end["best"].get(target)
        oracle = f"best on target (oracle, epoch {best['epoch'] + 1})" if best else ""
        for name, m in (("untrained", end["initial"].get(target)), ("trained (last)", last), (oracle, best)):
            if m:
                rows.append((target, name, f"{100 * m['mAP']:.1f}", f"{100 * m['R1']:.1f}", f"{100 * m['R5']:.1f}",
                             f"{100 * m['mINP']:.1f}"))
    return table(rows)


def run_pat_demo(overrides: list[str]) -> int:
    """The PAT demo: data, training, the before/after table and the pictures."""
    cfg = compose(overrides)
    t0 = time.time()
    print("[1/3] data", flush=True)
    prepare(cfg)
    print(f"[2/3] train with {NPROC} local processes (gloo) through the SLURM launcher's local cluster: "
          f"{cfg.run_dir}", flush=True)
    rc = train_local(overrides)
    if rc != 0:
        return rc
    print("[3/3] results", flush=True)
    from trainer.report import METRICS, read_records

    run_dir = Path(cfg.run_dir)
    end = [r for r in read_records(run_dir / METRICS) if r["kind"] == "end"][-1]
    print(results_table(end))
    print_pictures(run_dir)
    print(f"total {time.time() - t0:.0f}s")
    return 0
