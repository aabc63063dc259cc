"""Structured configuration: every setting is a dataclass field with a docstring (torchtitan style).

The dataclasses are registered with Hydra's ConfigStore as the schema of ``configs/config.yaml``;
``compose(overrides)`` gives a validated :class:`Config`, the one object a run is a function of.
Errors in overrides are one line naming the key or value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trainer.models.registry import ModelConfig

@dataclass
class OptimConfig:
    """Optimizer and per-epoch LR schedule."""

    name: str = "sgd"
    """``sgd`` (PAT, TMGF) or ``adam`` (O2CAP)."""
    lr: float = 1e-3
    """Base learning rate (PAT: 1e-3, 4e-4 when MSMT17 is a source; TMGF: 3.5e-4)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Applied to every trainable tensor, biases and norms included, as the official code does."""
    bias_lr_factor: float = 2.0
    """LR multiplier for bias parameters (PAT: 2, TMGF: 1)."""
    schedule: str = "cosine"
    """``cosine`` (timm CosineLRScheduler, PAT) or ``multistep`` (warm-up multi-step, TMGF/O2CAP)."""
    warmup_epochs: int = 5
    """Linear warm-up length in epochs."""
    warmup_factor: float = 0.01
    """Warm-up starts at ``warmup_factor * lr``."""
    cosine_t_initial: int = 120
    """Cosine period in epochs; the PAT repo hard-codes 120 with 60 epochs (LR ends near 0.5×base)."""
    cosine_lr_min_factor: float = 0.002
    """Cosine floor as a fraction of ``lr``."""
    milestones: tuple[int, ...] = (20, 40)
    """Multi-step decay epochs (0-based) for ``multistep``."""
    gamma: float = 0.1
    """Multi-step decay factor."""


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

    def resolved(self) -> tuple[list[str], list[str]]:
        """(sources, targets) after applying the leave-one-out protocol."""
        if self.target is None:
            return list(self.sources), list(self.targets)
        pool = self.leave_one_out or sorted({*self.sources, *self.targets})
        if self.target not in pool:
            raise ValueError(f"data.target={self.target!r}: expected one of {pool}")
        return [d for d in pool if d != self.target], [self.target]


@dataclass
class PATConfig:
    """PAT's losses and memory bank (``reference/pat.md`` §2–§4); defaults are the official code's.

    ``trainer.losses.psd.pat_total`` takes this object as it is: one definition of each knob."""

    csl: bool = True
    """Part tokens' memory bank and CSL on (False: Table 5's baseline, ID + triplet only)."""
    csl_k: int = 10
    """Neighbours per part in CSL (and per part for PSD)."""
    csl_scale: float = 0.02
    """Multiplier of the squared L2 distance in CSL's softmax (the official PC_SCALE)."""
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
    psd_lambda: float = 0.5
    """λ: weight of the neighbour-identity distribution inside the soft target."""
    psd_weight: float = 0.5
    """w: weight of the soft-target CE against the label-smoothed CE."""
    repo_index_bug: bool = False
    """Reproduce the official off-by-one neighbour→identity lookup of PSD."""
    triplet_margin: float | None = None
    """None = soft-margin triplet (PAT); a number = hard margin."""
    triplet_weight: float = 1.0
    """Weight of the batch-hard triplet term on the pre-BN cls feature (0 turns it off)."""


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

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("temperature", self.temperature > 0, "> 0"), ("neg_k", self.neg_k >= 0, ">= 0"),
            ("pos_k", self.pos_k >= 1, ">= 1"), ("balance_w", 0.0 <= self.balance_w <= 1.0, "in [0, 1]"),
            ("part_weight", self.part_weight >= 0, ">= 0"),
            ("reduction", self.reduction in O2CAP_REDUCTIONS, f"one of {O2CAP_REDUCTIONS}"),
            ("few_cams", self.few_cams in O2CAP_FEW_CAMS, f"one of {O2CAP_FEW_CAMS}"),
        ]

    def __post_init__(self) -> None:
        prefix = "tmgf." if isinstance(self, TMGFConfig) else "O2CAPLossConfig."
        for name, ok, expected in self._checks():
            if not ok:
                raise ValueError(f"{prefix}{name}={getattr(self, name)!r}: expected {expected}")


TMGF_CLUSTER_FEATURES = ("global", "concat")
TMGF_REDUCTIONS = ("mean", "camera_groups")


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

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [c for c in super()._checks() if c[0] != "reduction"] + [
            ("k1", self.k1 >= 1, ">= 1"), ("k2", 1 <= self.k2 <= self.k1, "in [1, k1]"),
            ("eps", 0.0 < self.eps < 1.0, "in (0, 1)"), ("min_samples", self.min_samples >= 1, ">= 1"),
            ("cluster_feature", self.cluster_feature in TMGF_CLUSTER_FEATURES, f"one of {TMGF_CLUSTER_FEATURES}"),
            ("knn_backend", self.knn_backend in ("auto", "torch", "faiss"), "one of ('auto', 'torch', 'faiss')"),
            ("reduction", self.reduction in TMGF_REDUCTIONS, f"one of {TMGF_REDUCTIONS}"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("iters_per_epoch", self.iters_per_epoch >= 1, ">= 1"),
            ("proxies_per_batch", self.proxies_per_batch >= 1, ">= 1"),
            ("images_per_proxy", self.images_per_proxy >= 1, ">= 1"),
        ]


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


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A bad override, key or value: the message is one line naming it."""


def pat_lr(pool: list[str], target: str) -> float:
    """PAT's base LR for a leave-one-out source set: 4e-4 when MSMT17 is a source, else 1e-3 (the paper)."""
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
        raise ConfigError(f"config: {_one_line(exc)}") from exc
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


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
    """Cross-field checks Hydra cannot express; raises :class:`ConfigError` naming the key."""
    if cfg.method not in ("pat", "tmgf"):
        raise ConfigError(f"method={cfg.method!r}: expected 'pat' or 'tmgf'")
    try:
        sources, targets = cfg.data.resolved()
        cfg.model.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not sources:
        raise ConfigError("data.sources is empty: expected at least one training dataset")
    if cfg.data.ids_per_batch <= 0 or cfg.data.images_per_id <= 0:
        raise ConfigError("data.ids_per_batch and data.images_per_id must be positive")
    if cfg.train.epochs <= 0:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: expected > 0")
    if cfg.eval.period <= 0:
        raise ConfigError(f"eval.period={cfg.eval.period}: expected > 0")
    if not -1 <= cfg.train.metrics_port <= 65535:
        raise ConfigError(f"train.metrics_port={cfg.train.metrics_port}: expected -1 (off), 0 (any free port) "
                          "or a port in 1..65535")


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
