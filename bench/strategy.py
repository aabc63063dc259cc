"""Per-rank memory and step time of the strategies: DDP vs DeepSpeed ZeRO-1 vs ZeRO-2 at W ranks.

For each strategy and world size W, W ranks (gloo on the CPU, NCCL with one GPU per rank) build
PAT's model through the project's own code (``configs/exp/pat_market.yaml``: ViT-B/16 at 256×128,
3 part tokens, global BN; no pretrained weights), the engine's parameter groups and PAT's optimizer
(SGD momentum, ``configs/train/pat_sgd.yaml``, at its base LR), wrap them with the trainer's own
strategy (``trainer.engine.strategy.build_strategy``) and train a few steps on one fixed synthetic
global batch (P×K with K = 4, rank r takes the r-th slice: the same images for every W) with PAT's
ID + soft-margin triplet loss (label-smoothed CE, batch-hard mining over the gathered batch; CSL and
PSD are left out: they read the memory bank, which lives outside the model and adds no parameter).

What is measured on every rank (a fresh process per case: forked from this one on the CPU after it
imported torch, timm and DeepSpeed once, so its peak RSS includes those; spawned on CUDA):

- parameters: bytes of the module's parameter storages (a full replica under all three);
- optimizer state: bytes of the tensors in the torch optimizer's ``state`` (under ZeRO that optimizer's
  groups hold the rank's flat partitions; SGD momentum: one buffer per parameter or partition);
- fp32 partition copy: parameter tensors of that optimizer that are not the module's (ZeRO keeps an
  fp32 copy of its partition even at fp32; none under DDP);
- gradients: storages held after backward, before the optimizer step. DDP: every ``p.grad``, plus the
  reducer's buckets as DDP itself reports them (``bucket_sizes``; with ``gradient_as_bucket_view``
  off they are a second copy, held by C++, not visible as tensors). ZeRO: the module's ``p.grad``
  and every tensor DeepSpeed's ZeRO optimizer holds in its gradient attributes (the averaged
  partition and the buffers it views), each storage once. Not observed: ZeRO's reduction bucket
  during backward (sized by DeepSpeed's ``reduce_bucket_size``, freed before backward returns);
  peak RSS / peak GPU memory include it;
- peak RSS (``ru_maxrss``; the GPU's ``max_memory_allocated`` on CUDA), mean step time after the
  warm-up steps (the slowest rank's), and the loss of every step (mean over the ranks).

    python bench/strategy.py --quick                                     # tiny ViT, about 30 s on 2 cores
    python bench/strategy.py                                             # ViT-B/16 PAT, batch 8 (minutes on 2 cores)
    python bench/strategy.py --backbone vit_small_patch16_224 --batch 16
    python bench/strategy.py --worlds 1,2,4,8 --batch 64 --steps 10       # a node of 8 GPUs (one rank per GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.cli import Parser, int_list, non_negative_int, positive_int, run_cli
from shards.errors import UserError
from trainer.config import ModelConfig, TrainConfig

STRATEGIES = ("ddp", "zero1", "zero2")
MIB = 2**20
IMAGES_PER_ID = 4  # PAT's P×K batch: K = 4


@dataclass(frozen=True)
class Setting:
    """What every rank of every case runs (picklable: it crosses to the ranks)."""

    model: ModelConfig
    train: TrainConfig
    classes: int
    batch: int
    warmup: int
    steps: int
    precision: str
    threads: int


@dataclass
class RankResult:
    """One rank's measurements (plain types: written as JSON by the rank, read by the parent)."""

    rank: int
    device: str
    param_bytes: int
    optim_bytes: int
    master_bytes: int
    grad_bytes: int
    grad_where: dict[str, int]
    peak_rss_bytes: int
    peak_device_bytes: int | None
    step_s: list[float]
    losses: list[float]


@dataclass
class Row:
    """One (strategy, W): the per-rank figures (max over ranks) and the loss of every step."""

    strategy: str
    world: int
    param_bytes: int
    optim_bytes: int
    master_bytes: int
    grad_bytes: int
    grad_where: str
    peak_rss_bytes: int
    peak_device_bytes: int | None
    step_s: float
    losses: list[float]


# -- pure helpers -------------------------------------------------------------------------------
def unique_nbytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage, once); storages
    whose data pointer is in ``exclude`` are not counted."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if s.nbytes() and ptr not in (exclude or set()):
            seen[ptr] = s.nbytes()
    return sum(seen.values())


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def tensors_in(obj: Any, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor in ``obj``: through lists, tuples, dicts and DeepSpeed's own small holder objects."""
    if torch.is_tensor(obj):
        return [obj]
    if depth == 0 or isinstance(obj, nn.Module):
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, depth - 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, depth - 1)]
    if type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in tensors_in(v, depth - 1)]
    return []


def train_config(base: TrainConfig, strategy: str) -> TrainConfig:
    """``base`` (PAT's train config) under one of :data:`STRATEGIES`."""
    if strategy == "ddp":
        return dataclasses.replace(base, strategy="ddp")
    if strategy in ("zero1", "zero2"):
        return dataclasses.replace(base, strategy="deepspeed", zero_stage=int(strategy[-1]))
    raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")


def summarize(strategy: str, world: int, ranks: Sequence[RankResult]) -> Row:
    """The figures of one case: each byte count and the step time of the worst rank (ranks differ only by
    where ZeRO's partition boundaries fall), the loss of every step (all-reduced: equal on every rank)."""
    where: dict[str, int] = {}
    for r in ranks:
        for k, v in r.grad_where.items():
            where[k] = max(where.get(k, 0), v)
    devices = [r.peak_device_bytes for r in ranks if r.peak_device_bytes is not None]
    return Row(
        strategy=strategy, world=world,
        param_bytes=max(r.param_bytes for r in ranks), optim_bytes=max(r.optim_bytes for r in ranks),
        master_bytes=max(r.master_bytes for r in ranks), grad_bytes=max(r.grad_bytes for r in ranks),
        grad_where=", ".join(f"{k} {_mib(v)}" for k, v in where.items() if v) or "-",
        peak_rss_bytes=max(r.peak_rss_bytes for r in ranks),
        peak_device_bytes=max(devices) if devices else None,
        step_s=max(statistics.mean(r.step_s) for r in ranks) if ranks[0].step_s else float("nan"),
        losses=list(ranks[0].losses),
    )


def optimizer_ratio(rows: Sequence[Row], row: Row) -> float | None:
    """Per-rank optimizer-state bytes of ``row`` over the same strategy's at W = 1 (None: no W = 1 row)."""
    base = [r for r in rows if r.strategy == row.strategy and r.world == 1]
    return row.optim_bytes / base[0].optim_bytes if base and base[0].optim_bytes else None


def loss_gap(rows: Sequence[Row], row: Row) -> float | None:
    """max over the steps of |loss − DDP's loss| at the same W (None: no DDP row at that W)."""
    ddp = [r for r in rows if r.strategy == "ddp" and r.world == row.world]
    if not ddp or len(ddp[0].losses) != len(row.losses):
        return None
    return max((abs(a - b) for a, b in zip(row.losses, ddp[0].losses)), default=0.0)


def _mib(n: int) -> str:
    return f"{n / MIB:.2f}"


def table(rows: Sequence[Row]) -> list[str]:
    """The markdown table (per-rank figures in MiB)."""
    device = any(r.peak_device_bytes is not None for r in rows)
    head = ["strategy", "W", "params", "optimizer state", "vs W=1", "fp32 partition copy", "gradients held",
            "peak RSS"] + (["peak GPU mem"] if device else []) + ["step s", "loss (last step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = optimizer_ratio(rows, r)
        cells = [r.strategy, str(r.world), _mib(r.param_bytes), _mib(r.optim_bytes),
                 "-" if ratio is None else f"{ratio:.3f}", _mib(r.master_bytes), _mib(r.grad_bytes),
                 f"{r.peak_rss_bytes / MIB:.0f}"]
        if device:
            cells.append("-" if r.peak_device_bytes is None else f"{r.peak_device_bytes / MIB:.0f}")
        cells += [f"{r.step_s:.3f}", f"{r.losses[-1]:.6f}" if r.losses else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: Sequence[Row]) -> list[str]:
    """Optimizer state per rank against 1/W, and each ZeRO loss against DDP's at the same W."""
    out = ["optimizer state per rank vs W=1 (expected about 1/W under ZeRO, 1 under DDP):"]
    for r in rows:
        ratio = optimizer_ratio(rows, r)
        if r.world > 1 and ratio is not None:
            out.append(f"  {r.strategy} W={r.world}: {ratio:.3f} (1/W = {1 / r.world:.3f})")
    out.append("loss vs DDP at the same W (max |difference| over the steps):")
    for r in rows:
        gap = loss_gap(rows, r)
        if r.strategy != "ddp" and gap is not None:
            out.append(f"  {r.strategy} W={r.world}: {gap:.2e}")
    out.append("gradients held, MiB per rank by holder:")
    out += [f"  {r.strategy} W={r.world}: {r.grad_where}" for r in rows]
    return out


# -- one rank --------------------------------------------------------------------------------------
def _batch(setting: Setting, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the fixed global batch (the same global batch whatever W)."""
    g = torch.Generator().manual_seed(0)
    h, w = setting.model.img_size
    img = torch.randn(setting.batch, 3, h, w, generator=g)
    ids = torch.randperm(setting.classes, generator=g)[: setting.batch // IMAGES_PER_ID]
    pid = ids.repeat_interleave(IMAGES_PER_ID)
    per = setting.batch // world
    return img[rank * per:(rank + 1) * per].to(device), pid[rank * per:(rank + 1) * per].to(device)


def _pat_loss(out: Any, pid: torch.Tensor) -> torch.Tensor:
    from trainer.losses import label_smooth_ce, triplet_loss

    return label_smooth_ce(out.logits.float(), pid) + triplet_loss(out.cls.float(), pid)


def _ddp_grads(module: nn.Module, model: nn.Module) -> dict[str, int]:
    held = {"p.grad": unique_nbytes(p.grad for p in model.parameters() if p.grad is not None)}
    logging_data = getattr(module, "_get_ddp_logging_data", None)
    if logging_data is not None:  # DDP's reducer buckets: C++ tensors, reported by DDP itself
        sizes = str(logging_data().get("bucket_sizes", ""))
        if not logging_data().get("gradient_as_bucket_view", 0):
            held["DDP buckets"] = sum(int(s) for s in sizes.split(",") if s.strip())
    return held


def _zero_grads(engine: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Gradient storages held by the module and by DeepSpeed's ZeRO optimizer, each storage counted once
    (under the first holder that has it), parameters and optimizer state excluded."""
    taken = storage_ptrs(model.parameters()) | storage_ptrs(
        t for group in optimizer.param_groups for t in group["params"])
    taken |= storage_ptrs(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    held: dict[str, int] = {}
    holders: list[tuple[str, list[torch.Tensor]]] = [
        ("p.grad", [p.grad for p in model.parameters() if p.grad is not None]),
        ("partition .grad", [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]),
    ]
    zero = engine.optimizer
    holders += [(name, tensors_in(value)) for name, value in sorted(vars(zero).items())
                if "grad" in name or name.startswith("ipg")]
    for name, tensors in holders:
        tensors = [t for t in tensors if t.numel() > 1]  # scalars (norms, overflow flags) are not gradients
        held[name] = unique_nbytes(tensors, exclude=taken)
        taken |= storage_ptrs(tensors)
    return {k: v for k, v in held.items() if v}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(strategy: Any, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
          img: torch.Tensor, pid: torch.Tensor) -> tuple[float, torch.Tensor, dict[str, int]]:
    """One training step: its seconds (the gradient census excluded), the loss, the gradient bytes held
    after backward by holder."""
    from trainer.engine.zero import DeepSpeedStrategy

    device = img.device
    _sync(device)
    t = time.perf_counter()
    with strategy.autocast():
        loss = _pat_loss(module(img), pid)
    if not isinstance(strategy, DeepSpeedStrategy):  # the gradients stay in p.grad until the next zero_grad
        strategy.backward_and_step(loss)
        _sync(device)
        return time.perf_counter() - t, loss, _ddp_grads(module, model)
    # DeepSpeedStrategy.backward_and_step (backward, then step), split to look between the two
    strategy.engine.backward(loss)
    _sync(device)
    seconds = time.perf_counter() - t
    grads = _zero_grads(strategy.engine, model, optimizer)
    t = time.perf_counter()
    strategy.engine.step()
    _sync(device)
    return seconds + time.perf_counter() - t, loss, grads


def _rank_body(rank: int, world: int, strategy_name: str, setting: Setting) -> RankResult:
    from trainer import dist
    from trainer.engine.optim import param_groups
    from trainer.engine.strategy import build_strategy
    from trainer.models import build_model

    device = dist.info().device
    strategy = build_strategy(train_config(setting.train, strategy_name), device, setting.precision, setting.batch)
    torch.manual_seed(0)  # every rank builds the same weights
    model = build_model(setting.model, num_classes=setting.classes)
    model.train()
    module, optimizer = strategy.setup(model, param_groups(model, setting.train.optim), setting.train.optim)
    model = strategy.unwrap(module)
    img, pid = _batch(setting, rank, world, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    losses: list[float] = []
    grads: dict[str, int] = {}
    for step in range(setting.warmup + setting.steps):
        torch.manual_seed(1000 + step)  # drop-path draws: the same under every strategy at this W
        dist.barrier()
        seconds, loss, grads = _step(strategy, module, model, optimizer, img, pid)
        if step >= setting.warmup:
            times.append(seconds)
        total = dist.all_reduce(loss.detach().float().reshape(1).clone().to(dist.comm_device()))
        losses.append(float(total.item()) / world)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return RankResult(
        rank=rank, device=str(device),
        param_bytes=unique_nbytes(model.parameters()),
        optim_bytes=unique_nbytes(state),
        master_bytes=unique_nbytes((p for g in optimizer.param_groups for p in g["params"]),
                                   exclude=storage_ptrs(model.parameters())),
        grad_bytes=sum(grads.values()), grad_where=grads,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        peak_device_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        step_s=times, losses=losses,
    )


def _rank_main(rank: int, world: int, port: int, outdir: str, strategy: str, setting: Setting) -> None:
    """A spawned rank: torchrun's environment, its output to a log file (DeepSpeed's banners, the JIT
    build), its result or its traceback as JSON."""
    log = os.open(os.path.join(outdir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(setting.threads)
    from trainer import dist

    path = os.path.join(outdir, f"rank{rank}.json")
    try:
        dist.init()
        result: dict[str, Any] = {"ok": True, "result": dataclasses.asdict(_rank_body(rank, world, strategy, setting))}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
        raise
    finally:
        with open(path, "w") as f:
            json.dump(result, f)
        dist.shutdown(sync=result["ok"])


# -- the cases -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preload() -> None:
    """On the CPU, import what every rank imports once, here, before forking the ranks: a spawned rank spends
    seconds on imports per process (CUDA ranks are spawned: CUDA does not survive a fork)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeedStrategy sets on the CPU, before the import
    import deepspeed  # noqa: F401

    import trainer.engine.strategy  # noqa: F401
    import trainer.engine.zero  # noqa: F401
    import trainer.losses  # noqa: F401
    import trainer.models  # noqa: F401


def run_case(strategy: str, world: int, setting: Setting, start_method: str = "spawn") -> list[RankResult]:
    """Start ``world`` fresh ranks for one strategy (``fork`` only on the CPU, after :func:`preload`);
    their results in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-strategy-") as outdir:
        try:
            mp.start_processes(_rank_main, args=(world, _free_port(), outdir, strategy, setting), nprocs=world,
                               join=True, start_method=start_method)
        except Exception:
            raise RuntimeError(f"{strategy} at W={world} failed\n" + _failure_report(outdir, world)) from None
        results = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                results.append(RankResult(**json.load(f)["result"]))
        return results


def _failure_report(outdir: str, world: int) -> str:
    parts = []
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            if not rec["ok"]:
                parts.append(f"rank {r}:\n{rec['error']}")
        log = os.path.join(outdir, f"rank{r}.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                parts.append(f"rank {r} output (tail):\n" + "".join(f.readlines()[-30:]))
    return "\n".join(parts)


def _height_width(text: str) -> tuple[int, int]:
    """``H,W`` in pixels (argparse type)."""
    size = int_list(text)
    if len(size) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHT,WIDTH, e.g. 256,128")
    return size[0], size[1]


def _strategies(text: str) -> list[str]:
    """Comma-separated names of :data:`STRATEGIES` (argparse type)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated names from {','.join(STRATEGIES)}")
    return names


def build_setting(args: argparse.Namespace) -> Setting:
    """What the ranks run: PAT's model and train configs as composed for ``exp=pat_market`` (no pretrained
    file: the figures do not depend on the weights), at the backbone and size asked."""
    from trainer.config import compose

    worlds = ",".join(map(str, args.worlds))
    if args.batch % IMAGES_PER_ID or any(args.batch % world for world in args.worlds):
        raise UserError(f"--batch {args.batch}: expected a multiple of {IMAGES_PER_ID} (P identities x K = "
                        f"{IMAGES_PER_ID} images) that splits evenly over every --worlds value ({worlds})")
    if args.classes < args.batch // IMAGES_PER_ID:
        raise UserError(f"--classes {args.classes}: expected at least the batch's {args.batch // IMAGES_PER_ID} "
                        "identities")
    h, w = args.img_size
    cfg = compose(["exp=pat_market", f"model.backbone={args.backbone}", f"model.img_size=[{h},{w}]",
                   "model.pretrained=null"])
    return Setting(model=cfg.model, train=cfg.train, classes=args.classes, batch=args.batch, warmup=args.warmup,
                   steps=args.steps, precision=args.precision, threads=args.threads)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from trainer.models.backbones import available_backbones

    ap = Parser(prog="bench/strategy.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny ViT at 64x32, 1 warm-up + 2 timed steps")
    ap.add_argument("--backbone", default="vit_base_patch16_224", choices=available_backbones(), metavar="BACKBONE",
                    help="a ViT of trainer/models/backbones.py (default vit_base_patch16_224, PAT's)")
    ap.add_argument("--img-size", type=_height_width, default="256,128", help="HEIGHT,WIDTH (default 256,128)")
    ap.add_argument("--batch", type=positive_int, default=8, help="global images per step (default 8)")
    ap.add_argument("--classes", type=positive_int, default=751,
                    help="classifier width (default 751, Market-1501's training identities)")
    ap.add_argument("--worlds", type=int_list, default="1,2,4", help="world sizes W (default 1,2,4)")
    ap.add_argument("--strategies", type=_strategies, default="ddp,zero1,zero2",
                    help=f"comma-separated, from {','.join(STRATEGIES)} (default all)")
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps after the warm-up (default 3)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="train.precision (default fp32: the loss comparison is exact only there; fp16 needs CUDA)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per rank (default 1)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) even where CUDA is available")
    args = ap.parse_args(argv)
    if args.quick:
        args.backbone, args.img_size, args.warmup, args.steps = "vit_test", (64, 32), 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/strategy.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first asked for; the ranks inherit it
    cuda = torch.cuda.is_available()
    if args.precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    if cuda and max(args.worlds) > torch.cuda.device_count():
        raise UserError(f"--worlds {','.join(map(str, args.worlds))}: one GPU per rank and this machine has "
                        f"{torch.cuda.device_count()}; pass fewer world sizes, or --cpu")
    setting = build_setting(args)
    where = (f"CUDA ({torch.cuda.get_device_name(0)}), NCCL, one GPU per rank" if cuda
             else f"CPU, gloo, {args.threads} torch thread(s) per rank, {os.cpu_count()} cores")
    h, w = setting.model.img_size
    print(f"# strategies: PAT {setting.model.backbone} {h}x{w}, {setting.classes} classes; global batch "
          f"{setting.batch} ({setting.batch // IMAGES_PER_ID} ids x {IMAGES_PER_ID}, split over W ranks), "
          f"{setting.precision}; SGD momentum {setting.train.optim.momentum}, lr {setting.train.optim.lr}; "
          f"{setting.warmup} warm-up + {setting.steps} timed steps; {where}")
    print("# per-rank MiB, max over the ranks; step s: mean of the timed steps, slowest rank", flush=True)
    if not cuda:
        preload()
    rows: list[Row] = []
    for world in args.worlds:
        for strategy in args.strategies:
            rows.append(summarize(strategy, world, run_case(strategy, world, setting, "spawn" if cuda else "fork")))
            print(f"  done: {strategy} W={world} ({rows[-1].step_s:.2f} s/step)", flush=True)
    print("\n".join(["", *table(rows), "", *verdicts(rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
