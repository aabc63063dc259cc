"""PAT (Part-Aware Transformer, ICCV 2023) as an engine method.

Per step (the official step order): forward → bank update with the all-gathered detached part
tokens → CSL against the sharded bank → PSD soft labels from the neighbours' identities →
LS-CE(+PSD) + soft-margin triplet + CSL. The bank is filled by one no-grad pass before training
and travels in every checkpoint (consolidated, so a resume may change the world size). Without the
bank (Table 4/5 baselines) the step is LS-CE + triplet; ``pat.sd_weight > 0`` adds conventional
self-distillation to either (Table 5's "B+SD").
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from trainer import dist
from trainer.config import Config
from trainer.data.loader import build_inference_loader, build_train_loader
from trainer.data.prepare import ensure_datasets
from trainer.engine.method import Method, StepResult
from trainer.losses.id import label_smooth_ce
from trainer.losses.psd import pat_total, self_distillation_loss
from trainer.losses.triplet import triplet_loss
from trainer.memory.bank import PartMemoryBank
from trainer.methods.common import evaluate_targets, open_store, open_targets, transforms
from trainer.models import build_model


class PATMethod(Method):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        ensure_datasets(cfg.data)
        sources, _ = cfg.data.resolved()
        self.train_store = open_store(cfg, sources, "train", relabel=True)
        self.targets = open_targets(cfg)
        self.train_tf = transforms(cfg, train=True)
        self.test_tf = transforms(cfg, train=False)
        d = cfg.data
        self.loader = build_train_loader(self.train_store, self.train_tf, d.ids_per_batch, d.images_per_id,
                                         seed=cfg.train.seed, num_workers=d.num_workers)
        self.bank: PartMemoryBank | None = None

    @property
    def uses_bank(self) -> bool:
        return self.cfg.pat.csl and self.cfg.model.name == "pat"

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.model, num_classes=self.train_store.num_classes)
        model.emit_block_logits = self.cfg.pat.sd_weight > 0
        if self.uses_bank:
            self.bank = PartMemoryBank(len(self.train_store), model.num_parts, model.feat_dim,
                                       momentum=self.cfg.pat.memory_momentum)
            self.bank.set_labels(torch.as_tensor(self.train_store.pid))
        return model

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict[str, torch.Tensor]]:
        self.loader.set_epoch(epoch)
        self.loader.load_state_dict({**self.loader.state_dict(), "epoch": epoch, "cursor": start_step})
        return self.loader

    @torch.no_grad()
    def on_fit_start(self, model: nn.Module, resumed: bool) -> None:
        if not self.uses_bank or resumed:
            return
        # Fill the bank with one pass over the whole training set (train transform, train mode, no
        # grad), as the official init does. One region draw serves the whole pass (the official code
        # draws per batch): the bank then does not depend on how the pass is split over ranks. The
        # region generator is restored afterwards so training draws the same regions as without it.
        regions = model.regions.get_extra_state()
        model.train()
        device = dist.info().device
        mask = model.attention_mask(device)
        loader = build_inference_loader(self.train_store, self.train_tf, self.cfg.eval.batch_size,
                                        self.cfg.data.num_workers, seed=self.cfg.train.seed)
        for batch in loader:
            tokens = model.forward_tokens(batch["img"].to(device), mask)
            parts = tokens[:, 1 : 1 + model.num_parts].float()
            self.bank.initialize(batch["index"].to(device), parts, batch["pid"].to(device))
        # bank writes are collective: ranks with fewer batches join the remaining ones empty-handed
        n_local = len(loader)
        n_max = int(dist.all_reduce(torch.tensor([n_local], device=dist.comm_device()), op="max").item())
        empty_f = torch.zeros(0, model.num_parts, model.feat_dim, device=device)
        empty_i = torch.zeros(0, dtype=torch.long, device=device)
        for _ in range(n_max - n_local):
            self.bank.initialize(empty_i, empty_f, empty_i)
        model.regions.set_extra_state(regions)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        out = model(batch["img"])
        pid = batch["pid"]
        p = self.cfg.pat
        if self.bank is not None:
            res = pat_total(out.logits, out.cls, out.parts.float(), pid, batch["index"], self.bank, p, out.blocks)
            logs = {"id": float(res.id.detach()), "tri": float(res.triplet.detach()), "csl": float(res.csl.detach())}
            if res.sd is not None:
                logs["sd"] = float(res.sd.detach())
            total = res.total
        else:
            l_id = label_smooth_ce(out.logits.float(), pid, p.id_epsilon)
            l_tri = triplet_loss(out.cls.float(), pid, p.triplet_margin, squared=p.triplet_squared)
            total = p.id_weight * l_id + p.triplet_weight * l_tri
            logs = {"id": float(l_id.detach()), "tri": float(l_tri.detach())}
            if p.sd_weight > 0:
                l_sd = self_distillation_loss(out.logits.float(), out.blocks.float(), p.sd_temperature)
                total = total + p.sd_weight * l_sd
                logs["sd"] = float(l_sd.detach())
        logs["acc"] = float((out.logits.argmax(1) == pid).float().mean())
        return StepResult(total, logs)

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        return evaluate_targets(model, self.targets, self.test_tf, e.batch_size, self.cfg.data.num_workers,
                                rerank=e.rerank, max_rank=e.max_rank)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sampler": self.loader.state_dict()}
        if self.bank is not None:
            state["bank"] = self.bank.full_state_dict(to_all=False)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["sampler"])
        if self.bank is not None:
            self.bank.load_full_state_dict(state["bank"])
