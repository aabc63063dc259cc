"""Structured configuration: every setting is a dataclass field with a docstring (torchtitan style).

The dataclasses are registered with Hydra's ConfigStore as the schema of ``configs/config.yaml``;
``compose(overrides)`` gives a validated :class:`Config`, the one object a run is a function of.
Every field is checked there (choices, ranges, cross-field rules), so a bad value is refused before
any work is queued, as one line ``key=value: expected <what>``. Each dataclass lists its checks in
``_checks()``; :func:`check_files` adds what depends on this machine's files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shards.errors import UserError
from trainer.models.registry import ModelConfig


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
    """Serve the latest metrics to Prometheus from rank 0 on this port (``trainer/engine/prometheus.py``);
    -1 = off, 0 = any free port (the URL is logged as a ``metrics_server`` record)."""
    metrics_addr: str = "127.0.0.1"
    """Address the Prometheus exporter binds to (loopback by default: expose it on purpose)."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit. For tests."""

    def _checks(self) -> list[Check]:
        return [
            ("epochs", self.epochs > 0, "> 0"),
            ("seed", self.seed >= 0, ">= 0"),  # the samplers' seed sequences take non-negative seeds
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("resume", bool(self.resume), f"one of {RESUME_MODES} or a checkpoint directory"),
            ("ckpt_every_steps", self.ckpt_every_steps >= 0, ">= 0 (0: only at epoch ends)"),
            ("ckpt_every_epochs", self.ckpt_every_epochs >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, ">= 0 (0: keep all)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("metrics_port", -1 <= self.metrics_port <= 65535,
             "-1 (off), 0 (any free port) or a port in 1..65535"),
            ("metrics_addr", bool(self.metrics_addr), "an address to bind, e.g. 127.0.0.1"),
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
        from shards.synth import SynthConfig  # numpy + PIL: loaded only when a config has synthetic sets

        try:
            SynthConfig(out="", **asdict(self)).resolved()
        except ValueError as exc:
            return str(exc)
        return None


DATA_STORES = ("memory", "wids")
"""``data.store`` choices (opened by ``trainer.methods.common.open_store``)."""


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
    num_workers: int = 4
    """DataLoader workers per rank (decoding and augmentation run there)."""
    store: str = "memory"
    """``memory`` (encoded bytes held in RAM, the default) or ``wids`` (indexed reads from the tar shards)."""
    synthetic: dict[str, SynthSourceConfig] = field(default_factory=dict)
    """Synthetic datasets by name; a source/target with such a name is generated and packed under ``cache_dir``."""
    cache_dir: str = ".cache/reid"
    """Where synthetic datasets are generated and packed (reused across runs)."""
    flip_p: float = 0.5
    """Horizontal flip probability (train)."""
    pad: int = 10
    """Zero padding before the random crop back to the input size (train; 10 px at 256×128 in both papers)."""
    lgt_p: float = 0.0
    """Local Grayscale Transformation probability (PAT paper era 0.5; the repo HEAD turned it off)."""
    erasing_p: float = 0.0
    """Random erasing probability (TMGF/O2CAP 0.5)."""
    norm: str = "vit_jx"
    """Normalisation preset: ``vit_jx`` (0.5/0.5, PAT), ``imagenet``, ``luperson`` (TMGF)."""

    def _checks(self) -> list[Check]:
        from trainer.data.transforms import NORM_PRESETS  # the presets the transforms define

        norms = tuple(NORM_PRESETS)
        return [
            ("root", bool(self.root), "the folder holding the packed datasets"),
            ("ids_per_batch", self.ids_per_batch > 0, "> 0"),
            ("images_per_id", self.images_per_id > 0, "> 0"),
            ("num_workers", self.num_workers >= 0, ">= 0 (0: load in the training process)"),
            ("store", self.store in DATA_STORES, f"one of {DATA_STORES}"),
            ("cache_dir", bool(self.cache_dir), "the folder for synthetic datasets"),
            ("flip_p", _probability(self.flip_p), "a probability in [0, 1]"),
            ("pad", self.pad >= 0, ">= 0 (0: no pad + crop)"),
            ("lgt_p", _probability(self.lgt_p), "a probability in [0, 1]"),
            ("erasing_p", _probability(self.erasing_p), "a probability in [0, 1]"),
            ("norm", self.norm in norms, f"one of {norms}"),
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
    """Momentum-update the bank with the batch before the CSL loss (official order)."""
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


@dataclass
class TMGFConfig(O2CAPLossConfig):
    """TMGF on O2CAP (``reference/tmgf_o2cap.md``); defaults are ``TMGF_full.yml``'s.

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

    def _checks(self) -> list[Check]:
        return [c for c in super()._checks() if c[0] != "reduction"] + [
            ("k1", self.k1 >= 1, ">= 1"), ("k2", 1 <= self.k2 <= self.k1, "in [1, k1]"),
            ("eps", 0.0 < self.eps < 1.0, "in (0, 1)"), ("min_samples", self.min_samples >= 1, ">= 1"),
            ("cluster_feature", self.cluster_feature in TMGF_CLUSTER_FEATURES, f"one of {TMGF_CLUSTER_FEATURES}"),
            ("knn_backend", self.knn_backend in KNN_BACKENDS, f"one of {KNN_BACKENDS}"),
            ("reduction", self.reduction in TMGF_REDUCTIONS, f"one of {TMGF_REDUCTIONS}"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("iters_per_epoch", self.iters_per_epoch >= 1, ">= 1"),
            ("proxies_per_batch", self.proxies_per_batch >= 1, ">= 1"),
            ("images_per_proxy", self.images_per_proxy >= 1, ">= 1"),
        ]


METHOD_MODELS = {"pat": ("pat", "vit"), "tmgf": ("tmgf",)}
"""Models each method can train: PAT needs a classifier model (``num_classes``), TMGF the
``[B, slots, dim]`` features of ``model(img, camid)``."""


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

    def _checks(self) -> list[Check]:
        from trainer.methods import METHODS
        from trainer.models import available_backbones, available_models

        methods, models, backbones = tuple(METHODS), tuple(available_models()), tuple(available_backbones())
        paired = METHOD_MODELS.get(self.method)
        return [
            ("name", bool(self.name), "a non-empty experiment name"),
            ("method", self.method in methods, f"one of {methods}"),
            ("run_dir", bool(self.run_dir), "the run's folder"),
            ("model.name", self.model.name in models, f"one of {models}"),
            ("model.name", paired is None or self.model.name in paired, f"one of {paired} for method={self.method}"),
            ("model.backbone", self.model.backbone in backbones, f"one of {backbones}"),
        ]


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base=None):
            node = hydra_compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(node)
    except Exception as exc:
        own = _own_error(exc)
        if own is not None:  # a dataclass refused its values while OmegaConf built it: already one line
            raise own from None
        raise ConfigError(f"config: {_one_line(exc)}") from exc
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def _own_error(exc: BaseException) -> ConfigError | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ConfigError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines (search paths, object types): keep what names the problem."""
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for line in str(e).splitlines():
            line = line.strip()
            if not line or "$VALUE" in line or line.startswith(("full_key", "object_type", "reference_type", "provider=",
                                                                  "Config search", "To append")):
                continue
            if line.startswith("Available options"):
                break
            if line not in parts:
                parts.append(line)
        e = e.__cause__ or e.__context__
    if "Could not find 'exp/" in " ".join(parts):
        options = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))
        parts = [parts[0], f"available: {', '.join(options)}"]
    return "; ".join(parts[:3]) or type(exc).__name__


def validate(cfg: Config) -> None:
    """Check every field and the cross-field rules the run relies on; raises :class:`ConfigError`
    ``key=value: expected <what>`` for the first that fails. Reads no file (see :func:`check_files`)."""
    _check("", cfg)
    _check("data.", cfg.data)
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


def check_files(cfg: Config) -> None:
    """Refuse a config naming a file this machine does not have (one line: key, path, what to do).

    Separate from :func:`validate` because a config is valid before its files exist: the paper
    experiments name weights fetched separately (under ``pretrained/``) and a chained run names the
    model an earlier run writes (``exp=tmgf_demo``). An entry point calls it once, right before work
    starts; it reads only."""
    pretrained = cfg.model.pretrained
    if pretrained and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such file ({Path(pretrained).absolute()}); place the "
                          "weight file there, pass the path of another (.pth/.pt/.npz/.safetensors), or "
                          "model.pretrained='' to train from scratch")
    resume = cfg.train.resume
    if resume not in RESUME_MODES and not (Path(resume) / "state.pt").is_file():
        raise ConfigError(f"train.resume={resume!r}: no checkpoint at {Path(resume).absolute()} (no state.pt); pass a "
                          "checkpoint folder (RUN_DIR/checkpoints/step_...), train.resume=auto or train.resume=never")


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
