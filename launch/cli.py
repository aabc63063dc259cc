"""The command line of ``python launch/slurm.py``: its flags, the flags as a
:class:`~launch.resources.Resources` request, and what ``--dry-run`` prints."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from launch.executor import executor_parameters, job_environment, render_sbatch, slurm_parameters
from launch.plan import LaunchPlan, deepspeed_config_of
from launch.resources import (
    CLUSTERS,
    DEFAULT_MAX_REQUEUES,
    DEFAULT_SIGNAL_DELAY_S,
    DEFAULT_TIME,
    LOCAL_MAX_REQUEUES,
    START_ALLOWANCE_S,
    Resources,
    resources,
)
from shards.errors import CliParser
from trainer.config import Config

PROG = "launch/slurm.py"
RESOURCE_FLAGS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time", "signal_delay",
                  "partition", "account", "qos", "constraint", "max_requeues", "apptainer", "container_image")
"""The flags (argparse names) that make the request: the keywords of :func:`launch.resources.resources`."""


def build_parser() -> argparse.ArgumentParser:
    # flags a cluster kind may not honour default to None, so that "given" can be told from "default"
    p = CliParser(PROG, prog="python launch/slurm.py",
                  description="Submit a training run (exp=NAME key=value ...) to SLURM with submitit.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: CPU, gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per rank (local: each rank's thread count, OMP_NUM_THREADS)")
    p.add_argument("--mem", default=None, help="memory per node: 64G, 4000M (slurm only)")
    p.add_argument("--time", default=None, help=f"time limit: minutes or [D-]HH:MM:SS (default {DEFAULT_TIME}); "
                                                f"at least --signal-delay + {START_ALLOWANCE_S} s")
    p.add_argument("--signal-delay", type=int, default=None,
                   help=f"seconds of warning (USR2) before the time limit (default {DEFAULT_SIGNAL_DELAY_S})")
    p.add_argument("--partition", default=None, help="slurm only")
    p.add_argument("--account", default=None, help="slurm only")
    p.add_argument("--qos", default=None, help="slurm only")
    p.add_argument("--constraint", default=None, help="slurm only")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm (sbatch), local (local processes), debug (in this process)")
    p.add_argument("--max-requeues", type=int, default=None,
                   help=f"requeues allowed (default {DEFAULT_MAX_REQUEUES}; local: at most {LOCAL_MAX_REQUEUES})")
    p.add_argument("--apptainer", metavar="IMAGE", default=None,
                   help="run the ranks in this Apptainer image (.sif): apptainer exec [--nv] IMAGE python")
    p.add_argument("--container-image", metavar="IMAGE", default=None,
                   help="run the ranks in this image through pyxis/enroot (srun --container-image)")
    p.add_argument("--folder", default=None, help="submitit folder (default RUN_DIR/submitit/%%j)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print what would be submitted and exit (needs no SLURM here)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it fails, showing "
                   "its progress (a bar on a terminal, else a line every --progress-every seconds) and each evaluation")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="with --wait and no terminal: seconds between two progress lines (0: no progress shown)")
    p.add_argument("overrides", nargs="*", help="config overrides: exp=NAME key=value ...")
    return p


def resources_from_args(args: argparse.Namespace) -> Resources:
    """The request the parsed flags make, every flag checked against ``--cluster``."""
    return resources(args.cluster, **{name: getattr(args, name) for name in RESOURCE_FLAGS})


def steps_per_epoch(cfg: Config, images_per_step: int) -> str:
    """Steps per epoch as the dry run can tell them: TMGF's are configured; PAT's identity sampler sets
    them from the training data, estimated here from the packs' manifests when they can be read."""
    if cfg.method == "tmgf":
        return f"{cfg.tmgf.iters_per_epoch} (tmgf.iters_per_epoch)"
    sources, _ = cfg.data.resolved()
    try:
        n = sum(int(json.loads((Path(cfg.data.root) / name / "manifest.json").read_text())["splits"]["train"]["count"])
                for name in sources)
    except (OSError, ValueError, KeyError, TypeError):
        return "set by the identity sampler from the training data (packs not readable here)"
    return f"about {n // images_per_step} ({n} training images / {images_per_step} per step; the identity sampler " \
           "sets the exact number)"


def print_dry_run(launch: LaunchPlan) -> None:
    """What would be submitted: the request, the overrides, the environment and, for SLURM, the
    ``#SBATCH`` lines and the srun command."""
    res, cluster = launch.res, launch.cluster
    print(f"# dry run: nothing submitted (cluster={cluster}, world size {res.world_size}, "
          f"max requeues {res.max_requeues})")
    print(f"# run dir: {launch.cfg.run_dir}")
    print(f"# overrides: {' '.join(shlex.quote(o) for o in launch.overrides)}")
    plan = launch.cfg.batch_plan(res.world_size)
    print(f"# {plan.describe()}")
    print(f"# steps per epoch: {steps_per_epoch(launch.cfg, plan.images)}")
    env = job_environment(res, cluster)
    print(f"# environment: {' '.join(f'{k}={shlex.quote(v)}' for k, v in sorted(env.items()))}")
    if launch.cfg.train.strategy == "deepspeed":
        print(f"# deepspeed config (written to {Path(launch.cfg.run_dir) / 'deepspeed.json'}):")
        print(json.dumps(deepspeed_config_of(launch.cfg, res), indent=1, sort_keys=True))
    if cluster == "slurm":
        print(render_sbatch(slurm_parameters(res, launch.job_name), launch.folder))
        srun = " ".join(shlex.quote(a) for a in ["srun", "--unbuffered", *launch.container.get("srun_args", [])])
        python = launch.container.get("python", shlex.quote(sys.executable))
        print(f"{srun} {python} -u -m submitit.core._submit {shlex.quote(str(launch.folder))}")
    elif cluster == "debug":
        print("# one rank in this process (submitit's DebugExecutor)")
    else:
        print(json.dumps(executor_parameters(res, cluster, launch.job_name), sort_keys=True))
        if "python" in launch.container:  # --apptainer: the command each local process runs
            print(f"{launch.container['python']} -u -m submitit.core._submit {shlex.quote(str(launch.folder))}")
