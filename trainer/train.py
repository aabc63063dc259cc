"""``python -m trainer.train exp=NAME key=value …`` — one process, or every rank under torchrun.

Composes and validates the config, sets up the process group, checks what a user may have got
wrong (:func:`preflight`), writes ``run_dir/config.yaml``, and runs the method on the engine.

A user's mistake — a bad key or value, a run dir that cannot be written, a checkpoint of another
format or config, pretrained weights that are missing or do not fit, a metrics port in use — is one
line ``trainer.train: error: …`` and exit 2 before any training work and before anything is
written; every rank of a distributed run stops with the same error (rank 0 prints it). SIGTERM
(scancel, SLURM preemption, torchrun forwarding its own) and SIGUSR2 stop the run at the next step
boundary with one checkpoint; ``train.resume=auto`` continues from it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from shards.atomic import atomic_write_bytes
from shards.errors import USAGE_EXIT, UserError, run_cli
from trainer import dist
from trainer.config import RESUME_MODES, TIMM_PREFIX, BatchPlan, Config, ConfigError, compose, to_yaml
from trainer.engine.loop import STATE_KEYS, Engine, FitResult, agreed
from trainer.engine.stop import StopFlag
from trainer.methods import build_method

RESUMABLE_CHANGES = (
    "name", "run_dir", "train.epochs", "train.resume", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.ckpt_every_epochs", "train.keep_checkpoints", "train.metrics_port", "train.metrics_addr",
    "train.metrics_push_url", "train.tensorboard", "train.peak_tflops", "eval.",
    "data.num_workers", "data.root", "data.cache_dir",
)
"""Keys (or prefixes ending in ``.``) that may change when a run is resumed: when and how it stops,
checkpoints, logs, evaluation and where the data is read from. Anything else changes the training."""


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_resume_config(cfg: Config) -> None:
    """Refuse to resume ``cfg.run_dir`` when its checkpoints were made with another training config.

    Compares the run dir's ``config.yaml`` with ``cfg`` when ``train.resume=auto`` would resume a
    checkpoint there; keys of :data:`RESUMABLE_CHANGES` may differ. Raises :class:`ConfigError`
    naming every other differing key (old -> new) and what to do instead.
    """
    from omegaconf import OmegaConf

    from trainer.engine.checkpoint import list_checkpoints

    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if cfg.train.resume != "auto" or not saved.is_file() or not list_checkpoints(run_dir / "checkpoints"):
        return
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    except Exception as exc:  # a damaged file must not be silently trusted either
        raise ConfigError(
            f"{saved}: cannot read the run's config ({exc}); pass train.resume=never or another run_dir") from None
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False))
    free = lambda k: any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)  # noqa: E731
    diff = [f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
            for k in sorted(set(old) | set(new)) if not free(k) and old.get(k, "<absent>") != new.get(k, "<absent>")]
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"run_dir={cfg.run_dir} holds checkpoints of another config: {shown}; resume with the same "
                          "config, or use another run_dir (or train.resume=never to start over there)")


def check_run_dir(cfg: Config) -> None:
    """Refuse a ``run_dir`` this process cannot write, before any work (one line: path and fix).

    Probes the nearest existing folder of the path with a file that is removed at once, so a
    refused run leaves nothing behind and an accepted one has only what it would create anyway.
    """
    run_dir = Path(cfg.run_dir).absolute()
    probe_in = run_dir
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir}: {probe_in} is not a folder; pass another run_dir")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_in, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"run_dir={cfg.run_dir}: cannot write in {probe_in} ({exc.strerror}); pass a writable "
                          "run_dir=PATH") from None


def check_files(cfg: Config) -> None:
    """Refuse a config naming a file this machine does not have (one line: key, path, what to do).

    Separate from :func:`validate` because a config is valid before its files exist: the paper
    experiments name weights fetched separately (under ``pretrained/``) and a chained run names the
    model an earlier run writes (``exp=tmgf_demo``). An entry point calls it once, right before work
    starts; it reads only (no network: a ``timm:`` name is accepted when timm's cache holds it, or when
    the machine is online and loading will download it)."""
    pretrained = cfg.model.pretrained
    if pretrained and pretrained.startswith(TIMM_PREFIX):
        from trainer.models.weights import WeightsError, locate_timm_weights

        try:
            locate_timm_weights(pretrained)
        except WeightsError as exc:
            raise ConfigError(str(exc)) from None
    elif pretrained and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such file ({Path(pretrained).absolute()}); place the "
                          "weight file there, pass the path of another (.pth/.pt/.npz/.safetensors), or "
                          "model.pretrained='' to train from scratch")
    resume = cfg.train.resume
    if resume not in RESUME_MODES and not (Path(resume) / "state.pt").is_file():
        raise ConfigError(f"train.resume={resume!r}: no checkpoint at {Path(resume).absolute()} (no state.pt); pass a "
                          "checkpoint folder (RUN_DIR/checkpoints/step_...), train.resume=auto or train.resume=never")


def check_checkpoint(cfg: Config) -> None:
    """Refuse, before any work, the checkpoint ``train.resume`` would load if this trainer cannot
    resume it (another format version, missing files or state keys): one line, its path and the fix."""
    from trainer.engine.checkpoint import check_checkpoint as check
    from trainer.engine.checkpoint import resolve_resume

    ckpt = resolve_resume(cfg.train.resume, Path(cfg.run_dir) / "checkpoints")
    if ckpt is None:
        return
    meta = check(ckpt, STATE_KEYS)
    saved, world, within = int(meta["world_size"]), dist.get_world_size(), int(meta.get("step_in_epoch", 0))
    if cfg.data.batch_scope == "per_rank" and saved != world and within:
        # the step's batch is W·P×K: at another W the saved position inside the epoch means other batches
        raise ConfigError(f"{ckpt}: written by {saved} ranks at step {within} of an epoch with data.batch_scope="
                          f"per_rank, where a step's batch grows with the ranks; resume it on {saved} ranks, or "
                          f"from a checkpoint at an epoch boundary (train.resume=<run_dir>/checkpoints/step_…), "
                          f"or use data.batch_scope=global")


def check_pretrained(cfg: Config) -> None:
    """Load ``model.pretrained`` into a model of this config, before any data or process work.

    Missing, unreadable or not fitting weights fail here in one line rather than after the data are
    built; the model is built exactly as the method will (the classifier size, and TMGF's cameras,
    do not take part in loading), under a forked RNG so the run's random streams are untouched.
    """
    if not cfg.model.pretrained:
        return
    import torch

    from trainer.models.registry import as_model_config, build_model

    model_cfg = as_model_config(cfg.model)
    model_cfg = dataclasses.replace(model_cfg, num_cams=max(1, model_cfg.num_cams))
    with torch.random.fork_rng(devices=[]):
        build_model(model_cfg, num_classes=0)  # no classifier: every model accepts that (TMGF has none)


def check_metrics_port(cfg: Config) -> None:
    """Every rank serves its metrics on ``train.metrics_port`` + its local rank (0 = any free port):
    each checks that it can listen there."""
    if cfg.train.metrics_port > 0:
        from trainer.engine.prometheus import check_port

        check_port(cfg.train.metrics_port, cfg.train.metrics_addr, dist.info().local_rank)


def preflight(cfg: Config) -> None:
    """Every check of a user's mistake, on this rank, before anything is written (see the module doc)."""
    check_run_dir(cfg)
    check_resume_config(cfg)  # first, as the launcher does: another config is the mistake to fix first
    check_files(cfg)  # model.pretrained and an explicit train.resume exist
    check_checkpoint(cfg)
    check_metrics_port(cfg)
    check_pretrained(cfg)


def write_run_config(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    return run_dir


def run(cfg: Config, stop_flag: StopFlag | None = None) -> FitResult:
    """Train ``cfg`` in this process (a rank of the job); the process group must be set up.

    Starts with :func:`preflight` on every rank: a user's mistake found on any rank is raised, the
    same, on all of them (no rank is left waiting in a collective). The datasets are ensured here,
    once per run, before the method is built: the methods only open them."""
    from trainer.data.prepare import check_datasets, ensure_datasets

    def checks() -> None:
        preflight(cfg)
        cfg.batch_plan(dist.get_world_size())  # P that does not split over the ranks: one line, every rank
        check_datasets(cfg.data)  # a real dataset not packed: refused before anything is written

    run_dir = Path(cfg.run_dir)
    agreed(checks)
    if dist.is_main():
        write_run_config(cfg)
    ensure_datasets(cfg.data)  # one writer per node makes the synthetic ones, then a barrier
    plan = cfg.batch_plan(dist.get_world_size())  # the checks above refused a plan that cannot run
    cfg = scaled_lr(cfg, plan)
    method = build_method(cfg)
    engine = Engine(method, cfg.train, cfg.eval, run_dir, stop_flag=stop_flag, global_batch=plan.images)
    engine.metrics.log("batch", **dataclasses.asdict(plan), images=plan.images, images_per_rank=plan.images_per_rank)
    return engine.fit()


def scaled_lr(cfg: Config, plan: BatchPlan) -> Config:
    """``cfg`` with ``train.optim.lr`` as the batch plan scales it (the saved config.yaml keeps the
    experiment's own LR: the scaled one follows from it and the world size)."""
    if plan.lr == cfg.train.optim.lr:
        return cfg
    optim = dataclasses.replace(cfg.train.optim, lr=plan.lr)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optim=optim))


def _train(args: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = compose(args)
    check_run_dir(cfg)  # before the process group and before anything is written
    rank = dist.init().rank
    flag = StopFlag()
    flag.install()  # SIGUSR2 and SIGTERM: checkpoint at the next step boundary, then exit
    try:
        result = run(cfg, flag)
    except BaseException:
        dist.shutdown()
        raise
    dist.shutdown(sync=True)
    if rank == 0:
        again = "; the same command continues it (train.resume=auto)" if result.status != "finished" else ""
        print(f"{result.status} at step {result.global_step} (epoch {result.epoch}); run dir {cfg.run_dir}{again}")
    return 0


def _on_rank_zero_only(body: Callable[[], int]) -> Callable[[], int]:
    """Ranks other than 0 exit 2 on a user error without printing it: rank 0 prints the same line."""
    def quiet() -> int:
        try:
            return body()
        except UserError:
            if os.environ.get("RANK", "0") not in ("", "0"):
                return USAGE_EXIT
            raise
    return quiet


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli("trainer.train", _on_rank_zero_only(lambda: _train(args)))


if __name__ == "__main__":
    sys.exit(main())
