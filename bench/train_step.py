"""PAT's training-step cost: part tokens vs the same ViT without them, and the memory bank as N grows.

1. Model: images/s of a full training step (forward, ID + triplet loss, backward, SGD step) of
   PAT (cls + P part tokens, one fused masked SDPA per block) against the plain ViT baseline with
   the same backbone and head, at equal batch, interleaved repeats, medians. Goal: ≤ 15 % overhead.
2. Bank: ``bench/bank.py`` (our sharded bank + CSL vs the official per-step list-stack-copy
   handling, N = 10k … 1M), the communicated bytes per step shown beside it.

    python bench/train_step.py --quick                     # tiny ViT, small bank sizes
    python bench/train_step.py                             # ViT-B/16 256×128 batch 64 (use a GPU)
    python bench/train_step.py --backbone vit_small_patch16_224 --batch 16 --repeats 3   # CPU-sized
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import bank as bank_bench
from bench.cli import Parser, int_list, non_negative_int, positive_int, run_cli
from trainer.config import ModelConfig
from trainer.losses import label_smooth_ce, triplet_loss
from trainer.models import build_model


def _step_time(model: torch.nn.Module, opt: torch.optim.Optimizer, img: torch.Tensor, pid: torch.Tensor,
               device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(img)
        loss = label_smooth_ce(out.logits.float(), pid) + triplet_loss(out.cls.float(), pid)
        if out.parts is not None:  # the part tokens take part in the graph, as CSL makes them do
            loss = loss + out.parts.float().square().mean() * 0.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def bench_models(backbone: str, img_size: tuple[int, int], batch: int, repeats: int, warmup: int,
                 device: torch.device, precision: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ids = batch // 4
    img = torch.randn(batch, 3, *img_size, generator=g).to(device)
    pid = torch.arange(ids).repeat_interleave(4).to(device)
    models = {}
    for name in ("vit", "pat"):
        torch.manual_seed(0)
        m = build_model(ModelConfig(name=name, backbone=backbone, img_size=img_size), num_classes=ids).to(device)
        m.train()
        models[name] = (m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9))
    times: dict[str, list[float]] = {"vit": [], "pat": []}
    for r in range(warmup + repeats):
        for name in ("vit", "pat") if r % 2 == 0 else ("pat", "vit"):  # interleave: drift hits both
            t = _step_time(*models[name], img, pid, device, precision)
            if r >= warmup:
                times[name].append(t)
    out = {f"{k}_img_s": batch / statistics.median(v) for k, v in times.items()}
    out["overhead"] = out["vit_img_s"] / out["pat_img_s"] - 1.0
    return out


def _height_width(text: str) -> tuple[int, int]:
    """``H,W`` in pixels (argparse type)."""
    size = int_list(text)
    if len(size) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHT,WIDTH, e.g. 256,128")
    return size[0], size[1]


def main(argv: list[str] | None = None) -> int:
    """A bad argument is one line on stderr and exit 2 (``bench/cli.py``)."""
    return run_cli("bench/train_step.py", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from trainer.models.backbones import available_backbones

    ap = Parser(prog="bench/train_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny ViT and small bank sizes (a functional check)")
    ap.add_argument("--backbone", default="vit_base_patch16_224", choices=available_backbones(), metavar="BACKBONE",
                    help="a ViT of trainer/models/backbones.py (default vit_base_patch16_224)")
    ap.add_argument("--img-size", type=_height_width, default="256,128", help="HEIGHT,WIDTH (default 256,128)")
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--skip-bank", action="store_true")
    ap.add_argument("--bank-rows", type=int_list, default=None, help="bank sizes for bench/bank.py (default: its own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.backbone, args.img_size, args.batch, args.repeats = "vit_test", (64, 32), 16, 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    size = args.img_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# model step: {args.backbone} {size[0]}x{size[1]} batch {args.batch} {precision} on {name}")
    r = bench_models(args.backbone, size, args.batch, args.repeats, args.warmup, device, precision)
    print("| model | images/s |\n|---|---|")
    print(f"| ViT baseline (cls only) | {r['vit_img_s']:.1f} |\n| PAT (cls + 3 part tokens) | {r['pat_img_s']:.1f} |")
    verdict = "meets" if r["overhead"] <= 0.15 else "misses"
    print(f"part-token overhead: {100 * r['overhead']:+.1f}% ({verdict} the <= 15% goal)\n")
    if not args.skip_bank:
        print("# memory bank per step (bench/bank.py)")
        bank_args = ["--quick"] if args.quick else []
        if args.bank_rows:
            bank_args += ["--rows", ",".join(map(str, args.bank_rows))]
        if args.threads:
            bank_args += ["--threads", str(args.threads)]
        return bank_bench.main(bank_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
