"""PAT (Part-Aware Transformer, ICCV 2023) as an engine method.

Per step (the official step order): forward → one gather of the global batch (indices and labels in
one collective, part tokens in one autograd gather) → the memory hook writes the detached part tokens
into the bank (:meth:`PATMethod.write_memory`) → CSL against the sharded bank → PSD soft labels from
the neighbours' identities → LS-CE(+PSD) + soft-margin triplet + CSL, every loss reading the same
gathered batch. ``pat.update_before_loss=false`` moves the write after the optimizer step
(:meth:`PATMethod.after_optimizer_step`). The bank's labels are the dataset's, set once for every
row. The bank is filled by one no-grad pass before training and travels in every checkpoint
(consolidated, so a resume may change the world size). Without the bank (Table 4/5 baselines) the
step is LS-CE + triplet; ``pat.sd_weight > 0`` adds conventional self-distillation to either
(Table 5's "B+SD").

The datasets are ensured once per run before the method is built (``trainer.train.run``, the
launcher); the method only opens them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from trainer import dist
from trainer.config import Config
from trainer.data.loader import build_inference_loader, build_train_loader
from trainer.engine.method import Method, StepResult
from trainer.losses.id import label_smooth_ce
from trainer.losses.psd import pat_total, self_distillation_loss
from trainer.losses.triplet import triplet_loss
from trainer.memory.bank import PartMemoryBank
from trainer.memory.batch import GlobalBatch, gather_batch
from trainer.methods.common import evaluate_targets, open_store, open_targets, transforms
from trainer.models import PartAwareTransformer, ViTBaseline, build_model
from trainer.models.stochastic import sample_seeds


class PATMethod(Method):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        sources, _ = cfg.data.resolved()
        self.train_store = open_store(cfg, sources, "train", relabel=True)
        self.targets = open_targets(cfg)
        self.train_tf = transforms(cfg, train=True)
        self.test_tf = transforms(cfg, train=False)
        d, plan = cfg.data, cfg.batch_plan(dist.get_world_size())  # P over all ranks: data.batch_scope
        self.loader = build_train_loader(self.train_store, self.train_tf, plan.ids, plan.images_per_id,
                                         seed=cfg.train.seed, num_workers=d.num_workers)
        self.bank: PartMemoryBank | None = None

    @property
    def uses_bank(self) -> bool:
        return self.cfg.pat.csl and self.cfg.model.name == "pat"

    def build_model(self) -> nn.Module:
        # the registry returns a plain Module; this method builds "pat" or "vit" (validated config)
        model = cast(PartAwareTransformer | ViTBaseline,
                     build_model(self.cfg.model, num_classes=self.train_store.num_classes))
        model.emit_block_logits = self.cfg.pat.sd_weight > 0
        if self.uses_bank:
            self.bank = PartMemoryBank(len(self.train_store), model.num_parts, model.feat_dim,
                                       momentum=self.cfg.pat.memory_momentum)
            self.bank.set_labels(torch.as_tensor(self.train_store.pid))  # once: no write changes them
        return model

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict[str, torch.Tensor]]:
        self.loader.seek(epoch, start_step)
        return self.loader

    @torch.no_grad()
    def on_fit_start(self, model: nn.Module, resumed: bool) -> None:
        if not self.uses_bank or resumed:
            return
        pat = cast(PartAwareTransformer, model)  # uses_bank: the "pat" model
        bank = self.bank
        assert bank is not None  # uses_bank: built with the model
        # Fill the bank with one pass over the whole training set (train transform, train mode, no
        # grad), as the official init does, stochastic depth seeded per sample. One region draw serves
        # the whole pass (the official code draws per batch): the bank then does not depend on how the
        # pass is split over ranks. The region generator is restored afterwards so training draws the
        # same regions as without it.
        regions = pat.regions.get_extra_state()
        pat.train()
        device = dist.info().device
        mask = pat.attention_mask(device)
        loader = build_inference_loader(self.train_store, self.train_tf, self.cfg.eval.batch_size,
                                        self.cfg.data.num_workers, seed=self.cfg.train.seed)
        for batch in loader:
            with sample_seeds(batch["seed"].to(device)):  # stochastic depth per sample, as in a step
                tokens = pat.forward_tokens(batch["img"].to(device), mask)
            parts = tokens[:, 1 : 1 + pat.num_parts].float()
            bank.update(batch["index"].to(device), parts)
        # bank writes are collective: ranks with fewer batches join the remaining ones empty-handed
        n_local = len(loader)
        n_max = int(dist.all_reduce(torch.tensor([n_local], device=dist.comm_device()), op="max").item())
        empty_f = torch.zeros(0, pat.num_parts, pat.feat_dim, device=device)
        empty_i = torch.zeros(0, dtype=torch.long, device=device)
        for _ in range(n_max - n_local):
            bank.update(empty_i, empty_f)
        pat.regions.set_extra_state(regions)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepResult:
        out = model(batch["img"])
        pid = batch["pid"]
        if self.bank is None:
            total, logs = self._baseline_loss(out, pid)
            extras: dict[str, Any] = {}
        else:
            total, logs, extras = self._bank_loss(out, pid, batch["index"])
        logs["acc"] = float((out.logits.argmax(1) == pid).float().mean())
        return StepResult(total, logs, extras)

    def _bank_loss(self, out: Any, pid: torch.Tensor,
                   index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
        """PAT's total with the bank: the global batch gathered once for the write and every loss."""
        assert self.bank is not None
        p = self.cfg.pat
        parts = out.parts.float()
        t0 = time.perf_counter()  # the bank's share of the step: one gather and the write (reid_memory_sync_seconds)
        step = gather_batch(index, pid, parts, device=self.bank.device)
        if p.update_before_loss:  # the official order: the loss sees this step's own features in the bank
            self.write_memory(step)
        memory_s = time.perf_counter() - t0
        res = pat_total(out.logits, out.cls, parts, pid, index, self.bank, p, out.blocks, gathered=step)
        logs = {"id": float(res.id.detach()), "tri": float(res.triplet.detach()), "csl": float(res.csl.detach()),
                "memory_s": memory_s}
        if res.sd is not None:
            logs["sd"] = float(res.sd.detach())
        extras = {} if p.update_before_loss else {"memory": step.detached()}
        return res.total, logs, extras

    def _baseline_loss(self, out: Any, pid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """LS-CE + triplet (+ SD): the Table 4/5 baselines without the bank."""
        p = self.cfg.pat
        l_id = label_smooth_ce(out.logits.float(), pid, p.id_epsilon)
        l_tri = triplet_loss(out.cls.float(), pid, p.triplet_margin, squared=p.triplet_squared)
        total = p.id_weight * l_id + p.triplet_weight * l_tri
        logs = {"id": float(l_id.detach()), "tri": float(l_tri.detach())}
        if p.sd_weight > 0:
            l_sd = self_distillation_loss(out.logits.float(), out.blocks.float(), p.sd_temperature)
            total = total + p.sd_weight * l_sd
            logs["sd"] = float(l_sd.detach())
        return total, logs

    def write_memory(self, step: GlobalBatch) -> None:
        """The memory hook: the step's detached part tokens into the bank rows of its images.

        No collective: ``step`` is gathered already, and every rank applies the same writes to
        the rows it owns. The rows' labels are not written (set once from the dataset)."""
        assert self.bank is not None and step.parts is not None
        self.bank.write_gathered(step.indices, step.parts.detach())

    def after_optimizer_step(self, model: nn.Module, batch: dict[str, torch.Tensor], result: StepResult) -> None:
        step = result.extras.get("memory")
        if step is not None:  # pat.update_before_loss=false: the write the loss did not see
            self.write_memory(step)

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        e = self.cfg.eval
        return evaluate_targets(model, self.targets, self.test_tf, e.batch_size, self.cfg.data.num_workers,
                                rerank=e.rerank, max_rank=e.max_rank)

    def state_dict(self) -> dict[str, Any]:
        # the sampler's position is the engine's to record (epoch, step_in_epoch): not kept twice
        if self.bank is None:
            return {}
        return {"bank": self.bank.full_state_dict(to_all=False)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.bank is not None:
            self.bank.load_full_state_dict(state["bank"])
