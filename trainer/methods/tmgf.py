"""TMGF on O2CAP (WACV'23 W) as an engine method: unsupervised, re-clustered every epoch.

At the start of every epoch (``docs/methods/tmgf.md`` §Epoch, §Clustering, §Proxies)::

    features [N, S, D] of all training images   exact-once sharded extraction, eval mode, test
                                                transform, camera ids; gathered on every rank
    labels  = jaccard_dbscan(features[:, 0])    k-reciprocal Jaccard + DBSCAN, -1 = outlier (dropped)
    proxies = make_camera_proxies(labels, cam)  one proxy per (cluster, camera)
    memory  <- proxy_centers(features)          every slot (global + parts), same proxy ids
    sampler <- proxy labels                     class-uniform: 8 proxies x 4 images, 200 steps

then per step: ``feats = model(img, camid)`` → ``tmgf_loss`` against the pre-update memory →
optimizer step → ``memory.update`` with the all-gathered detached features. The memory is replicated
(every rank holds all proxies) or, by default on several ranks, sharded by proxies
(``tmgf.memory_layout``, ``docs/proxy_memory.md``): then the step gathers the global batch once, the
loss is computed model-parallel (``tmgf_loss_sharded``) and each rank updates its own proxies from the
same gathered batch. The training labels are never read, except by the "w/ GT" variant
(``tmgf.use_ground_truth``) and by the clustering report (ARI/NMI against the truth).

Resume: pseudo labels, proxies and memory travel in the checkpoint, the sampler's position in the
engine's record of it (``epoch``, ``step_in_epoch``); a resume inside an epoch
(``step_in_epoch > 0``) keeps them and does **not** re-cluster, so an interrupted run ends
bit-identical to an uninterrupted one. A resume at an epoch boundary re-clusters like the
uninterrupted run does at that point. The memory is saved whole (``ProxyMemory.full_state_dict``), so a
run resumes at another world size and in the other layout.

Cluster statistics: every re-clustering's numbers (``clusters``, ``outliers``, ``proxies``, and
``ari``/``nmi`` against the true identities, for the record only) are added to the logs of the
first training step after it, so they land in that step's ``train`` record of ``metrics.jsonl``;
:attr:`TMGFMethod.history` keeps them all (and travels in the checkpoint).

Several ranks: BatchNorm running statistics are per rank under DDP, so before every extraction
they are averaged over the ranks (``tmgf.sync_bn_stats``): all ranks then extract with one and the
same eval-mode model, and the pseudo-labelling step of world = W equals that of world = 1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import dist
from trainer.cluster.pipeline import jaccard_dbscan
from trainer.cluster.proxies import CameraProxies, make_camera_proxies, proxy_centers
from trainer.config import Config
from trainer.data.loader import TrainLoader, build_train_loader
from trainer.engine.method import Method, StepResult
from trainer.losses.o2cap import ProxyTables, tmgf_loss, tmgf_loss_sharded
from trainer.memory.proxy import ProxyMemory
from trainer.methods.common import evaluate_targets, extract, open_store, open_targets, transforms
from trainer.models import build_model

log = logging.getLogger(__name__)

_CAM_INPUTS = ("img", "camid")


class SlotView(nn.Module):
    """What the extractor gathers from a TMGF model (2-D rows): ``all`` slots (BN'd, L2) flattened to
    [B, S*D], ``raw`` slots (before the BN necks) flattened, or ``global`` (slot 0: the test-time
    feature, docs/methods/tmgf.md §Model)."""

    def __init__(self, model: nn.Module, view: str) -> None:
        super().__init__()
        if view not in ("all", "raw", "global"):
            raise ValueError(f"SlotView: view={view!r}: expected 'all', 'raw' or 'global'")
        self.model: Any = model  # TMGF-like: model(img, camid) and raw_features(img, camid)
        self.view = view
        self.train(model.training)  # the extractor restores this mode afterwards: keep the model's own

    def forward(self, img: torch.Tensor, camid: torch.Tensor) -> torch.Tensor:
        if self.view == "raw":
            return self.model.raw_features(img, camid).flatten(1)
        out = self.model(img, camid)
        return out[:, 0] if self.view == "global" else out.flatten(1)


@torch.no_grad()
def average_bn_stats(model: nn.Module) -> None:
    """Average every BatchNorm's running mean/var over the ranks (collective; identity on one process)."""
    world = dist.get_world_size()
    if world <= 1:
        return
    for m in model.modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
                and m.running_var is not None):
            for buf in (m.running_mean, m.running_var):
                t = buf.detach().to(dist.comm_device(), torch.float64)
                buf.copy_((dist.all_reduce(t) / world).to(buf.device, buf.dtype))


def fresh_necks(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm] | None:
    """The model's BN necks when none of them has ever run in train mode, else None."""
    necks = getattr(model, "necks", None)
    if necks is None or not hasattr(model, "raw_features"):
        return None
    necks = list(necks)
    if not all(isinstance(n, nn.modules.batchnorm._BatchNorm) and n.track_running_stats for n in necks):
        return None
    return necks if all(int(n.num_batches_tracked) == 0 for n in necks) else None


@torch.no_grad()
def calibrate_necks(necks: list[nn.modules.batchnorm._BatchNorm], raw: torch.Tensor) -> torch.Tensor:
    """Set each neck's running mean/var (unbiased, as BN keeps it) to those of ``raw`` [N, S, D] (fp64),
    mark it calibrated (``num_batches_tracked = 1``) and return the eval-mode model output for ``raw``: BN with
    the new statistics, then L2 (as ``TMGF.forward``), so that no second extraction pass is needed."""
    if raw.shape[0] < 2:
        raise ValueError(f"calibrate_necks: {raw.shape[0]} training image(s); need >= 2 for a variance")
    x = raw.to(torch.float64)
    mean, var = x.mean(dim=0), x.var(dim=0, unbiased=True)  # [S, D]
    out = []
    for i, neck in enumerate(necks):
        # track_running_stats (as fresh_necks checks): BN keeps all three buffers
        assert neck.running_mean is not None and neck.running_var is not None and neck.num_batches_tracked is not None
        neck.running_mean.copy_(mean[i].to(neck.running_mean.dtype))
        neck.running_var.copy_(var[i].to(neck.running_var.dtype))
        neck.num_batches_tracked.fill_(1)  # "has statistics": the necks are no longer fresh
        neck.eval()
        out.append(neck(raw[:, i].to(neck.running_mean.dtype)))
    return F.normalize(torch.stack(out, dim=1), dim=-1)


def cluster_features(feats: torch.Tensor, which: str) -> torch.Tensor:
    """[N, S, D] slot features -> [N, D'] the clustering runs on."""
    if which == "global":
        return feats[:, 0]
    if which == "concat":
        return F.normalize(F.normalize(feats.float(), dim=-1).flatten(1), dim=-1)
    raise ValueError(f"tmgf.cluster_feature={which!r}: expected 'global' or 'concat'")


def clustering_stats(labels: np.ndarray, proxies: CameraProxies | None, truth: np.ndarray) -> dict[str, float]:
    """#clusters / #outliers / #proxies and the agreement with the true identities (report only)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    keep = labels >= 0
    out: dict[str, float] = {
        "clusters": int(labels.max()) + 1 if keep.any() else 0,
        "outliers": int((~keep).sum()),
        "true_ids": int(np.unique(truth).size),
        "images": int(labels.size),  # the outlier ratio's denominator
    }
    if proxies is not None:
        out["proxies"] = proxies.num_proxies
    # outliers count as singletons, so a run that drops everything does not look perfect
    singles = np.where(keep, labels, labels.max(initial=-1) + 1 + np.arange(labels.size))
    out["ari"] = float(adjusted_rand_score(truth, singles))
    out["nmi"] = float(normalized_mutual_info_score(truth, singles))
    return out


class TMGFMethod(Method):
    """TMGF/O2CAP: per-epoch pseudo labels, camera-aware proxy memories, offline + online losses."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.t = cfg.tmgf
        sources, _ = cfg.data.resolved()  # ensured once per run, before the method (trainer.train.run)
        self.train_store = open_store(cfg, sources, "train", relabel=True)
        self.targets = open_targets(cfg)
        for target in self.targets:
            for split in (target.query, target.gallery):
                top = int(split.camid.max()) + 1 if len(split) else 0
                if top > self.train_store.num_cams:
                    raise ValueError(f"data.targets: {target.name} {split.split} has camera ids up to {top - 1} but "
                                     f"the training set has {self.train_store.num_cams} cameras; TMGF's camera "
                                     "embedding is indexed by camera (test on the training dataset's own cameras)")
        self.train_tf = transforms(cfg, train=True)
        self.test_tf = transforms(cfg, train=False)
        self.loss_cfg = self.t  # a TMGFConfig is an O2CAPLossConfig
        self.device = dist.info().device
        self.loader: TrainLoader | None = None
        self.memory: ProxyMemory | None = None
        self.proxies: CameraProxies | None = None
        self.tables: ProxyTables | None = None
        self.labels: np.ndarray | None = None
        """[N] cluster label of every training image at the current epoch (-1 = outlier)."""
        self.proxy_of: torch.Tensor | None = None
        self.epoch_of_labels = -1
        """The epoch the current pseudo labels were made for (checked on a mid-epoch resume)."""
        self.history: list[dict[str, Any]] = []
        """Clustering statistics per re-clustering (epoch, clusters, outliers, proxies, ari, nmi, seconds)."""
        self.clusterings = 0
        """Re-clusterings run in this process (a mid-epoch resume must run none before the next epoch)."""

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        # The camera embedding is sized by the data (every offset camera id of the sources). A copy: the
        # run's config, already written to config.yaml, stays as composed (model.num_cams=0: from the data).
        num_cams = max(self.cfg.model.num_cams, self.train_store.num_cams)
        model = build_model(dataclasses.replace(self.cfg.model, num_cams=num_cams), num_classes=0)
        for attr in ("num_slots", "feat_dim"):
            if not hasattr(model, attr):
                raise TypeError(f"model.name={self.cfg.model.name!r}: TMGF needs a model with `{attr}` returning "
                                "[B, slots, dim] features from model(img, camid) (e.g. model.name=tmgf)")
        # plain attributes of a duck-typed model: nn.Module's typing only knows submodules and tensors
        num_slots, feat_dim = cast(int, model.num_slots), cast(int, model.feat_dim)
        self.memory = ProxyMemory(int(num_slots), 0, int(feat_dim), momentum=self.t.momentum,
                                  device=self.device, layout=self.t.memory_layout)
        return model

    def steps_per_epoch(self) -> int:
        return self.t.iters_per_epoch

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict[str, torch.Tensor]]:
        if self.loader is None:
            raise RuntimeError("TMGF: no pseudo labels yet (on_epoch_start must run before train_batches)")
        self.loader.seek(epoch, start_step)
        return self.loader

    def on_fit_start(self, model: nn.Module, resumed: bool) -> None:
        # Calibrate fresh necks before anything is measured, so that the untrained model's evaluation
        # and the first clustering see the same eval-mode model (a no-op once the necks have trained).
        if self.t.calibrate_necks and fresh_necks(model) is not None:
            self.extract_train(model)

    # -- pseudo labels -------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int, step_in_epoch: int) -> None:
        if step_in_epoch > 0:
            # mid-epoch resume: the labels, proxies and memory of this epoch came with the checkpoint
            if self.epoch_of_labels != epoch or self.proxies is None:
                raise RuntimeError(f"TMGF: resuming epoch {epoch} at step {step_in_epoch}, but the checkpoint's pseudo "
                                   f"labels are from epoch {self.epoch_of_labels}")
            return
        self.recluster(model, epoch)

    @torch.no_grad()
    def extract_train(self, model: nn.Module) -> torch.Tensor:
        """[N, S, D] eval-mode features of every training image (every rank, index order)."""
        if self.t.sync_bn_stats:
            average_bn_stats(model)
        necks = fresh_necks(model) if self.t.calibrate_necks else None
        wrap = SlotView(model, "raw" if necks is not None else "all")
        flat = extract(wrap, self.train_store, self.test_tf, self.cfg.eval.batch_size,
                       self.cfg.data.num_workers, inputs=_CAM_INPUTS)
        feats = flat.view(flat.shape[0], int(cast(int, model.num_slots)), -1)  # a plain int attribute
        if necks is not None:  # every rank holds the same exact-once features: same statistics
            feats = calibrate_necks(necks, feats)
            if dist.is_main():
                log.info("TMGF: BN necks calibrated on %d training images (fresh necks)", feats.shape[0])
        return feats

    def cluster(self, feats: torch.Tensor, ground_truth: bool | None = None) -> np.ndarray:
        """Cluster labels (identical on every rank) of the [N, S, D] features, or the truth (w/ GT)."""
        if self.t.use_ground_truth if ground_truth is None else ground_truth:
            return np.asarray(self.train_store.pid, dtype=np.int64).copy()
        x = cluster_features(feats, self.t.cluster_feature)
        kw: dict[str, Any] = dict(k1=self.t.k1, k2=self.t.k2, eps=self.t.eps, min_samples=self.t.min_samples,
                                  knn_backend=self.t.knn_backend, knn_index=self.t.knn_index,
                                  nprobe=self.t.knn_nprobe, recall_floor=self.t.knn_recall_floor)
        if dist.get_world_size() > 1 and self.t.cluster_distributed:
            return jaccard_dbscan(x, distributed=True, **kw)
        # one rank clusters, the others receive its labels (identical everywhere by construction)
        labels = jaccard_dbscan(x, **kw) if dist.is_main() else np.zeros(x.shape[0], np.int64)
        if dist.get_world_size() > 1:
            t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(dist.comm_device())
            labels = dist.broadcast(t, src=0).cpu().numpy()
        return labels

    def recluster(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Extract, cluster, split into camera proxies and rebuild the memory and the sampler."""
        t0 = time.time()
        feats = self.extract_train(model)
        t1 = time.time()
        labels = self.cluster(feats)
        proxies = make_camera_proxies(labels, self.train_store.camid, num_cams=self.train_store.num_cams)
        need = self.cfg.batch_plan(dist.get_world_size()).ids  # proxies per step over all ranks
        if proxies.num_proxies < need:
            raise RuntimeError(f"TMGF epoch {epoch}: clustering left {proxies.num_proxies} proxies "
                               f"({int((labels < 0).sum())} of {labels.size} images are outliers), fewer than "
                               f"the {need} a step draws (tmgf.proxies_per_batch={self.t.proxies_per_batch}, "
                               f"data.batch_scope={self.cfg.data.batch_scope}): tune tmgf.eps (lower splits merged "
                               "clusters, higher admits outliers) and tmgf.min_samples")
        assert self.memory is not None, "build_model() creates the memory"
        # only the centres of the proxies this rank holds (all of them when replicated)
        start, stop = self.memory.range_for(proxies.num_proxies)
        held = (proxies.proxy_labels >= start) & (proxies.proxy_labels < stop)
        centers = proxy_centers(feats.transpose(0, 1), np.where(held, proxies.proxy_labels - start, -1), stop - start)
        self.memory.init_from_centers(centers, proxies.num_proxies)
        self._install(labels, proxies, epoch)
        self.clusterings += 1
        stats = {"epoch": epoch, **clustering_stats(labels, proxies, self.train_store.pid),
                 "extract_s": round(t1 - t0, 3), "cluster_s": round(time.time() - t1, 3)}
        self.history.append(stats)
        self.log_event("cluster", **stats)  # metrics.jsonl + console on rank 0
        return stats

    def _install(self, labels: np.ndarray, proxies: CameraProxies, epoch: int) -> None:
        """Make ``proxies`` the current pseudo labels: lookup tables, sampler labels."""
        self.labels = np.asarray(labels, dtype=np.int64)
        self.proxies = proxies
        self.tables = ProxyTables.from_proxies(proxies, self.device)
        self.proxy_of = torch.as_tensor(proxies.proxy_labels, dtype=torch.long, device=self.device)
        self.epoch_of_labels = int(epoch)
        if self.loader is None:
            plan = self.cfg.batch_plan(dist.get_world_size())
            self.loader = build_train_loader(
                self.train_store, self.train_tf, plan.ids, plan.images_per_id,
                seed=self.cfg.train.seed, num_workers=self.cfg.data.num_workers,
                steps_per_epoch=self.t.iters_per_epoch, pids=proxies.proxy_labels, policy="class_uniform")
        else:
            self.loader.set_pids(proxies.proxy_labels)

    # -- step ----------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        assert self.memory is not None and self.tables is not None and self.proxy_of is not None
        feats = model(batch["img"], batch["camid"])  # [B, S, D]
        proxy_ids = self.proxy_of[batch["index"]]
        if self.memory.sharded:
            # the global batch, gathered once: the model-parallel loss (each rank's gradient returns
            # to it through the gather) and then the memory update read it
            feats, proxy_ids = dist.all_gather_autograd(feats), dist.all_gather(proxy_ids)
            out = tmgf_loss_sharded(feats, proxy_ids, self.memory.memory, self.memory.start, self.tables,
                                    self.loss_cfg)
        else:
            out = tmgf_loss(feats, self.memory.memory, proxy_ids, self.tables, self.loss_cfg)
        logs = {k: float(out[k]) for k in ("global_off", "global_on", "part_off", "part_on")}
        return StepResult(out["loss"], logs, extras={"features": feats.detach(), "proxy_ids": proxy_ids,
                                                     "gathered": self.memory.sharded})

    def after_optimizer_step(self, model: nn.Module, batch: dict[str, torch.Tensor], result: StepResult) -> None:
        assert self.memory is not None
        if result.extras.get("gathered"):
            self.memory.update_gathered(result.extras["features"], result.extras["proxy_ids"])
        else:
            self.memory.update(result.extras["features"], result.extras["proxy_ids"])

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        if self.t.sync_bn_stats:
            average_bn_stats(model)
        out = evaluate_targets(SlotView(model, "global"), self.targets, self.test_tf, e.batch_size,
                               self.cfg.data.num_workers, rerank=e.rerank, max_rank=e.max_rank, inputs=_CAM_INPUTS)
        if self.t.eval_clustering:
            feats = self.extract_train(model)
            labels = self.cluster(feats, ground_truth=False)  # the features' clustering, also for w/ GT
            proxies = make_camera_proxies(labels, self.train_store.camid, num_cams=self.train_store.num_cams)
            out["train_clustering"] = clustering_stats(labels, proxies, self.train_store.pid)
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective (the sharded memory is consolidated); rank 0's is the one saved."""
        if self.proxies is None or self.memory is None or self.loader is None or self.labels is None:
            return {"epoch_of_labels": -1, "history": list(self.history)}
        return {
            "epoch_of_labels": self.epoch_of_labels,
            "labels": torch.from_numpy(self.labels.copy()),
            "proxies": {k: torch.from_numpy(v) for k, v in self.proxies.state_dict().items()},
            "memory": self.memory.full_state_dict(),  # the whole memory: any world size, either layout
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        if int(state.get("epoch_of_labels", -1)) < 0:
            return
        n = len(self.train_store)
        labels = np.asarray(state["labels"].numpy(), dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"TMGF checkpoint: pseudo labels for {labels.shape[0]} images, the training set has {n}")
        proxies = CameraProxies.from_state_dict({k: v.numpy() for k, v in state["proxies"].items()})
        assert self.memory is not None, "build_model() runs before load_state_dict()"
        self.memory.load_full_state_dict(state["memory"])
        if self.memory.num_proxies != proxies.num_proxies:
            raise ValueError(f"TMGF checkpoint: memory has {self.memory.num_proxies} proxies, tables "
                             f"{proxies.num_proxies}")
        self._install(labels, proxies, int(state["epoch_of_labels"]))  # the position: train_batches(epoch, step)


__all__ = ["TMGFMethod", "SlotView", "average_bn_stats", "cluster_features", "clustering_stats"]
