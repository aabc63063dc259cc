"""The training loop: method-agnostic, resumable at any step boundary.

Position in training is (epoch, step_in_epoch): the engine runs the epochs, the step inside one is
the sampler's cursor, read from the batches the method hands over (:class:`Positioned`) after every
step and recorded in checkpoints; nothing else counts steps. With the sampler a pure function of
(seed, epoch, step), the saved RNG states, and method state (banks, labels) in the checkpoint, a run
interrupted anywhere and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from shards.atomic import atomic_write_bytes
from shards.errors import UserError
from trainer import dist
from trainer.config import EvalConfig, TrainConfig
from trainer.engine.checkpoint import check_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from trainer.engine.flops import StepMeter
from trainer.engine.method import Method
from trainer.engine.metrics import ConsoleSink, JsonlSink, Metrics, MetricsSink
from trainer.engine.optim import EpochLR, param_groups
from trainer.engine.stop import StopFlag
from trainer.engine.strategy import build_strategy, json_bytes, resolve_precision
from trainer.models.stochastic import sample_seeds

if TYPE_CHECKING:
    from trainer.engine.prometheus import PrometheusSink

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_KEYS = ("model", "optimizer", "strategy", "method", "epoch", "step_in_epoch", "global_step")
"""What the engine reads back from a checkpoint's ``state.pt`` (a checkpoint without one is refused)."""


def agree_on_error(error: UserError | None) -> None:
    """Collective: if any rank has a user error, raise the lowest such rank's message on every rank.

    A mistake seen by one rank only (a metrics port busy on one node) must stop all of them
    with the same line: a rank left running would wait in its next collective forever.
    """
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    import torch.distributed as tdist

    messages: list[str | None] = [None] * dist.get_world_size()
    tdist.all_gather_object(messages, None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is None:
        return
    if error is not None and str(error) == first:
        raise error
    raise UserError(first)


def agreed(check: Callable[[], T]) -> T | None:
    """Run ``check`` on every rank; a :class:`UserError` on any rank is raised on all (see :func:`agree_on_error`)."""
    try:
        result = check()
    except UserError as exc:
        agree_on_error(exc)
        raise  # unreachable: agree_on_error raised
    agree_on_error(None)
    return result


@dataclass
class FitResult:
    status: str
    """``finished``, ``stopped`` (preemption/time limit: checkpoint written) or ``max_steps``."""
    global_step: int
    epoch: int
    best: dict[str, Any] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Positioned(Protocol):
    """Batches that keep their own position (a ``TrainLoader``: the sampler's cursor)."""

    @property
    def cursor(self) -> int:
        """Batches of the current epoch handed over so far."""
        ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class _Counted:
    """The position of batches that keep none (a plain iterable): counted as they are handed over."""

    def __init__(self, batches: Iterable[dict[str, Any]], start: int) -> None:
        self._batches = batches
        self.cursor = start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._batches:
            self.cursor += 1
            yield batch


def _positioned(batches: Iterable[dict[str, Any]], epoch: int, start: int) -> Positioned:
    """``batches`` with a cursor standing at ``start``: their own, or a count from ``start``."""
    if not isinstance(batches, Positioned):
        return _Counted(batches, start)
    if batches.cursor != start:
        raise RuntimeError(f"epoch {epoch}: the method's batches stand at step {batches.cursor}, "
                           f"expected {start} (train_batches(epoch, start_step) must seek there)")
    return batches


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Engine:
    """Runs a :class:`Method` under a strategy, with checkpoints, evaluation and metrics."""

    def __init__(self, method: Method, cfg: TrainConfig, eval_cfg: EvalConfig, run_dir: str | os.PathLike[str],
                 sinks: list[MetricsSink] | None = None, stop_flag: StopFlag | None = None,
                 global_batch: int | None = None) -> None:
        self.method = method
        self.cfg = cfg
        self.eval_cfg = eval_cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.stop_flag = stop_flag or StopFlag()
        info = dist.info()
        self.device = info.device
        precision = resolve_precision(cfg.precision, self.device.type)
        # images per step over all ranks (sizes DeepSpeed's micro-batch); trainer.train passes the config's
        self.strategy = build_strategy(cfg, self.device, precision, global_batch or dist.get_world_size())
        if dist.is_main() and self.strategy.name == "deepspeed":  # the resolved DeepSpeed config, for the record
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "deepspeed.json", json_bytes(self.strategy.describe()["deepspeed"]))
        self.exporter = None
        if cfg.metrics_port >= 0 or cfg.metrics_push_url:  # every rank serves (and pushes) its own metrics
            self.exporter = self._start_exporter()  # before metrics.jsonl: a refused run leaves no file
        if sinks is None:
            sinks = [JsonlSink(self.run_dir / "metrics.jsonl"), ConsoleSink(cfg.log_every)]
            if cfg.tensorboard and dist.is_main():  # built on rank 0 only: a writer leaves a file at once
                sinks.append(self._tensorboard())
        self.metrics = Metrics(sinks, enabled=dist.is_main(), every_rank=[self.exporter] if self.exporter else [])
        if cfg.metrics_port >= 0:  # collective: rank 0 records every rank's URL
            assert self.exporter is not None
            urls = dist.all_gather_object(self.exporter.url)
            self.metrics.log("metrics_server", url=urls[0], urls=urls)
        method.bind_metrics(self.metrics.log)

    def _log_changes(self, state: dict[str, Any]) -> None:
        """Say so when a resume changes the world size or the strategy: the run goes on, exactly from the
        saved weights, optimizer state, memories and sampler position, but the ranks' random streams
        (drop-path, augmentation order within a rank) are re-laid, so results differ from an
        uninterrupted run's."""
        saved_world, world = state.get("world_size"), dist.get_world_size()
        if saved_world is not None and saved_world != world:
            self.metrics.log("world_size_changed", saved_world_size=saved_world, world_size=world,
                             note="resumed at another world size: same global batch and position; the random "
                                  "streams are re-laid, so results differ from an uninterrupted run")
        saved_strategy = state["strategy"].get("name", "ddp")  # checkpoints before strategies were named: DDP
        if saved_strategy != self.strategy.name:
            self.metrics.log("strategy_changed", saved=saved_strategy, now=self.strategy.name)

    def _start_exporter(self) -> PrometheusSink:
        """This rank's exporter on the base port + its local rank. Every rank agrees: a port busy on any
        rank stops all of them with the same line (and the others close theirs)."""
        from importlib.metadata import PackageNotFoundError, version

        from trainer.engine.prometheus import PrometheusSink

        try:
            package = version("reid-trainer")
        except PackageNotFoundError:
            package = "unknown"
        name = type(self.method).__name__.removesuffix("Method").lower()  # the engine knows no method by name
        info, exporter, error = dist.info(), None, None
        try:
            exporter = PrometheusSink(self.cfg.metrics_port, self.cfg.metrics_addr, run=self.run_dir.name,
                                      rank=info.rank, local_rank=info.local_rank, push_url=self.cfg.metrics_push_url,
                                      build={"version": package, "strategy": self.strategy.name, "method": name})
        except UserError as exc:
            error = exc
        try:
            agree_on_error(error)
        except UserError:
            if exporter is not None:
                exporter.close()
            raise
        assert exporter is not None
        return exporter

    def _tensorboard(self) -> MetricsSink:
        from dataclasses import asdict

        from trainer.engine.tensorboard import TensorBoardSink

        saved = self.run_dir / "config.yaml"  # the whole resolved config, written by trainer.train
        text = saved.read_text() if saved.is_file() else json.dumps(
            {"train": asdict(self.cfg), "eval": asdict(self.eval_cfg)}, indent=1, sort_keys=True)
        return TensorBoardSink(self.run_dir / "tb", text)

    # -- state ---------------------------------------------------------------------------------
    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step_in_epoch: int,
               global_step: int, best: dict[str, Any], initial: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": self.strategy.model_state_dict(model),
            "optimizer": self.strategy.optimizer_state_dict(),
            "strategy": self.strategy.state_dict(),
            "method": self.method.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "world_size": dist.get_world_size(),
            "best": best,
            "initial": initial,
        }

    def _save(self, *args: Any) -> None:
        state = self._state(*args)
        path = save_checkpoint(self.ckpt_dir, state["global_step"], state, keep=self.cfg.keep_checkpoints)
        self.metrics.log("checkpoint", step=state["global_step"], epoch=state["epoch"],
                         step_in_epoch=state["step_in_epoch"], path=str(path))

    def _evaluate(self, model: nn.Module, epoch: int, global_step: int) -> dict[str, Any]:
        inner = self.strategy.unwrap(model)
        was_training = inner.training
        inner.eval()
        t0 = time.time()
        results = self.method.evaluate(inner)
        inner.train(was_training)
        self.metrics.log("eval", epoch=epoch, step=global_step, seconds=round(time.time() - t0, 3), results=results)
        return results

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical model init on every rank (DDP also broadcasts it)
        model = self.method.build_model()
        groups = self.method.param_groups(model) or param_groups(model, cfg.optim)
        wrapped, optimizer = self.strategy.setup(model, groups, cfg.optim)
        schedule = EpochLR(optimizer, cfg.optim)
        steps_per_epoch = self.method.steps_per_epoch()

        epoch, step_in_epoch, global_step = 0, 0, 0
        best: dict[str, Any] = {}
        initial: dict[str, Any] = {}
        ckpt = resolve_resume(cfg.resume, self.ckpt_dir)
        if ckpt is not None:
            check_checkpoint(ckpt, STATE_KEYS)
            state = load_checkpoint(ckpt, required_keys=STATE_KEYS)
            self.strategy.load_model_state_dict(wrapped, state["model"])
            self.strategy.load_optimizer_state_dict(state["optimizer"])
            self.strategy.load_state_dict(state["strategy"])
            self.method.load_state_dict(state["method"])
            epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            best, initial = state.get("best", {}), state.get("initial", {})
            self.metrics.log("resume", path=str(ckpt), epoch=epoch, step_in_epoch=step_in_epoch, step=global_step,
                             world_size=dist.get_world_size(), saved_world_size=state.get("world_size"))
            self._log_changes(state)
        self.method.on_fit_start(model, resumed=ckpt is not None)
        if ckpt is None and self.eval_cfg.at_start:
            initial = self._evaluate(wrapped, -1, 0)

        last: dict[str, Any] = {}
        result_status = "finished"
        total_steps = cfg.epochs * steps_per_epoch
        t_fit, steps_at_fit = time.time(), global_step  # ETA from this process's own pace (evals included)
        meter = StepMeter(self.device, self.strategy.precision, dist.get_world_size(), cfg.peak_tflops,
                          log=self.metrics.log)
        while epoch < cfg.epochs:
            schedule.set_epoch(epoch)
            self.method.on_epoch_start(model, epoch, step_in_epoch)
            wrapped.train()
            t_last = time.time()
            t_asked = t_last  # when the loop asked for its next batch: the data wait starts there
            batches = _positioned(self.method.train_batches(epoch, step_in_epoch), epoch, step_in_epoch)
            for batch in batches:
                data_wait = time.time() - t_asked
                batch = _to_device(batch, self.device)
                # per-sample seeds scope the forward's stochastic depth (world-size invariant masks)
                with self.strategy.autocast(), sample_seeds(batch.get("seed")), meter.count(batch):
                    result = self.method.training_step(wrapped, batch)
                self.strategy.backward_and_step(result.loss)
                t_memory = time.time()
                self.method.after_optimizer_step(model, batch, result)
                memory_s = time.time() - t_memory
                step_in_epoch = batches.cursor
                global_step += 1
                now = time.time()
                n_local = int(batch["img"].shape[0]) if "img" in batch else 0
                n_img = n_local * dist.get_world_size()
                img_per_s = n_img / max(now - t_last, 1e-9)
                perf = meter.fields(img_per_s, now - t_last, data_wait, memory_s, n_local)
                self.metrics.log("train", step=global_step, epoch=epoch, loss=float(result.loss.detach()),
                                 lr=optimizer.param_groups[0]["lr"], sec=round(now - t_last, 4),
                                 img_per_s=round(img_per_s, 2),
                                 progress=round(global_step / total_steps, 4),
                                 eta_s=round((total_steps - global_step) * (now - t_fit)
                                             / (global_step - steps_at_fit)),
                                 **{**perf, **result.logs})  # a method's own memory_s (timed inside) wins
                t_last = now
                done_epoch = step_in_epoch >= steps_per_epoch
                hit_max = cfg.max_steps > 0 and global_step >= cfg.max_steps
                stop = self.stop_flag.agreed()
                if done_epoch:
                    break
                if stop or hit_max or (cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0):
                    self._save(wrapped, optimizer, epoch, step_in_epoch, global_step, best, initial)
                if stop or hit_max:
                    return FitResult("stopped" if stop else "max_steps", global_step, epoch, best, last, initial)
                t_asked = time.time()
            if step_in_epoch < steps_per_epoch:
                raise RuntimeError(f"epoch {epoch}: the method yielded {step_in_epoch} batches, expected "
                                   f"{steps_per_epoch} (steps_per_epoch)")
            # epoch end: evaluate, then checkpoint at the next epoch's start position
            finished_epoch = epoch
            epoch, step_in_epoch = epoch + 1, 0
            if epoch % self.eval_cfg.period == 0 or epoch == cfg.epochs:
                last = self._evaluate(wrapped, finished_epoch, global_step)
                best = _update_best(best, last, finished_epoch)
            save_now = epoch % cfg.ckpt_every_epochs == 0 or epoch == cfg.epochs or \
                (cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0)
            stop = self.stop_flag.agreed()
            hit_max = cfg.max_steps > 0 and global_step >= cfg.max_steps
            if save_now or stop or hit_max:
                self._save(wrapped, optimizer, epoch, step_in_epoch, global_step, best, initial)
            if (stop or hit_max) and epoch < cfg.epochs:
                return FitResult("stopped" if stop else "max_steps", global_step, epoch, best, last, initial)

        if dist.is_main():
            _atomic_save_safetensors(self.method.export_weights(model), self.run_dir / "model_final.safetensors")
        dist.barrier()
        self.metrics.log("end", status=result_status, step=global_step, best=best, last=last, initial=initial)
        self.metrics.close()
        return FitResult(result_status, global_step, epoch, best, last, initial)


def _update_best(best: dict[str, Any], results: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Best epoch per target by mAP, kept beside the last epoch because the official repo reports it.
    Choosing the epoch on the target domain is an oracle in domain generalization: reports label it
    so (``demo/pat.py``); the last epoch is the result."""
    out = dict(best)
    for target, m in results.items():
        if not isinstance(m, dict) or "mAP" not in m:
            continue
        if target not in out or m["mAP"] > out[target]["mAP"]:
            out[target] = {**m, "epoch": epoch}
    return out
