"""Benchmark: bytes each rank sends per training step, and its peak memory, at W = 1, 2, 4 (gloo ranks).

The step is the engine's own sequence (``trainer/engine/loop.py``): ``training_step`` under the strategy's
autocast and the per-sample seeds, ``backward_and_step``, ``after_optimizer_step`` — so DDP's gradient
all-reduce, the PAT bank's gathers and writes, and TMGF's memory update are all in it.

Bytes are read from the kernel, not estimated: ``/proc/self/io`` ``wchar`` counts every byte the process
hands to write-family system calls, which is how gloo's TCP transport sends (a ring all-reduce of B bytes
reads as ``2 (W-1)/W · B`` per rank, checked in ``tests/test_bench_step_comm.py``). Nothing else writes
during the measured window (no checkpoint, no log line, data loading in the same process).

Shapes: PAT as in ``exp=multisource`` (ViT-B/16 at 256 x 128, 16 identities x 4 images per global batch)
and TMGF as in ``exp=tmgf_msmt`` (its ViT-S/16 at 384 x 128, its batch), both on the small synthetic
sets of the smoke experiments (what a step sends does not depend on the dataset's size: the bank and
the proxy memory exchange batch-sized messages; the bank's rows per rank at multisource size are
reported from the bank's own shard ranges). Weights are random (``model.pretrained=null``): the
bytes and memory do not depend on their values.

    python bench/step_comm.py --quick        # the smoke models, seconds
    python bench/step_comm.py                # ViT-B (PAT) and ViT-S (TMGF): minutes on 2 cores
"""

from __future__ import annotations

import resource
import tempfile
from typing import Any

import torch

from bench.cli import Parser, int_list, positive_int, run_cli
from bench.scaling import spawn

PROG = "bench/step_comm.py"
MULTISOURCE_N = 12_936 + 16_522 + 7_365
"""Training images of the default multisource split (Market-1501 + DukeMTMC-reID + CUHK03 -> MSMT17)."""


def bytes_written() -> int:
    """This process's ``wchar``: bytes passed to write-family system calls (sockets included)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def _overrides(case: str, quick: bool, cache: str) -> list[str]:
    if case == "pat":
        model = [] if quick else ["model=vit_b16", "model.pretrained=null", "data.ids_per_batch=16"]
        return ["exp=pat_smoke", f"data.cache_dir={cache}", "data.num_workers=0", *model]
    model = [] if quick else ["model=vit_s16_lup", "model.pretrained=null", "tmgf.proxies_per_batch=8"]
    return ["exp=tmgf_smoke", f"data.cache_dir={cache}", "data.num_workers=0", *model]


def step_rank(rank: int, world: int, case: str, quick: bool, cache: str, steps: int) -> dict[str, Any]:
    """One rank: build the method as the engine does, run ``steps`` steps, measure the last ones."""
    from trainer import dist
    from trainer.config import compose
    from trainer.engine.optim import param_groups
    from trainer.engine.strategy import build_strategy, resolve_precision
    from trainer.methods import build_method
    from trainer.models.stochastic import sample_seeds

    cfg = compose([*_overrides(case, quick, cache), "run_dir=/tmp/unused"])
    device = dist.info().device
    method = build_method(cfg)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model()
    groups = method.param_groups(model) or param_groups(model, cfg.train.optim)
    precision = resolve_precision(cfg.train.precision, device.type)
    strategy = build_strategy(cfg.train, device, precision, cfg.batch_plan(world).images)
    wrapped, _ = strategy.setup(model, groups, cfg.train.optim)
    method.on_fit_start(model, resumed=False)
    method.on_epoch_start(model, 0, 0)  # TMGF clusters here; its collectives are not a training step
    wrapped.train()
    sent: list[int] = []
    images = 0
    for i, batch in enumerate(method.train_batches(0, 0)):
        if i == steps:
            break
        dist.barrier()
        before = bytes_written()
        with strategy.autocast(), sample_seeds(batch.get("seed")):
            result = method.training_step(wrapped, batch)
        strategy.backward_and_step(result.loss)
        method.after_optimizer_step(model, batch, result)
        sent.append(bytes_written() - before)
        images = int(batch["img"].shape[0])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict[str, Any] = {"sent": sent[1:] or sent, "images": images, "params": params,
                           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if case == "pat":
        from trainer.memory import PartMemoryBank

        bank = method.bank  # type: ignore[attr-defined]
        full = PartMemoryBank(MULTISOURCE_N, bank.num_parts, bank.dim, device="cpu")
        out["bank_rows"] = full.num_local
        out["bank_bytes"] = full.feats.nbytes + full._sqnorm.nbytes + full.filled.nbytes
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the smoke models (seconds)")
    p.add_argument("--worlds", type=int_list, default=[1, 2, 4], help="world sizes (default 1,2,4)")
    p.add_argument("--steps", type=positive_int, default=2, help="steps per rank; the first is a warm-up (default 2)")
    p.add_argument("--cases", default="pat,tmgf", help="pat, tmgf or both (default pat,tmgf)")
    args = p.parse_args(argv)
    from trainer.config import compose
    from trainer.data.prepare import ensure_datasets

    mib = 2**20
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases.split(","):
            ensure_datasets(compose(_overrides(case, args.quick, cache)).data)
            shapes = "smoke model" if args.quick else ("ViT-B/16 256x128" if case == "pat" else "ViT-S/16 384x128")
            print(f"\n## {case}: {shapes}, bytes sent per training step per rank (wchar), peak RSS per rank")
            for w in args.worlds:
                res = spawn(step_rank, w, case, args.quick, cache, args.steps)
                sent = max(max(r["sent"]) for r in res)
                grads = 4 * res[0]["params"]
                ring = 2 * (w - 1) / w * grads
                line = (f"W={w}: {res[0]['images']} images per rank, sent {sent / mib:.2f} MiB per step "
                        f"(fp32 gradients {grads / mib:.1f} MiB, a ring all-reduce sends 2(W-1)/W of it = "
                        f"{ring / mib:.2f}; the rest, {(sent - ring) / mib:.2f}, is the memory, BN and loss traffic), "
                        f"peak RSS {max(r['peak_rss'] for r in res) / mib:.0f} MiB")
                if case == "pat":
                    line += (f", bank at N={MULTISOURCE_N:,}: {res[0]['bank_rows']:,} rows, "
                             f"{max(r['bank_bytes'] for r in res) / mib:.1f} MiB per rank")
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
