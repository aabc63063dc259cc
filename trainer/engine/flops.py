"""What a step asks of the device and what the device could give: the per-step figures of train records.

MFU (model FLOP utilization) = training FLOPs per image × images per second / (peak FLOP/s of one
device × devices). The FLOPs per image are counted once per process, on the first step it trains:
``torch.utils.flop_counter.FlopCounterMode`` around the method's ``training_step`` (forward and
losses, at the run's real batch shape and precision) divided by this rank's images, times 3 for the
backward (≈ 2× the forward: a gradient for the input and one for the weights of every matmul, the
convention MFU figures use). Counting the step itself rather than a separate forward at fit start
needs no knowledge of the model's inputs (TMGF's takes camera ids) and spends no random numbers and no
BatchNorm update, which a resumed run would replay differently (the engine resumes bit-identically).

The peak: ``train.peak_tflops`` when set; else, on a GPU of :data:`GPU_PEAKS`, the vendor's dense
figure for the run's precision; else (CPUs, other GPUs) a square GEMM in that precision timed at fit
start (best of a few), which is what this process can reach, not the chip's datasheet.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

TFLOPS = 1e12
BACKWARD_FACTOR = 3.0
"""Training FLOPs per forward FLOP: the forward and a backward of twice its cost."""

GPU_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    # (pattern on torch.cuda.get_device_name, product, dense TFLOP/s by precision): NVIDIA's datasheets,
    # without structured sparsity (the datasheets' starred figures are twice these). "fp32" is plain FP32,
    # "tf32" FP32 matmuls on the tensor cores (torch.backends.cuda.matmul.allow_tf32).
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"\bH100 NVL\b", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"\bH100\b", "H100 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    (r"\bH200 NVL\b", "H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"\bH200\b", "H200 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    (r"\bA100\b", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"\bV100S\b", "V100S PCIe", {"fp32": 16.4, "tf32": 16.4, "fp16": 130.0}),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe", {"fp32": 14.0, "tf32": 14.0, "fp16": 112.0}),
    (r"\bV100\b", "V100 SXM2", {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0}),
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"\bT4\b", "T4", {"fp32": 8.1, "tf32": 8.1, "fp16": 65.0}),
)
"""Known GPUs; V100 and T4 have no TF32 (FP32 matmuls run at the FP32 rate) and no BF16 tensor cores
(a bf16 run is measured instead). Most specific pattern first (``H100 PCIe`` before ``H100``)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    flops: float
    """Peak FLOP/s of one device."""
    source: str
    """Where the figure comes from (the table's product and precision, the config key, or measured)."""


def _matmul_precision(device: torch.device, precision: str) -> str:
    """The table's column for ``precision``: fp32 matmuls on tensor cores are TF32 when torch allows it."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return precision


def table_peak(device_name: str, precision: str) -> Peak | None:
    """The vendor's dense figure for ``device_name`` (as ``torch.cuda.get_device_name`` spells it), if known."""
    for pattern, product, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            if precision not in peaks:
                return None
            return Peak(peaks[precision] * TFLOPS, f"{product} {precision} dense (vendor datasheet)")
    return None


def measure_gemm_peak(device: torch.device, precision: str, n: int | None = None, reps: int = 5) -> Peak:
    """FLOP/s of an ``n``×``n`` GEMM in ``precision`` on ``device`` (best of ``reps`` after one warm-up).

    Constant operands, so no random number is drawn (the run's streams stay as they were)."""
    n = n or (4096 if device.type == "cuda" else 512)
    dtype = _DTYPES[precision]
    a = torch.full((n, n), 0.5, dtype=dtype, device=device)
    b = torch.full((n, n), 0.25, dtype=dtype, device=device)
    best = float("inf")
    for i in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first is the warm-up (allocations, kernel selection)
            best = min(best, time.perf_counter() - t0)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return Peak(2.0 * n**3 / best, f"measured {precision} GEMM {n}x{n} on {_device_name(device)}{threads}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(device: torch.device, precision: str, stated_tflops: float = 0.0) -> Peak:
    """One device's peak for the run: ``train.peak_tflops``, the GPU table, or measured (module doc)."""
    if stated_tflops > 0:
        return Peak(stated_tflops * TFLOPS, f"train.peak_tflops={stated_tflops:g}")
    column = _matmul_precision(device, precision)
    if device.type == "cuda":
        known = table_peak(_device_name(device), column)
        if known is not None:
            return known
    return measure_gemm_peak(device, precision)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device``: allocated by torch on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


class StepMeter:
    """Counts the training FLOPs per image once and turns a step's timings into a train record's fields."""

    def __init__(self, device: torch.device, precision: str, world_size: int, stated_tflops: float = 0.0,
                 log: Callable[..., None] | None = None) -> None:
        self.device = device
        self.world_size = world_size
        self.peak = peak_flops(device, precision, stated_tflops)
        self.flops_per_image: float | None = None
        self._log = log

    @contextlib.contextmanager
    def count(self, batch: dict[str, Any]) -> Iterator[None]:
        """Around the first step's ``training_step``: count its FLOPs (later steps: nothing)."""
        images = int(batch["img"].shape[0]) if isinstance(batch.get("img"), torch.Tensor) else 0
        if self.flops_per_image is not None or images == 0:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            yield
        forward = counter.get_total_flops() / images
        self.flops_per_image = BACKWARD_FACTOR * forward
        if self._log is not None:
            self._log("flops", forward_flops_per_image=forward, train_flops_per_image=self.flops_per_image,
                      peak_flops=self.peak.flops, peak_source=self.peak.source, devices=self.world_size)

    def fields(self, img_per_s: float, sec: float, data_wait_s: float, memory_s: float,
               rank_images: int) -> dict[str, Any]:
        """A step's fields: data wait (seconds, share of the step), memory hook seconds, MFU, peak memory."""
        out: dict[str, Any] = {
            "data_wait_s": round(data_wait_s, 5),
            "data_wait_ratio": round(min(1.0, data_wait_s / max(sec, 1e-9)), 4),
            "memory_s": round(memory_s, 5),
            "mem_peak_bytes": peak_memory_bytes(self.device),
            "rank_images": rank_images,
        }
        if self.flops_per_image:
            out["mfu"] = round(self.flops_per_image * img_per_s / (self.peak.flops * self.world_size), 6)
        return out
