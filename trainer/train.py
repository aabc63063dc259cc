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


def write_run_config(cfg: Config) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    return run_dir


def run(cfg: Config, stop_flag: StopFlag | None = None) -> FitResult:
    """Train ``cfg`` in this process (a rank of the job); the process group must be set up."""
    run_dir = Path(cfg.run_dir)
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
