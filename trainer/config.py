"""Structured configuration: every setting is a dataclass field with a docstring (torchtitan style).

The dataclasses are registered with Hydra's ConfigStore as the schema of ``configs/config.yaml``;
``compose(overrides)`` gives a validated :class:`Config`, the one object a run is a function of.
Every field is checked there (choices, ranges, cross-field rules), so a bad value is refused before
any work is queued, as one line ``key=value: expected <what>``. Each dataclass lists its checks in
``_checks()``; ``trainer.train.check_files`` adds what depends on this machine's files.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from shards.errors import UserError


class ConfigError(UserError):
    """A bad override, key or value: the message is one line naming it."""


Check = tuple[str, bool, str]
"""One entry of a dataclass's ``_checks()``: (field, whether it holds, what is expected)."""


def _value(node: Any, key: str) -> Any:
    for part in key.split("."):  # Config-level checks name fields of its sections ("model.name")
        node = getattr(node, part)
    return node


def _check(prefix: str, node: Any) -> None:
    """Raise :class:`ConfigError` for the first failing entry of ``node._checks()``."""
    for key, ok, expected in node._checks():
        if not ok:
            raise ConfigError(f"{prefix}{key}={_value(node, key)!r}: expected {expected}")


def _probability(p: float) -> bool:
    return 0.0 <= p <= 1.0


OPTIMIZERS = ("sgd", "adam")
"""``train.optim.name`` choices (built by ``trainer.engine.optim.build_optimizer``)."""
SCHEDULES = ("cosine", "multistep", "paper")
"""``train.optim.schedule`` choices (``trainer.engine.optim.EpochLR``)."""


LR_SCALINGS = ("none", "linear", "sqrt")
"""``train.optim.lr_scaling`` choices: how the LR follows a global batch larger than the experiment's."""


@dataclass
class OptimConfig:
    """Optimizer and per-epoch LR schedule."""

    name: str = "sgd"
    """``sgd`` (PAT, TMGF) or ``adam`` (O2CAP)."""
    lr: float = 1e-3
    """Base learning rate (PAT: 1e-3, the paper's; 4e-4 when MSMT17 is a source, from a comment in the
    official config, ``BASE_LR: 0.001 # 0.0004 for msmt``, not from the paper; TMGF: 3.5e-4)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Applied to every trainable tensor, biases and norms included, as the official code does."""
    bias_lr_factor: float = 2.0
    """LR multiplier for bias parameters (PAT: 2, TMGF: 1)."""
    lr_scaling: str = "none"
    """How ``lr`` follows the global batch when it differs from the experiment's (``data.batch_scope=
    per_rank`` on W ranks: W times P×K): ``none``, ``linear`` (× global / reference batch) or ``sqrt``."""
    schedule: str = "cosine"
    """``cosine`` (timm CosineLRScheduler, the PAT code), ``multistep`` (warm-up multi-step, TMGF/O2CAP) or
    ``paper`` (PAT §4.2: linear from 0 to ``lr`` over ``warmup_epochs``, then a decay over ``decay_epochs``;
    the paper does not name the decay's shape: a half cosine down to ``cosine_lr_min_factor * lr``)."""
    warmup_epochs: int = 5
    """Linear warm-up length in epochs (the PAT code: 5; PAT §4.2: 10)."""
    warmup_factor: float = 0.01
    """Warm-up starts at ``warmup_factor * lr`` (``cosine``, ``multistep``; ``paper`` starts from 0)."""
    cosine_t_initial: int = 120
    """Cosine period in epochs; the PAT repo hard-codes 120 with 60 epochs (LR ends near 0.5×base)."""
    cosine_lr_min_factor: float = 0.002
    """Cosine floor as a fraction of ``lr`` (``cosine`` and ``paper``)."""
    decay_epochs: int = 50
    """``paper``: epochs of the decay after the warm-up ("decays in the following 50 epochs"); the LR stays
    at the floor after them."""
    milestones: tuple[int, ...] = (20, 40)
    """Multi-step decay epochs (0-based) for ``multistep``."""
    gamma: float = 0.1
    """Multi-step decay factor."""

    def _checks(self) -> list[Check]:
        # A warm-up or milestone past the last epoch is never reached, not refused: shortening a
        # recipe with train.epochs=N alone must stay possible.
        m = list(self.milestones)
        return [
            ("lr_scaling", self.lr_scaling in LR_SCALINGS, f"one of {LR_SCALINGS}"),
            ("name", self.name in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            ("lr", self.lr > 0, "> 0"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("bias_lr_factor", self.bias_lr_factor > 0, "> 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("warmup_factor", 0.0 < self.warmup_factor <= 1.0, "in (0, 1]"),
            ("cosine_t_initial", self.cosine_t_initial >= 1, ">= 1 epoch"),
            ("cosine_lr_min_factor", _probability(self.cosine_lr_min_factor), "in [0, 1]"),
            ("decay_epochs", self.decay_epochs >= 1, ">= 1 epoch"),
            ("milestones", all(e >= 0 for e in m) and all(a < b for a, b in zip(m, m[1:])),
             "strictly increasing 0-based epochs, e.g. [20, 40]"),
            ("gamma", 0.0 < self.gamma <= 1.0, "in (0, 1]"),
        ]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``train.precision`` choices; the engine resolves ``auto`` and ``trainer.engine.strategy`` takes the rest."""
STRATEGIES = ("ddp", "deepspeed")
"""``train.strategy`` choices (``trainer.engine.strategy.build_strategy``)."""
ZERO_STAGES = (1, 2)
"""``train.zero_stage`` choices: ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients."""
RESUME_MODES = ("auto", "never")
"""``train.resume`` values that are not a checkpoint directory (``trainer.engine.checkpoint.resolve_resume``)."""


@dataclass
class TrainConfig:
    """The loop's settings (method settings live with the method)."""

    epochs: int = 60
    """Number of epochs."""
    seed: int = 1234
    """Seeds model init, sampling and augmentation; the whole run is a function of it."""
    precision: str = "auto"
    """``auto`` (fp16 autocast + GradScaler on CUDA as the papers, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""
    sync_bn: bool = True
    """Under DDP, BatchNorm statistics over the global batch (the papers' single-GPU batch): torch's
    SyncBatchNorm on CUDA, ``trainer.models.sync_bn.GlobalBatchNorm`` on the CPU. False = plain DDP
    (each rank normalises its own slice). No effect on one process."""
    strategy: str = "ddp"
    """How the model is replicated over the ranks: ``ddp`` (torch DDP; one process without a group) or
    ``deepspeed`` (DeepSpeed ZeRO stage ``zero_stage``: optimizer state, and with stage 2 the gradients,
    sharded over the ranks). Both save the same checkpoint, so a run resumes under either (docs/launch.md)."""
    zero_stage: int = 2
    """ZeRO stage under ``strategy=deepspeed``: 1 shards the optimizer state, 2 also the gradients."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value under either strategy; 0 = off (the papers). Written
    into DeepSpeed's config explicitly: DeepSpeed's own default is not off."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in the run dir, else start fresh), ``never``, or a checkpoint dir."""
    ckpt_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends)."""
    ckpt_every_epochs: int = 1
    """Checkpoint at the end of every N-th epoch (and always after the last)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept on disk (older ones removed); 0 keeps all."""
    log_every: int = 10
    """Console line every N steps (metrics.jsonl gets every step)."""
    metrics_port: int = -1
    """Base port of the Prometheus exporters (``trainer/engine/prometheus.py``): every rank serves its own
    metrics on this port + its local rank; -1 = off, 0 = any free port per rank (rank 0 logs every rank's
    URL in a ``metrics_server`` record)."""
    metrics_addr: str = "127.0.0.1"
    """Address the Prometheus exporters bind to (loopback by default: expose it on purpose)."""
    metrics_push_url: str = ""
    """Pushgateway (``http://host:9091``) every rank also pushes its metrics to, every 15 s and at the end,
    for jobs a Prometheus cannot scrape; empty = no push."""
    tensorboard: bool = True
    """Rank 0 writes TensorBoard scalars and the run's config to ``run_dir/tb``."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device in the run's precision, the denominator of the MFU in train records;
    0 = the vendor's figure for known GPUs, else a GEMM measured at the start (``trainer/engine/flops.py``)."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit. For tests."""

    def _checks(self) -> list[Check]:
        return [
            ("epochs", self.epochs > 0, "> 0"),
            ("seed", self.seed >= 0, ">= 0"),  # the samplers' seed sequences take non-negative seeds
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("strategy", self.strategy in STRATEGIES, f"one of {STRATEGIES}"),
            ("zero_stage", self.zero_stage in ZERO_STAGES, f"one of {ZERO_STAGES} (ZeRO-1: optimizer state "
             "sharded, ZeRO-2: and gradients)"),
            ("clip_grad", self.clip_grad >= 0, ">= 0 (0: no clipping)"),
            ("resume", bool(self.resume), f"one of {RESUME_MODES} or a checkpoint directory"),
            ("ckpt_every_steps", self.ckpt_every_steps >= 0, ">= 0 (0: only at epoch ends)"),
            ("ckpt_every_epochs", self.ckpt_every_epochs >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, ">= 0 (0: keep all)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("metrics_port", -1 <= self.metrics_port <= 65535,
             "-1 (off), 0 (any free port) or a port in 1..65535"),
            ("metrics_addr", bool(self.metrics_addr), "an address to bind, e.g. 127.0.0.1"),
            ("metrics_push_url", not self.metrics_push_url or self.metrics_push_url.startswith(("http://", "https://")),
             "empty (no push) or a Pushgateway URL, e.g. http://pushgateway:9091"),
            ("peak_tflops", self.peak_tflops >= 0, ">= 0 (0: the GPU table, else measured)"),
            ("max_steps", self.max_steps >= 0, ">= 0 (0: no limit)"),
        ]


@dataclass
class EvalConfig:
    """When and how to evaluate on the targets."""

    period: int = 1
    """Evaluate every N epochs and after the last one."""
    at_start: bool = False
    """Also evaluate the untrained (or pretrained) model before training."""
    batch_size: int = 128
    """Images per inference batch (per rank)."""
    rerank: bool = False
    """k-reciprocal re-ranking (dense: for gallery sizes that fit in memory)."""
    max_rank: int = 50
    """Length of the CMC curve."""

    def _checks(self) -> list[Check]:
        return [
            ("period", self.period > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_rank", self.max_rank >= 1, ">= 1"),
        ]


@dataclass
class SynthSourceConfig:
    """A synthetic dataset made on demand (``shards.synth`` then ``shards.pack``) when its shards are missing."""

    layout: str = "market1501"
    """Real layout written (``market1501``, ``dukemtmc``, ``msmt17``, ``cuhk03np``)."""
    domain: str = "A"
    """Domain style (palette, background, light): different domains differ like real datasets do."""
    ids: int = 64
    """Training identities."""
    test_ids: int = 48
    """Test identities (disjoint from training ones)."""
    cams: int = 4
    """Cameras, each with its own viewpoint and lighting."""
    images_per_id_cam: int = 3
    """Images per identity and camera."""
    seed: int = 0
    """Generator seed (same settings → byte-identical dataset)."""
    size: tuple[int, int] = (128, 64)
    """Image (height, width) as written to disk."""

    def _checks(self) -> list[Check]:
        return [("size", len(tuple(self.size)) == 2, "(height, width)")]

    def problem(self) -> str | None:
        """``shards.synth``'s own verdict on these settings (``field=value: ...``), None when fine."""
        from shards.synth.config import SynthConfig  # numpy + PIL: loaded only when a config has synthetic sets

        try:
            SynthConfig(out="", **asdict(self)).resolved()
        except ValueError as exc:
            return str(exc)
        return None


NORM_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "vit_jx": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # PAT hard-codes 0.5/0.5 (timm's jx ViT weights)
    "luperson": ((0.3525, 0.3106, 0.3140), (0.2660, 0.2522, 0.2505)),  # TMGF (LUPerson-pretrained ViT-S)
}
"""Per-backbone normalisation (mean, std) presets of ``data.transform.norm`` (``trainer.data.transforms``)."""


@dataclass
class TransformConfig:
    """Image transforms, ``data.transform`` (``trainer.data.transforms.build_transforms``); defaults: flip,
    pad 10 + crop and 0.5/0.5 normalisation at 256×128 (PAT's code, LGT off). Checked when made."""

    size: tuple[int, int] = (256, 128)
    """Output (height, width); the resize target and the crop size. In a run it is ``model.img_size``, the
    model's input (``configs/config.yaml`` sets it so; :class:`Config` refuses another value), and is checked
    as that."""
    flip_p: float = 0.5
    """Horizontal flip probability (train)."""
    pad: int = 10
    """Zero padding before the random crop back to ``size`` (train; 10 px at 256×128 in both papers); 0 disables
    pad + crop."""
    lgt_p: float = 0.0
    """Local Grayscale Transformation probability (train; PAT paper era 0.5, the repo HEAD turned it off)."""
    erasing_p: float = 0.0
    """Reference RandomErasing probability (train; TMGF/O2CAP 0.5)."""
    norm: str = "vit_jx"
    """Normalisation preset: ``vit_jx`` (0.5/0.5, PAT), ``imagenet``, ``luperson`` (TMGF)."""

    def _checks(self) -> list[Check]:
        norms = tuple(NORM_PRESETS)
        return [
            ("flip_p", _probability(self.flip_p), "a probability in [0, 1]"),
            ("pad", self.pad >= 0, ">= 0 (0: no pad + crop)"),
            ("lgt_p", _probability(self.lgt_p), "a probability in [0, 1]"),
            ("erasing_p", _probability(self.erasing_p), "a probability in [0, 1]"),
            ("norm", self.norm in norms, f"one of {norms}"),
        ]

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)  # type: ignore[assignment]  # Hydra hands lists
        if len(self.size) != 2:
            raise ConfigError(f"data.transform.size={self.size!r}: expected (height, width)")
        _check("data.transform.", self)


RENAMED_KEYS = {f"data.{k}": f"data.transform.{k}" for k in ("flip_p", "pad", "lgt_p", "erasing_p", "norm")}
"""Keys that moved (old -> new, same meaning). An old key is refused in one line naming the new one, on the
command line and in a config file alike."""

BATCH_SCOPES = ("global", "per_rank")
"""``data.batch_scope`` choices: whose batch P×K is (see :class:`DataConfig`)."""
DATA_STORES = ("memory", "wids")
"""``data.store`` choices (``trainer.data.store.STORES``: ``memory`` maps the shards, one page-cache copy per
node; ``wids`` reads by index from the tars)."""
DATA_PIPELINES = ("per_image", "decoded", "gpu_decode")
"""``data.pipeline`` choices (``trainer.data.decoded.PIPELINES``; docs/input_pipeline.md)."""


@dataclass
class DataConfig:
    """Where the packed datasets are and how batches are formed."""

    root: str = "data/shards"
    """Folder holding one packed dataset per sub-folder (``python -m shards.pack --out ROOT/NAME``)."""
    sources: list[str] = field(default_factory=lambda: ["market1501"])
    """Training datasets (sub-folders of ``root``), merged with pid/camid offsets and a domain id each."""
    targets: list[str] = field(default_factory=lambda: ["dukemtmc"])
    """Evaluation datasets (their query and gallery splits)."""
    leave_one_out: list[str] = field(default_factory=list)
    """Multi-source protocol: with ``target`` set, sources = this pool minus the target, targets = [target]."""
    target: str | None = None
    """The held-out dataset of the leave-one-out protocol (``data.target=market1501``)."""
    ids_per_batch: int = 16
    """P: identities per GLOBAL batch (split over ranks, whole identities per rank)."""
    images_per_id: int = 4
    """K: images per identity in a batch."""
    batch_scope: str = "global"
    """``global``: P×K is the batch of one optimizer step over all ranks, whatever their number (the
    papers' batch; results independent of the world size; P must split over the ranks). ``per_rank``:
    P×K is each rank's batch, the step's is W·P×K (scales to any number of ranks; the LR follows
    ``train.optim.lr_scaling``). TMGF's P×K are ``tmgf.proxies_per_batch`` × ``tmgf.images_per_proxy``."""
    num_workers: int = 4
    """DataLoader workers per rank (decoding and augmentation run there)."""
    store: str = "memory"
    """``memory`` (the default: encoded bytes in RAM, the shards memory-mapped, so the page cache holds one copy
    per node shared by its ranks and DataLoader workers) or ``wids`` (indexed reads from the tar shards)."""
    pipeline: str = "per_image"
    """How training batches are made (docs/input_pipeline.md); the augmented tensors are the same on every path.
    ``per_image``: decode, resize and augment each image in the DataLoader workers (PIL), as the papers' code.
    ``decoded``: decode + resize once per pack and size into a uint8 array next to the shards (built on first use,
    ``N·3·H·W`` bytes; memory-mapped, one page-cache copy per node), then augment whole batches: in the workers
    on a CPU run, on the GPU on a GPU run; the fast choice whenever the decoded train split fits the disk.
    ``gpu_decode``: JPEG bytes decoded on the GPU in batches (nvJPEG), then the same batched augmentation; for
    sets too large to keep decoded (needs CUDA). Evaluation splits are read per image on every path."""
    synthetic: dict[str, SynthSourceConfig] = field(default_factory=dict)
    """Synthetic datasets by name; a source/target with such a name is generated and packed under ``cache_dir``."""
    cache_dir: str = ".cache/reid"
    """Where synthetic datasets are generated and packed (reused across runs)."""
    transform: TransformConfig = field(default_factory=TransformConfig)
    """Augmentation and normalisation of the images (train and test pipelines)."""

    def _checks(self) -> list[Check]:
        return [
            ("root", bool(self.root), "the folder holding the packed datasets"),
            ("ids_per_batch", self.ids_per_batch > 0, "> 0"),
            ("images_per_id", self.images_per_id > 0, "> 0"),
            ("num_workers", self.num_workers >= 0, ">= 0 (0: load in the training process)"),
            ("store", self.store in DATA_STORES, f"one of {DATA_STORES}"),
            ("pipeline", self.pipeline in DATA_PIPELINES, f"one of {DATA_PIPELINES}"),
            ("batch_scope", self.batch_scope in BATCH_SCOPES, f"one of {BATCH_SCOPES}"),
            ("cache_dir", bool(self.cache_dir), "the folder for synthetic datasets"),
        ]

    def resolved(self) -> tuple[list[str], list[str]]:
        """(sources, targets) after applying the leave-one-out protocol."""
        if self.target is None:
            return list(self.sources), list(self.targets)
        pool = self.leave_one_out or sorted({*self.sources, *self.targets})
        if self.target not in pool:
            raise ValueError(f"data.target={self.target!r}: expected one of {pool}")
        return [d for d in pool if d != self.target], [self.target]


CSL_FORMS = ("official", "paper")
"""``pat.csl_form`` choices (``trainer.losses.csl``)."""
CSL_PART_REDUCTIONS = ("mean", "sum")
"""``pat.csl_part_reduction`` choices."""
RENAMED_PAT_KEYS = {
    "psd_lambda": ("psd_alpha", "the paper's α, Eq. 7"),
    "psd_weight": ("psd_lambda_weight", "the paper's λ, Eq. 8"),
}
"""Old PAT keys whose names did not match the paper's symbols -> (new key, what it is). They are refused,
never reinterpreted: an old override keeps its meaning only under the new name."""


@dataclass
class PATConfig:
    """PAT's losses and memory bank; defaults are the official code's. Where the paper's text says
    otherwise a switch gives the paper's version (``docs/fidelity.md`` lists them).

    ``trainer.losses.psd.pat_total`` takes this object as it is: one definition of each knob."""

    csl: bool = True
    """Part tokens' memory bank and CSL on (False: Table 5's baseline, ID + triplet only)."""
    csl_k: int = 10
    """Neighbours per part in CSL (and per part for PSD)."""
    csl_form: str = "official"
    """CSL's similarity: ``official`` ``exp(-csl_scale * ||f - w||^2)`` (the code) or ``paper``
    ``exp(f . w / csl_tau)`` (Eq. 6 as printed). Both pick the k neighbours by that similarity."""
    csl_scale: float = 0.02
    """``official``: multiplier of the squared L2 distance (the code's PC_SCALE); the paper's τ = 0.02 of
    §4.4 / Fig. 5 behaves as this multiplier (the loss rises as it decreases)."""
    csl_tau: float = 0.02
    """``paper``: temperature τ dividing the dot product (Eq. 6)."""
    csl_part_reduction: str = "mean"
    """CSL over the parts: ``mean`` (the code) or ``sum`` (Eq. 10); ``sum`` = P x ``mean``."""
    csl_weight: float = 1.0
    """Weight of CSL in the total (PC_LR)."""
    csl_nan_to_zero: bool = False
    """Mirror the official NaN→0 guard per part (logsumexp makes NaN impossible in practice)."""
    memory_momentum: float = 0.1
    """Weight of the new feature in the bank update (M ← 0.9·M + 0.1·f)."""
    update_before_loss: bool = True
    """The method's memory hook writes the batch into the bank before the CSL loss (official order);
    False: after the optimizer step."""
    id_epsilon: float = 0.1
    """Label smoothing of the hard-label branch of the ID loss."""
    id_weight: float = 1.0
    """Weight of the ID (+PSD) term."""
    psd: bool = True
    """Part-guided Self-Distillation (paper, original release); False = repo HEAD, where it is silently off."""
    psd_alpha: float = 0.5
    """α (Eq. 7): weight of the neighbours' identities in the soft label (the true identity keeps 1 − α)."""
    psd_lambda_weight: float = 0.5
    """λ (Eq. 8): weight of the soft-label CE against the label-smoothed hard-label CE."""
    psd_lambda: float | None = None
    """Renamed to ``psd_alpha`` (same meaning, the paper's α); refused when set."""
    psd_weight: float | None = None
    """Renamed to ``psd_lambda_weight`` (same meaning, the paper's λ); refused when set."""
    repo_index_bug: bool = False
    """Reproduce the official off-by-one neighbour→identity lookup of PSD."""
    triplet_margin: float | None = None
    """None = soft-margin triplet (PAT); a number = hard margin."""
    triplet_squared: bool = False
    """Squared Euclidean distances in the triplet (Eq. 9); False = Euclidean (the code)."""
    triplet_weight: float = 1.0
    """Weight of the batch-hard triplet term on the pre-BN cls feature (0 turns it off)."""
    sd_weight: float = 0.0
    """Conventional self-distillation (Table 5's "B+SD", after SDViT): weight of the KL from the final
    logits to every earlier block's cls logits (``trainer.losses.psd.self_distillation_loss``); 0 = off."""
    sd_temperature: float = 3.0
    """Softmax temperature of that KL (SDViT: 3)."""

    def _checks(self) -> list[Check]:
        renamed = [(old, getattr(self, old) is None, f"no value: renamed to pat.{new} ({what}, same meaning); "
                                                     f"pass pat.{new}={getattr(self, old)} instead")
                   for old, (new, what) in RENAMED_PAT_KEYS.items()]
        return renamed + [
            ("csl_k", self.csl_k >= 1, ">= 1"),
            ("csl_form", self.csl_form in CSL_FORMS, f"one of {CSL_FORMS}"),
            ("csl_scale", self.csl_scale > 0, "> 0"),
            ("csl_tau", self.csl_tau > 0, "> 0"),
            ("csl_part_reduction", self.csl_part_reduction in CSL_PART_REDUCTIONS, f"one of {CSL_PART_REDUCTIONS}"),
            ("csl_weight", self.csl_weight >= 0, ">= 0"),
            ("memory_momentum", 0.0 < self.memory_momentum <= 1.0, "in (0, 1]"),
            ("id_epsilon", 0.0 <= self.id_epsilon < 1.0, "in [0, 1)"),
            ("id_weight", self.id_weight >= 0, ">= 0"),
            ("psd_alpha", _probability(self.psd_alpha), "in [0, 1]"),
            ("psd_lambda_weight", _probability(self.psd_lambda_weight), "in [0, 1]"),
            ("triplet_margin", self.triplet_margin is None or self.triplet_margin >= 0,
             "null (soft margin) or >= 0"),
            ("triplet_weight", self.triplet_weight >= 0, ">= 0"),
            ("sd_weight", self.sd_weight >= 0, ">= 0 (0: off)"),
            ("sd_temperature", self.sd_temperature > 0, "> 0"),
        ]


O2CAP_REDUCTIONS = ("mean", "camera_groups", "none")
O2CAP_FEW_CAMS = ("fill", "clip")


@dataclass
class O2CAPLossConfig:
    """Hyper-parameters of the O2CAP/TMGF association losses (defaults: ``TMGF_full.yml`` / O2CAP).

    ``trainer.losses.o2cap`` takes it as it is; :class:`TMGFConfig` extends it, so each knob has one
    definition and ``tmgf.<knob>`` overrides it."""

    temperature: float = 0.07
    """tau: association logits are cosine / tau."""
    neg_k: int = 50
    """Hard negative proxies per sample in both association losses (``BG_KNN``)."""
    pos_k: int = 3
    """Online positives: best per-camera nearest proxies kept (``POS_K``: 3 Market/MSMT17, 2 Duke)."""
    balance_w: float = 0.15
    """Weight of the instance-proxy cosine in the online balanced similarity (``BALANCE_W``)."""
    part_weight: float = 0.1
    """lambda_p: weight of the part losses (each averaged over the parts); 0 trains the global feature only."""
    reduction: str = "mean"
    """Batch reduction: ``mean`` (TMGF), ``camera_groups`` (O2CAP: mean per camera group in the batch,
    summed over the groups; with several ranks each rank reduces its own batch) or ``none`` (per sample)."""
    few_cams: str = "fill"
    """Fewer cameras with proxies than ``pos_k``: ``fill`` (official) or ``clip`` (see ``losses/o2cap.py``)."""

    def _checks(self) -> list[Check]:
        return [
            ("temperature", self.temperature > 0, "> 0"), ("neg_k", self.neg_k >= 0, ">= 0"),
            ("pos_k", self.pos_k >= 1, ">= 1"), ("balance_w", 0.0 <= self.balance_w <= 1.0, "in [0, 1]"),
            ("part_weight", self.part_weight >= 0, ">= 0"),
            ("reduction", self.reduction in O2CAP_REDUCTIONS, f"one of {O2CAP_REDUCTIONS}"),
            ("few_cams", self.few_cams in O2CAP_FEW_CAMS, f"one of {O2CAP_FEW_CAMS}"),
        ]

    def __post_init__(self) -> None:  # the losses take this object directly: check it when made
        _check("tmgf." if isinstance(self, TMGFConfig) else "O2CAPLossConfig.", self)


TMGF_CLUSTER_FEATURES = ("global", "concat")
TMGF_REDUCTIONS = ("mean", "camera_groups")
KNN_BACKENDS = ("auto", "torch", "faiss")
"""``tmgf.knn_backend`` choices (``trainer.cluster.knn.exact_knn``)."""
KNN_INDEXES = ("flat", "ivf")
"""``tmgf.knn_index`` choices (``trainer.cluster.knn.search_knn``)."""
TMGF_MEMORY_LAYOUTS = ("auto", "replicated", "sharded")
"""``tmgf.memory_layout`` choices (``trainer.memory.proxy.resolve_layout``)."""


@dataclass
class TMGFConfig(O2CAPLossConfig):
    """TMGF on O2CAP (``docs/methods/tmgf.md``); defaults are ``TMGF_full.yml``'s.

    The loss knobs are inherited from :class:`O2CAPLossConfig` (the method passes this object to the
    losses as it is); the fields below are the clustering, memory and sampling ones.
    """

    k1: int = 20
    """k-reciprocal neighbourhood size of the Jaccard distance."""
    k2: int = 6
    """Query-expansion size (self + k2-1 nearest neighbours) of the Jaccard distance."""
    eps: float = 0.5
    """DBSCAN radius on the Jaccard distance (a neighbour means J <= eps); dataset-sensitive (0.4-0.7)."""
    min_samples: int = 4
    """DBSCAN core-point threshold, the point itself included."""
    cluster_feature: str = "global"
    """Feature clustered every epoch: ``global`` (slot 0, official) or ``concat`` (all slots concatenated)."""
    cluster_distributed: bool = True
    """Shard the Jaccard/DBSCAN work over the ranks (same labels as one process); False: every rank alone."""
    knn_backend: str = "auto"
    """k-NN backend of the clustering: ``torch`` (blocked GEMM, CUDA or CPU), ``faiss`` or ``auto``."""
    knn_index: str = "flat"
    """k-NN search of the clustering (``docs/knn.md``): ``flat`` (exact) or ``ivf`` (faiss IVF index,
    approximate, database sharded over the ranks; its recall is measured at every clustering)."""
    knn_nprobe: int = 16
    """IVF lists visited per query (``knn_index=ivf``): more is slower and closer to exact search."""
    knn_recall_floor: float = 0.99
    """``knn_index=ivf``: a measured recall@k1 below this logs a one-line warning to raise ``knn_nprobe``."""
    use_ground_truth: bool = False
    """The paper's "w/ GT" upper bound: proxies from the true training identities instead of DBSCAN."""
    momentum: float = 0.2
    """mu of the proxy memory update M <- mu*M + (1-mu)*x (the new feature weighs 0.8)."""
    iters_per_epoch: int = 200
    """Optimizer steps per epoch, whatever the number of proxies (``TRAIN.ITERS``)."""
    proxies_per_batch: int = 8
    """Proxies per GLOBAL batch (class-uniform sampler; replaces ``data.ids_per_batch`` for TMGF)."""
    images_per_proxy: int = 4
    """Images per proxy in a batch (replaces ``data.images_per_id`` for TMGF); batch = 8 x 4 = 32."""
    sync_bn_stats: bool = True
    """Average BatchNorm running statistics over the ranks before every extraction, so that all ranks
    extract (and cluster) with the same eval-mode model; no-op on one process."""
    calibrate_necks: bool = True
    """Before the first clustering, set the BN necks' running statistics of a model whose necks never
    trained (``num_batches_tracked == 0``: a pretrained backbone with fresh necks) to the training set's
    statistics of the pre-neck features (exact, one pass, fp64). Otherwise eval-mode features (the
    clustering and the memory) are the raw ones while train-mode features are batch-centred: on a
    backbone whose features have a large mean the two are nearly orthogonal and the first epochs train
    against a memory they do not match. False = the official behaviour (running stats 0/1)."""
    eval_clustering: bool = False
    """At every evaluation also cluster the training set and report #clusters and their agreement with
    the true identities (ARI/NMI; the labels are read for the report only)."""
    memory_layout: str = "auto"
    """Proxy memory across ranks (``docs/proxy_memory.md``): ``replicated`` (every rank holds all P proxies
    and applies every update), ``sharded`` (each rank holds ~P/W proxies, the loss is computed
    model-parallel; same loss, gradients and memory), or ``auto``: sharded when W > 1, replicated on one
    process. A checkpoint resumes in either layout at any world size."""

    def _checks(self) -> list[Check]:
        return [c for c in super()._checks() if c[0] != "reduction"] + [
            ("k1", self.k1 >= 1, ">= 1"), ("k2", 1 <= self.k2 <= self.k1, "in [1, k1]"),
            ("eps", 0.0 < self.eps < 1.0, "in (0, 1)"), ("min_samples", self.min_samples >= 1, ">= 1"),
            ("cluster_feature", self.cluster_feature in TMGF_CLUSTER_FEATURES, f"one of {TMGF_CLUSTER_FEATURES}"),
            ("knn_backend", self.knn_backend in KNN_BACKENDS, f"one of {KNN_BACKENDS}"),
            ("knn_index", self.knn_index in KNN_INDEXES, f"one of {KNN_INDEXES}"),
            ("knn_index", not (self.knn_index == "ivf" and self.knn_backend == "torch"),
             "flat with tmgf.knn_backend=torch (the IVF index is faiss's: use knn_backend=auto or faiss)"),
            ("knn_nprobe", self.knn_nprobe >= 1, ">= 1"),
            ("knn_recall_floor", 0.0 <= self.knn_recall_floor <= 1.0, "in [0, 1]"),
            ("memory_layout", self.memory_layout in TMGF_MEMORY_LAYOUTS, f"one of {TMGF_MEMORY_LAYOUTS}"),
            ("reduction", self.reduction in TMGF_REDUCTIONS, f"one of {TMGF_REDUCTIONS}"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("iters_per_epoch", self.iters_per_epoch >= 1, ">= 1"),
            ("proxies_per_batch", self.proxies_per_batch >= 1, ">= 1"),
            ("images_per_proxy", self.images_per_proxy >= 1, ">= 1"),
        ]


MODEL_NAMES = ("pat", "tmgf", "vit")
"""``model.name`` choices: what ``trainer.models.registry`` registers (it refuses a name missing here, so
that a config is validated without importing any model)."""
BACKBONES = ("deit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_patch16_224", "vit_base_patch16_224",
             "vit_small_patch16_224", "vit_test")
"""``model.backbone`` choices: ``trainer.models.backbones.available_backbones()`` (a test keeps them equal)."""
WEIGHT_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
"""Weight-file formats ``model.pretrained`` may name (``trainer.models.weights.SUFFIXES``, kept equal by a test)."""
TIMM_PREFIX = "timm:"
"""``model.pretrained=timm:<model>[.<tag>]``: timm's weights (``trainer.models.weights``)."""
REGION_MODES = ("random", "fixed")
NECK_FEATS = ("before", "after")
TMGF_STEMS = ("ibn", "patch")


def _is_timm_name(spec: object) -> TypeGuard[str]:
    return isinstance(spec, str) and spec.startswith(TIMM_PREFIX)


_TIMM_EXAMPLE = "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"


def timm_name_problem(spec: str) -> str | None:
    """What a ``timm:`` value should be, as ``expected ...`` text, or None when timm has weights for it.

    Asks timm's registry (imported here only for a ``timm:`` value: parsing a config loads no model code)."""
    import timm
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    arch, tag = split_model_name_tag(spec[len(TIMM_PREFIX):])
    if not arch or not timm.is_model(arch):
        return (f"timm:<model>[.<pretrained tag>] naming a model timm {timm.__version__} knows, e.g. {_TIMM_EXAMPLE} "
                "(timm.list_pretrained('vit_*') lists them)")
    cfgs = get_arch_pretrained_cfgs(arch)
    if not cfgs:
        return f"a timm model with pretrained weights ({arch} has none in timm {timm.__version__})"
    if tag and f"{arch}.{tag}" not in cfgs:
        return f"a pretrained tag of {arch} that timm has: {', '.join(n.split('.', 1)[1] for n in cfgs)}"
    return None


@dataclass
class ViTModelConfig:
    """What every model reads: the ViT, its input and its weights."""

    name: str = "pat"
    """Registered model: ``pat`` (part-aware transformer), ``vit`` (the same ViT + BN-neck, no part tokens) or
    ``tmgf``; the ``model`` node carries the settings of every family (:class:`ModelConfig`)."""
    backbone: str = "vit_base_patch16_224"
    """Backbone arch (``trainer.models.backbones.available_backbones()``): timm ``vit_base_patch16_224``,
    ``vit_small_patch16_224``, ``deit_{tiny,small,base}_patch16_224``, or ``vit_test`` (depth 2, width 64)."""
    img_size: tuple[int, int] = (256, 128)
    """Input (height, width); with patch 16 the token grid is (H/16) x (W/16) = 16 x 8 for 256 x 128."""
    pretrained: str | None = None
    """Weights loaded into the backbone, or None: a local file (``.pth``/``.pt``, ``.npz``, ``.safetensors``),
    or ``timm:<model>[.<pretrained tag>]`` (e.g. ``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``), read
    from timm's cache (downloaded there when the machine is online): see ``trainer.models.weights``."""
    pretrained_grid: tuple[int, int] | None = None
    """Patch grid the pretrained position table was trained at; None infers it (square, or same as the model)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block (linear from 0 over the blocks)."""


@dataclass
class PATModelConfig:
    """The settings of ``trainer.models.pat``'s models: ``pat`` reads them all, ``vit`` the last two."""

    num_parts: int = 3
    """Part tokens P (PAT). Bands of H/2 rows with evenly spaced tops (0, 4, 8 for P=3 on a 16-row grid)."""
    part_regions: str = "random"
    """Regions in training: ``random`` (official: a random sub-rectangle of each band, redrawn every forward)
    or ``fixed`` (the full band)."""
    test_part_regions: str = "fixed"
    """Regions in eval mode. ``fixed`` (default) is deterministic; ``random`` reproduces the official code,
    whose test features are stochastic."""
    fixed_band_extra_row: bool = False
    """``fixed`` bands span H/2 rows; True gives the official commented-out test band of H/2+1 rows (off by one)."""
    region_seed: int = 0
    """Seed of the region generator (the same on every rank, so every rank draws the same regions)."""
    tie_part_tokens: bool = False
    """True: all part tokens share one parameter (the published-era code used ``part_token1`` for all three)."""
    cls_part_links: bool = True
    """cls <-> part-token attention, both ways (the official code); False = the paper's Eq. 3-4: the cls
    token attends to itself and the image tokens, a part token to itself and its region."""
    freeze_patch_embed: bool = True
    """Freeze the patch-embedding conv (PAT's FREEZE_PATCH_EMBED, the MoCo v3 trick)."""
    neck_feat: str = "before"
    """Eval-mode feature: ``before`` the BN-neck (PAT's test feature) or ``after`` it."""


@dataclass
class TMGFModelConfig:
    """The settings of ``trainer.models.tmgf``'s model (``tmgf``); ``pat``/``vit`` read none of them."""

    num_cams: int = 0
    """Cameras C of the camera embedding; 0 = every camera of the training sources (the method sizes the
    model from the data when it builds it; the config keeps 0). Camera ids are 0-based and offset per
    source, so every id must be < C."""
    cam_embed_coef: float = 3.0
    """Weight λ_c of the camera embedding added to every token (TMGF's ``SIE_COEF``).
    0 builds no camera embedding at all (the camera ids are then only checked)."""
    tmgf_stem: str = "ibn"
    """Patch embedding: ``ibn`` (TransReID-SSL's IBN conv stem + kernel-8 projection) or ``patch``
    (timm's plain 16x16 patch conv)."""
    tmgf_granularities: tuple[int, ...] = (2, 3)
    """Horizontal stripes per branch [K_1, K_2, ...] (paper Table 3: (2, 3), (2, 4), (3, 4)).
    One branch per entry; a single entry = one branch (TMGF2: (2,), TMGF3: (3,)); () = one branch
    and no parts (TMGF1, the baseline)."""
    tmgf_duplicate_last_block: bool = True
    """Each branch gets its own copy of the last block + final LayerNorm. False = one shared copy whose
    tokens feed every partition (TMGF4, "w/o Dup."); the global feature is then its cls."""
    tmgf_global: str = "mean"
    """Global feature: ``mean`` of the branches' cls tokens (full TMGF), or ``cls1``/``cls2``/...
    = the cls token of branch 1/2/... alone (TMGF5 / TMGF6)."""


@dataclass
class ModelConfig(TMGFModelConfig, PATModelConfig, ViTModelConfig):
    """What to build (``trainer.models.registry.build_model``). Defaults are PAT's (ViT-B/16 at 256x128, 3 parts).

    One flat ``model`` node made of each family's dataclass: Hydra's structured configs have no union of
    dataclasses chosen by a key (``model.name``), so every family's settings are present, and each family's
    dataclass says which of them its models read."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field as ``model.<field>=<value>: expected <what>``.

        Only what this object alone decides; the registered names (``name``, ``backbone``) are checked
        by ``build_model`` and ``trainer.config.validate``, whether ``pretrained`` exists (or a timm
        name is cached) by ``trainer.train.check_files`` (a config may name a file that another run
        will write)."""
        size, grid, glob = tuple(self.img_size), self.pretrained_grid, self.tmgf_global
        # a timm name is checked against timm's registry (no file or network); a path by its suffix only
        timm_problem = timm_name_problem(self.pretrained) if _is_timm_name(self.pretrained) else None
        branch = int(glob[3:]) if glob.startswith("cls") and glob[3:].isdigit() else 0
        # as TMGF builds its branches: one per granularity with duplication, else one shared
        branches = max(1, len(self.tmgf_granularities)) if self.tmgf_duplicate_last_block else 1
        min_parts = 1 if self.name == "pat" else 0  # PAT's part-aware attention needs a part token
        checks = [
            ("img_size", len(size) == 2 and min(size) > 0, "(height, width), both > 0"),
            ("pretrained", timm_problem is None, timm_problem or ""),
            ("pretrained", not self.pretrained or _is_timm_name(self.pretrained)
             or self.pretrained.lower().endswith(WEIGHT_SUFFIXES),
             f"null or a weight file ending in one of {WEIGHT_SUFFIXES}"),
            ("pretrained_grid", grid is None or (len(tuple(grid)) == 2 and min(grid) > 0),
             "null (inferred) or (rows, cols), both > 0"),
            ("drop_path_rate", 0.0 <= self.drop_path_rate < 1.0, "in [0, 1)"),
            ("num_parts", self.num_parts >= min_parts,
             ">= 1 (PAT needs a part token)" if min_parts else ">= 0"),
            ("part_regions", self.part_regions in REGION_MODES, f"one of {REGION_MODES}"),
            ("test_part_regions", self.test_part_regions in REGION_MODES, f"one of {REGION_MODES}"),
            ("neck_feat", self.neck_feat in NECK_FEATS, f"one of {NECK_FEATS}"),
            ("num_cams", self.num_cams >= 0, ">= 0 (0: set from the data)"),
            ("cam_embed_coef", self.cam_embed_coef >= 0.0, ">= 0"),
            ("tmgf_stem", self.tmgf_stem in TMGF_STEMS, f"one of {TMGF_STEMS}"),
            ("tmgf_granularities", all(int(g) >= 1 for g in self.tmgf_granularities), "stripe counts >= 1"),
            ("tmgf_global", glob == "mean" or 1 <= branch <= branches,
             f"'mean' or cls1..cls{branches} (one per branch of tmgf_granularities / tmgf_duplicate_last_block)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected {expected}")


METHOD_MODELS = {"pat": ("pat", "vit"), "tmgf": ("tmgf",)}
"""The methods (``trainer.methods.METHODS``, kept equal by a test; ``configs/method/`` has one file each) and
the models each can train: PAT needs a classifier model (``num_classes``), TMGF the ``[B, slots, dim]``
features of ``model(img, camid)``."""


@dataclass(frozen=True)
class BatchPlan:
    """What a run does per optimizer step on a given number of ranks (:meth:`Config.batch_plan`)."""

    world_size: int
    scope: str
    """``data.batch_scope``."""
    ids_key: str
    """The config key of P (``data.ids_per_batch`` or ``tmgf.proxies_per_batch``)."""
    images_key: str
    """The config key of K."""
    ids: int
    """Identities (proxies) per step over all ranks: what the sampler draws."""
    ids_per_rank: int
    images_per_id: int
    reference: int
    """The experiment's batch in images (P×K as configured): what its LR was set for."""
    lr_scaling: str
    lr_factor: float
    lr: float
    """``train.optim.lr`` × ``lr_factor``: the base LR the run uses."""

    @property
    def images(self) -> int:
        """Images per step over all ranks."""
        return self.ids * self.images_per_id

    @property
    def images_per_rank(self) -> int:
        return self.ids_per_rank * self.images_per_id

    def describe(self) -> str:
        return (f"batch: {self.ids_per_rank} x {self.images_per_id} = {self.images_per_rank} images per rank, "
                f"{self.world_size} ranks, {self.images} per step (data.batch_scope={self.scope}); "
                f"lr {self.lr:.4g} (train.optim.lr x {self.lr_factor:.4g}, lr_scaling={self.lr_scaling})")


@dataclass
class Config:
    """One run. ``python -m trainer.train exp=NAME key=value …`` composes it from ``configs/``."""

    name: str = "default"
    """Experiment name (set by each ``exp=`` file)."""
    method: str = "pat"
    """Training method: ``pat`` (supervised domain generalization) or ``tmgf`` (unsupervised)."""
    run_dir: str = "runs/${name}"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model_final.safetensors, plots/."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pat: PATConfig = field(default_factory=PATConfig)
    tmgf: TMGFConfig = field(default_factory=TMGFConfig)

    def batch_plan(self, world_size: int) -> BatchPlan:
        """The batches and the LR of this run on ``world_size`` ranks; a combination that cannot run is a
        :class:`ConfigError` naming both fixes."""
        if self.method == "tmgf":
            p_key, k_key, P, K = "tmgf.proxies_per_batch", "tmgf.images_per_proxy", self.tmgf.proxies_per_batch, \
                self.tmgf.images_per_proxy
        else:
            p_key, k_key, P, K = "data.ids_per_batch", "data.images_per_id", self.data.ids_per_batch, \
                self.data.images_per_id
        W = int(world_size)
        if self.data.batch_scope == "global" and P % W:
            raise ConfigError(f"{p_key}={P} identities per step do not split over {W} ranks (data.batch_scope=global "
                              f"gives every rank whole identities of one global batch); use data.batch_scope=per_rank "
                              f"({P} identities per rank, {P * W} per step, with train.optim.lr_scaling=linear or "
                              f"sqrt), or a number of ranks that divides {P}")
        ids = P if self.data.batch_scope == "global" else P * W
        ratio = ids / P  # global batch / the experiment's
        o = self.train.optim
        factor = {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[o.lr_scaling]
        return BatchPlan(world_size=W, scope=self.data.batch_scope, ids_key=p_key, images_key=k_key, ids=ids,
                         ids_per_rank=ids // W, images_per_id=K, reference=P * K, lr_scaling=o.lr_scaling,
                         lr_factor=factor, lr=o.lr * factor)

    def _checks(self) -> list[Check]:
        methods, paired = tuple(METHOD_MODELS), METHOD_MODELS.get(self.method)
        size = tuple(self.model.img_size)
        return [
            ("name", bool(self.name), "a non-empty experiment name"),
            ("method", self.method in methods, f"one of {methods}"),
            ("run_dir", bool(self.run_dir), "the run's folder"),
            ("model.name", self.model.name in MODEL_NAMES, f"one of {MODEL_NAMES}"),
            ("model.name", paired is None or self.model.name in paired, f"one of {paired} for method={self.method}"),
            ("model.backbone", self.model.backbone in BACKBONES, f"one of {BACKBONES}"),
            ("data.transform.size", tuple(self.data.transform.size) == size,
             f"model.img_size={list(size)}, the model's input (leave it unset: it follows model.img_size)"),
        ]


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("data", "model", "method", "train")
"""Config groups (``configs/<group>/``): each picks one file, by an experiment's ``defaults:`` or on the
command line (``data=duke``)."""


def pat_lr(pool: list[str], target: str) -> float:
    """PAT's base LR for a leave-one-out source set: 1e-3 (the paper), 4e-4 when MSMT17 is a source.

    The 4e-4 is not in the paper: it comes from a comment in the official config
    (``BASE_LR: 0.001 # 0.0004 for msmt``)."""
    return 4e-4 if "msmt17" in pool and target != "msmt17" else 1e-3


def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("reid.pat_lr", lambda pool, target: pat_lr(list(pool), target), replace=True)

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: str | os.PathLike[str] | None = None) -> Config:
    """Compose ``configs/config.yaml`` with ``overrides``; returns a validated :class:`Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _refuse_renamed(overrides)
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base=None):
            node = hydra_compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(node)
    except Exception as exc:
        own = _own_error(exc) or _renamed_in_file(exc) or _missing_group_choice(exc, config_dir or CONFIG_DIR)
        if own is not None:  # already one line naming the key or value
            raise own from None
        raise ConfigError(f"config: {_one_line(exc)}") from exc
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes (Hydra wraps OmegaConf's errors), each once."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not seen for seen in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _own_error(exc: BaseException) -> ConfigError | None:
    return next((e for e in _chain(exc) if isinstance(e, ConfigError)), None)


def _refuse_renamed(overrides: list[str] | tuple[str, ...]) -> None:
    for override in overrides:
        key, _, value = override.partition("=")
        new = RENAMED_KEYS.get(key.lstrip("+~"))
        if new is not None:
            raise ConfigError(f"{key.lstrip('+~')}: renamed to {new} (same meaning); pass {new}={value} instead")


def _renamed_in_file(exc: BaseException) -> ConfigError | None:
    """An old key in a config file: OmegaConf refuses it as unknown, naming its full key."""
    for e in _chain(exc):
        old = str(getattr(e, "full_key", ""))
        if old in RENAMED_KEYS:
            return ConfigError(f"{old}: renamed to {RENAMED_KEYS[old]} (same meaning); write {RENAMED_KEYS[old]} in "
                               "the config file")
    return None


def _missing_group_choice(exc: BaseException, config_dir: str | os.PathLike[str]) -> ConfigError | None:
    """``data=nope``: the files of ``configs/data/`` are the choices (``exp`` keeps Hydra's wording)."""
    for e in _chain(exc):
        found = re.search(r"Could not find '(\w+)/([^']*)'", str(e))
        if found and found.group(1) in GROUPS:
            group, choice = found.groups()
            options = tuple(sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml")))
            return ConfigError(f"{group}={choice!r}: expected one of {options}")
    return None


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines (search paths, object types): keep what names the problem."""
    parts: list[str] = []
    for e in _chain(exc):
        for line in str(e).splitlines():
            line = line.strip()
            if not line or "$VALUE" in line or line.startswith(
                    ("full_key", "object_type", "reference_type", "provider=", "Config search", "To append")):
                continue
            if line.startswith("Available options"):
                break
            if line not in parts:
                parts.append(line)
    if "Could not find 'exp/" in " ".join(parts):
        options = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))
        parts = [parts[0], f"available: {', '.join(options)}"]
    return "; ".join(parts[:3]) or type(exc).__name__


def validate(cfg: Config) -> None:
    """Check every field and the cross-field rules the run relies on; raises :class:`ConfigError`
    ``key=value: expected <what>`` for the first that fails. Reads no file (see ``trainer.train.check_files``)."""
    _check("", cfg)
    _check("data.", cfg.data)
    _check("data.transform.", cfg.data.transform)
    for name, spec in cfg.data.synthetic.items():
        _check(f"data.synthetic.{name}.", spec)
        problem = spec.problem()
        if problem is not None:
            raise ConfigError(f"data.synthetic.{name}.{problem}")
    try:
        sources, _ = cfg.data.resolved()
        cfg.model.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not sources:
        key = "data.leave_one_out" if cfg.data.target is not None else "data.sources"
        raise ConfigError(f"{key}={_value(cfg, key)!r}: expected at least one training dataset")
    for prefix, node in (("train.", cfg.train), ("train.optim.", cfg.train.optim), ("eval.", cfg.eval),
                         ("pat.", cfg.pat), ("tmgf.", cfg.tmgf)):
        _check(prefix, node)


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
