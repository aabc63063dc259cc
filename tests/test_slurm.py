"""The launcher on a real SLURM cluster (``tests/slurm/cluster.sh``: munged, slurmctld, two slurmd).

Four 2-node jobs of ``exp=pat_smoke`` (1 rank per node, gloo) run side by side: one undisturbed
(the reference), one warned with USR2 mid-run (SLURM's preemption / time-limit signal), one whose
rank 1 is SIGKILLed mid-run, one warned under ``--max-requeues 0``. The first two interrupted ones
must requeue, resume from a checkpoint and end with ``model_final.safetensors`` bit-identical to
the reference's; the capped one must stop with a checkpoint and stay stopped.

Skipped (with the reason) where the cluster cannot be started: not root, or SLURM not installed and
no apt-get. Where it can, a failure to start is a test failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
# 2 epochs of 4 steps, a checkpoint every 2 steps, one evaluation at the end
SMOKE = ["exp=pat_smoke", "train.epochs=2"]
CKPT_EVERY = 2


@pytest.fixture(scope="module")
def cluster() -> None:
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it installs packages and starts daemons)")
    have_slurm = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "launch" / "slurm.py"), "--nodes", "2", "--time", "60", "--signal-delay", "30",
           *extra, *SMOKE, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _job_id(proc: subprocess.Popen, run_dir: Path) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((run_dir / "launch.json").read_text())["job_id"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _logs(run_dir: Path) -> str:
    launch = run_dir / "launch.log"
    text = launch.read_text() if launch.is_file() else "(no launch.log)"
    errs = sorted((run_dir / "submitit").glob("*/*_log.err"))
    tail = errs[0].read_text()[-2000:] if errs else "(no job log)"
    return f"launch.log:\n{text}\nlog tail:\n{tail}"


def _rank_pid(job_id: str, rank: int) -> int:
    """The process running ``rank`` of ``job_id`` (its environment says so)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank} of job {job_id}")


@pytest.fixture(scope="module")
def runs(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Submit the four jobs at once, disturb them as they reach their steps, wait for all to end.

    reference: undisturbed. preempted: USR2 at step >= 3. killed: rank 1 SIGKILLed at step >= 5.
    capped (--max-requeues 0): USR2 at step >= 2.
    """
    root = tmp_path_factory.mktemp("slurm")
    extra = {"reference": (), "preempted": (), "killed": (), "capped": ("--max-requeues", "0")}
    procs = {name: _launch(root / name, *args) for name, args in extra.items()}  # the launchers run in parallel
    runs = {name: {"dir": root / name, "job": _job_id(proc, root / name)} for name, proc in procs.items()}

    def usr2(run: dict) -> None:
        subprocess.run(["scancel", "--signal=USR2", run["job"]], check=True)

    def kill_rank1(run: dict) -> None:
        os.kill(_rank_pid(run["job"], 1), signal.SIGKILL)

    triggers = {"preempted": (3, usr2), "killed": (5, kill_rank1), "capped": (2, usr2)}
    end = time.time() + 900
    while triggers and time.time() < end:
        for name, (step, action) in list(triggers.items()):
            run = runs[name]
            steps = [r["step"] for r in _records(run["dir"], "train")]
            if steps and max(steps) >= step and _state(run["job"]) == "RUNNING":
                run["trigger_step"] = max(steps)
                action(run)
                del triggers[name]
        time.sleep(0.3)
    assert not triggers, f"never reached their trigger steps: {sorted(triggers)}"
    for run in runs.values():
        _wait_gone(run["job"], end - time.time(), run["dir"])
    return runs


def _wait_gone(job_id: str, timeout: float, run_dir: Path) -> None:
    """Wait until the job has left the queue for good (a requeue may hide it for a moment)."""
    end = time.time() + max(timeout, 1)
    gone_since = None
    while time.time() < end:
        if _state(job_id):
            gone_since = None
        elif gone_since is None:
            gone_since = time.time()
        elif time.time() - gone_since > 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish ({_logs(run_dir)})")


def test_undisturbed_reference(runs: dict[str, dict]) -> None:
    ref = runs["reference"]["dir"]
    assert (ref / "model_final.safetensors").is_file(), _logs(ref)
    assert not _records(ref, "resume")
    assert json.loads((ref / "requeues.json").read_text())["count"] == 0


@pytest.mark.parametrize("name, reason", [("preempted", "preempted"), ("killed", "failure")])
def test_requeued_run_resumes_bit_identical(runs: dict[str, dict], name: str, reason: str) -> None:
    run_dir, trigger = runs[name]["dir"], runs[name]["trigger_step"]
    resumes = _records(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] > 0, _logs(run_dir)
    assert resumes[0]["world_size"] == resumes[0]["saved_world_size"] == 2
    requeues = json.loads((run_dir / "requeues.json").read_text())
    assert requeues["count"] == 1 and requeues["events"][-1]["reason"] == reason, requeues
    log = (run_dir / "launch.log").read_text()
    assert f"resuming from step {resumes[0]['step']}" in log, log
    if name == "preempted":
        # all ranks saved at the step boundary after the signal, not an older periodic checkpoint
        assert resumes[0]["step"] >= trigger, _logs(run_dir)
    else:
        # at most one checkpoint interval lost to the kill
        assert resumes[0]["step"] >= trigger - CKPT_EVERY, _logs(run_dir)
    reference = (runs["reference"]["dir"] / "model_final.safetensors").read_bytes()
    assert (run_dir / "model_final.safetensors").read_bytes() == reference, f"{name}: weights differ"


def test_requeue_cap_reached(runs: dict[str, dict]) -> None:
    """--max-requeues 0: the warned run saves a checkpoint and stops; the job is not requeued."""
    run_dir = runs["capped"]["dir"]
    log = (run_dir / "launch.log").read_text()
    assert "requeue cap reached (0/0)" in log, log
    assert not (run_dir / "model_final.safetensors").exists()
    assert not _records(run_dir, "resume")
    assert json.loads((run_dir / "requeues.json").read_text())["count"] == 0
    saved = [r["step"] for r in _records(run_dir, "checkpoint")]
    assert saved and max(saved) == max(r["step"] for r in _records(run_dir, "train")) >= runs["capped"]["trigger_step"]
