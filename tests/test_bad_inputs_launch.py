"""Bad-input table of the launcher (``launch/slurm.py``): each mistake is one line, exit 2, nothing written.

Rows that a broken check would let through to a real submission use ``--dry-run`` (which makes every
check a submission makes, ``tests/test_launch.py`` asserts the same line both ways), so that a
regression fails the row instead of queueing a job.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.badinput import REPO, BadInput, check

LAUNCH = str(REPO / "launch" / "slurm.py")
SMOKE = ["exp=pat_smoke", "run_dir={tmp}/run"]


def _file_named_file(tmp: Path) -> None:
    (tmp / "file").write_text("a file where the run dir's parent should be\n")


def _read_only_folder(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


ROWS = [
    BadInput("datasets_not_packed", [LAUNCH, "--nodes", "4", "exp=pat_market", "data.root={tmp}/data/shards",
                                     "run_dir={tmp}/run"],
             names=("'market1501'", "data/shards/market1501/manifest.json missing"),
             fix=("python -m shards.pack --dataset market1501 --root <dataset folder> --out",)),
    BadInput("datasets_not_packed_dry_run", [LAUNCH, "--dry-run", "exp=pat_market", "data.root={tmp}/data/shards",
                                             "run_dir={tmp}/run"],
             names=("'market1501'", "data/shards/market1501/manifest.json missing"),
             fix=("python -m shards.pack --dataset market1501",)),
    # the test machine may run a SLURM cluster (tests/slurm/cluster.sh: sbatch in /usr/bin): hide it
    BadInput("no_slurm", [LAUNCH, *SMOKE], env={"PATH": "/nonexistent-reid-no-slurm"},
             names=("--cluster slurm", "sbatch and srun not found on PATH"), fix=("--cluster local", "--dry-run")),
    BadInput("gpus_without_cuda_local", [LAUNCH, "--cluster", "local", "--gpus-per-node", "1", *SMOKE],
             env={"CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a machine that has some
             names=("--gpus-per-node=1", "--cluster local", "no CUDA GPU"), fix=("--gpus-per-node 0", "gloo")),
    BadInput("local_mem", [LAUNCH, "--cluster", "local", "--mem", "4G", *SMOKE],
             names=("--mem=4G", "--cluster local cannot honour it"), fix=("drop it", "--cluster slurm")),
    BadInput("local_partition", [LAUNCH, "--dry-run", "--cluster", "local", "--partition", "gpu", *SMOKE],
             names=("--partition=gpu", "--cluster local"), fix=("drop it", "--cluster slurm")),
    BadInput("local_account", [LAUNCH, "--dry-run", "--cluster", "local", "--account", "reid", *SMOKE],
             names=("--account=reid", "--cluster local"), fix=("drop it", "--cluster slurm")),
    BadInput("local_qos", [LAUNCH, "--dry-run", "--cluster", "local", "--qos", "high", *SMOKE],
             names=("--qos=high", "--cluster local"), fix=("drop it", "--cluster slurm")),
    BadInput("local_constraint", [LAUNCH, "--dry-run", "--cluster", "local", "--constraint", "a100", *SMOKE],
             names=("--constraint=a100", "--cluster local"), fix=("drop it", "--cluster slurm")),
    BadInput("debug_cpus_and_signal_delay", [LAUNCH, "--dry-run", "--cluster", "debug", "--cpus-per-task", "2",
                                             "--signal-delay", "60", *SMOKE],
             names=("--cpus-per-task=2 --signal-delay=60", "--cluster debug cannot honour them"),
             fix=("--cluster local or slurm",)),
    # under either strategy a step's identities must split over the ranks (data.batch_scope=global)
    BadInput("deepspeed_batch_does_not_split", [LAUNCH, "--dry-run", "--cluster", "local", "--tasks-per-node", "3",
                                                *SMOKE, "train.strategy=deepspeed"],
             names=("data.ids_per_batch=8 identities per step do not split over 3 ranks",),
             fix=("data.batch_scope=per_rank", "number of ranks that divides 8")),
    # the headline command in the world-size-invariant mode: 16 identities cannot split over 32 ranks
    BadInput("global_batch_does_not_split", [LAUNCH, "--dry-run", "--nodes", "4", "--gpus-per-node", "8", *SMOKE,
                                             "data.ids_per_batch=16"],
             names=("data.ids_per_batch=16 identities per step do not split over 32 ranks",),
             fix=("data.batch_scope=per_rank", "train.optim.lr_scaling=linear or sqrt",
                  "number of ranks that divides 16")),
    BadInput("batch_scope_unknown", [LAUNCH, "--dry-run", *SMOKE, "data.batch_scope=local"],
             names=("data.batch_scope='local'",), fix=("one of ('global', 'per_rank')",)),
    BadInput("lr_scaling_unknown", [LAUNCH, "--dry-run", *SMOKE, "train.optim.lr_scaling=cubic"],
             names=("train.optim.lr_scaling='cubic'",), fix=("one of ('none', 'linear', 'sqrt')",)),
    BadInput("strategy_unknown", [LAUNCH, "--dry-run", *SMOKE, "train.strategy=zero"],
             names=("train.strategy='zero'",), fix=("one of ('ddp', 'deepspeed')",)),
    BadInput("zero_stage_3", [LAUNCH, "--dry-run", *SMOKE, "train.strategy=deepspeed", "train.zero_stage=3"],
             names=("train.zero_stage=3",), fix=("one of (1, 2)",)),
    BadInput("clip_grad_negative", [LAUNCH, "--dry-run", *SMOKE, "train.clip_grad=-1"],
             names=("train.clip_grad=-1",), fix=(">= 0 (0: no clipping)",)),
    BadInput("time_too_short", [LAUNCH, "--dry-run", "--time", "3", "--signal-delay", "120", *SMOKE],
             names=("--time=3 (180 s)", "--signal-delay=120 s", "120 s"), fix=("--time=4 or more",)),
    BadInput("run_dir_parent_is_a_file", [LAUNCH, "exp=pat_smoke", "run_dir={tmp}/file/run"], setup=_file_named_file,
             names=("file/run", "is not a folder"), fix=("another run_dir",)),
    # sysfs refuses new files to root as well: the unwritable case that holds where the tests run as root
    BadInput("run_dir_not_writable_sysfs", [LAUNCH, "exp=pat_smoke", "run_dir=/sys/reid-run"],
             names=("run_dir=/sys/reid-run", "cannot write in /sys"), fix=("writable run_dir",)),
    BadInput("run_dir_read_only", [LAUNCH, "exp=pat_smoke", "run_dir={tmp}/ro/run"], setup=_read_only_folder,
             names=("ro/run", "cannot write in", "Permission denied"), fix=("writable run_dir",)),
    BadInput("pretrained_missing", [LAUNCH, "--dry-run", *SMOKE, "model.pretrained={tmp}/vit.pth"],
             names=("model.pretrained=", "vit.pth", "no such file"), fix=("place the weight file there",)),
    BadInput("nodes_zero", [LAUNCH, "--nodes", "0", *SMOKE], names=("--nodes=0",), fix=(">= 1",)),
]

SKIP = {
    "run_dir_not_writable_sysfs": None if os.path.isdir("/sys") else "no /sys on this machine",
    "run_dir_read_only": "root writes in a 0o555 folder (run_dir_not_writable_sysfs covers root)"
    if os.geteuid() == 0 else None,
}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: BadInput, tmp_path: Path) -> None:
    if SKIP.get(row.id):
        pytest.skip(SKIP[row.id])
    check(row, tmp_path)
