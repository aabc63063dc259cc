"""``python -m trainer.train exp=NAME key=value …`` — one process, or every rank under torchrun.

Composes and validates the config (a bad key or value exits with a one-line error before any work),
sets up the process group, writes ``run_dir/config.yaml``, and runs the method on the engine.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from trainer import dist
from trainer.config import Config, ConfigError, compose, to_yaml
from trainer.engine.loop import Engine, FitResult, StopFlag
from trainer.methods import build_method
from shards.records import atomic_write_bytes


RESUMABLE_CHANGES = (
    "name", "run_dir", "train.epochs", "train.resume", "train.max_steps", "train.log_every", "train.ckpt_every_steps",
    "train.ckpt_every_epochs", "train.keep_checkpoints", "train.metrics_port", "train.metrics_addr", "eval.",
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
        raise ConfigError(f"{saved}: cannot read the run's config ({exc}); pass train.resume=never or another run_dir") from None
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False))
    free = lambda k: any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)  # noqa: E731
    diff = [f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})"
            for k in sorted(set(old) | set(new)) if not free(k) and old.get(k, "<absent>") != new.get(k, "<absent>")]
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"run_dir={cfg.run_dir} holds checkpoints of another config: {shown}; resume with the same "
                          "config, or use another run_dir (or train.resume=never to start over there)")


def write_run_config(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    return run_dir


def run(cfg: Config, stop_flag: StopFlag | None = None) -> FitResult:
    """Train ``cfg`` in this process (a rank of the job); the process group must be set up."""
    run_dir = Path(cfg.run_dir)
    check_resume_config(cfg)  # every rank: all of them stop with the same error
    if dist.is_main():
        write_run_config(cfg)
    dist.barrier()
    method = build_method(cfg)
    return Engine(method, cfg.train, cfg.eval, run_dir, stop_flag=stop_flag).fit()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_resume_config(cfg)  # before any process group: a one-line error, no traceback
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank = dist.init().rank
    flag = StopFlag()
    flag.install()
    try:
        result = run(cfg, flag)
    finally:
        dist.shutdown()
    if rank == 0:
        print(f"{result.status} at step {result.global_step} (epoch {result.epoch}); run dir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
