"""The launcher without a cluster: argument and config errors before submission, the sbatch request,
the submitit → torch.distributed environment mapping, the preemption trap and requeue bookkeeping."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit

from launch import slurm as launcher
from shards.errors import UserError
from trainer import dist
from trainer.engine.stop import StopFlag

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_submission(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an executor was created: something would have been submitted")

    monkeypatch.setattr(launcher, "make_executor", refuse)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The launcher's stderr, asserted to be one ``launch/slurm.py: error: …`` line."""
    err = capsys.readouterr().err
    assert err.startswith("launch/slurm.py: error: ") and err.count("\n") == 1, err
    return err


def _main(args: list[str]) -> int:
    try:
        return launcher.main(args)
    except SystemExit as exc:  # argparse's own checks (choices) exit from the parser
        return int(exc.code)


@pytest.mark.parametrize("override, expected", [
    ("exp=no_such_exp", "Could not find 'exp/no_such_exp'"),
    ("train.no_such_key=1", "train.no_such_key"),
    ("train.epochs=many", "train.epochs=many"),
    ("train.epochs", "expected key=value"),
])
def test_bad_config_fails_before_submission(override: str, expected: str, tmp_path: Path, no_submission: None,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    args = ["exp=pat_smoke", override, f"run_dir={run_dir}"] if override.startswith("train") else \
        [override, f"run_dir={run_dir}"]
    assert launcher.main(args) == 2
    assert expected in _error_line(capsys)
    assert not run_dir.exists()


BAD_FLAGS = [
    (["--nodes", "0"], "--nodes=0"),
    (["--time", "soon"], "--time='soon'"),
    (["--mem", "lots"], "--mem='lots'"),
    (["--partition", "gpu;rm -rf /"], "--partition="),
    (["--cluster", "local", "--nodes", "2"], "--cluster local"),
    (["--cluster", "nowhere"], "invalid choice"),
    (["--time", "5", "--signal-delay", "300"], "--signal-delay=300"),
    (["--time", "3", "--signal-delay", "61"], "use --time=4"),
    (["--cluster", "local", "--mem", "4G"], "--mem=4G: --cluster local cannot honour it"),
    (["--cluster", "local", "--partition", "gpu", "--qos", "high"], "--partition=gpu --qos=high"),
    (["--cluster", "local", "--container-image", "x.sqsh"], "--container-image=x.sqsh"),
    (["--cluster", "debug", "--apptainer", "x.sif"], "--apptainer=x.sif"),
    (["--cluster", "local", "--max-requeues", "6"], "--max-requeues=6"),
    (["--cluster", "debug", "--time", "20"], "--time=20: --cluster debug cannot honour it"),
    (["--cluster", "debug", "--signal-delay", "60", "--cpus-per-task", "2"], "--cpus-per-task=2 --signal-delay=60"),
]


@pytest.mark.parametrize("flags, expected", BAD_FLAGS)
def test_bad_launcher_arguments(flags: list[str], expected: str, tmp_path: Path, no_submission: None,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _main([*flags, "exp=pat_smoke", f"run_dir={tmp_path / 'run'}"]) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, overrides", [
    (["--cluster", "local", "--constraint", "a100"], []),
    (["--time", "2"], []),
    (["--cluster", "local", "--gpus-per-node", "1"], []),
    ([], ["exp=pat_market", "data.root={tmp}/shards"]),
    ([], ["run_dir={tmp}/file/run"]),
])
def test_dry_run_refuses_what_submission_refuses(flags: list[str], overrides: list[str], tmp_path: Path,
                                                 no_submission: None, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run makes every check a submission makes, so it can be trusted to say the job would go."""
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: False)
    (tmp_path / "file").write_text("not a folder\n")
    args = [*flags, "exp=pat_smoke", f"run_dir={tmp_path / 'run'}", *(o.replace("{tmp}", str(tmp_path))
                                                                       for o in overrides)]
    assert _main(args) == 2
    submitted = _error_line(capsys)
    assert _main(["--dry-run", *args]) == 2
    assert _error_line(capsys) == submitted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_datasets_names_the_pack_and_writes_nothing(tmp_path: Path) -> None:
    from trainer.config import compose
    from trainer.data.prepare import DatasetNotPackedError, check_datasets

    real = compose(["exp=pat_market", f"data.root={tmp_path}/shards", f"data.cache_dir={tmp_path}/cache"])
    with pytest.raises(DatasetNotPackedError) as info:
        check_datasets(real.data)
    message = str(info.value)
    for expected in ("'market1501'", f"{tmp_path}/shards/market1501/manifest.json missing",
                     f"python -m shards.pack --dataset market1501 --root <dataset folder> --out {tmp_path}/shards/"
                     "market1501", "also missing: dukemtmc, msmt17, cuhk03np_detected"):
        assert expected in message, message
    assert isinstance(info.value, UserError)
    for name in ("market1501", "dukemtmc", "msmt17", "cuhk03np_detected"):  # packed: accepted
        (tmp_path / "shards" / name).mkdir(parents=True)
        (tmp_path / "shards" / name / "manifest.json").write_text("{}\n")
    assert check_datasets(real.data) == []
    synthetic = compose(["exp=pat_smoke", f"data.cache_dir={tmp_path}/cache"])
    assert check_datasets(synthetic.data)  # made later by ensure_datasets, not refused …
    assert not (tmp_path / "cache").exists()  # … and not made here


def test_no_slurm_client_is_refused_but_dry_run_needs_none(tmp_path: Path, no_submission: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    args = ["exp=pat_smoke", f"run_dir={tmp_path / 'run'}"]
    assert launcher.main(args) == 2
    line = _error_line(capsys)
    assert "sbatch and srun not found" in line and "--cluster local" in line and "--dry-run" in line
    assert launcher.main(["--dry-run", *args]) == 0
    assert "#SBATCH --nodes=1" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def _args(*flags: str) -> argparse.Namespace:
    return launcher.build_parser().parse_intermixed_args([*flags, "exp=pat_smoke"])


def test_gpus_are_checked_where_the_job_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: False)
    for cluster in ("local", "debug"):
        with pytest.raises(launcher.LaunchError, match="no CUDA GPU; use --gpus-per-node 0 to run on CPU with gloo"):
            launcher.resources_from_args(_args("--cluster", cluster, "--gpus-per-node", "1"))
    # slurm: the GPUs are on the compute nodes
    assert launcher.resources_from_args(_args("--gpus-per-node", "8")).gpus_per_node == 8
    monkeypatch.setattr(launcher.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launcher.torch.cuda, "device_count", lambda: 2)
    assert launcher.resources_from_args(_args("--cluster", "local", "--gpus-per-node", "2")).tasks_per_node == 2
    with pytest.raises(launcher.LaunchError, match="which has 2 CUDA GPUs.*or at most 2"):
        launcher.resources_from_args(_args("--cluster", "local", "--gpus-per-node", "4"))


def test_time_must_hold_start_up_and_signal_delay() -> None:
    # 4 min = 240 s = the default 120 s delay + the 120 s allowance: the shortest accepted
    assert launcher.START_ALLOWANCE_S == 120
    assert launcher.resources_from_args(_args("--time", "4")).time_min == 4
    assert launcher.resources_from_args(_args("--time", "4", "--cluster", "local")).time_min == 4
    with pytest.raises(launcher.LaunchError, match=r"--time=4 \(240 s\) is too short: it must hold "
                                                   r"--signal-delay=121 s plus 120 s.*use --time=5 or more"):
        launcher.resources_from_args(_args("--time", "4", "--signal-delay", "121"))
    with pytest.raises(launcher.LaunchError, match=r"--time=3 \(180 s\)"):
        launcher.resources_from_args(_args("--time", "3"))


def test_defaults_when_not_given() -> None:
    res = launcher.resources_from_args(_args())
    assert (res.time_min, res.signal_delay_s, res.max_requeues) == (24 * 60, 120, 3)
    assert launcher.resources_from_args(_args("--cluster", "debug")) == res  # defaults are not "given" flags


def test_parse_time_and_mem() -> None:
    assert launcher.parse_time("90") == 90
    assert launcher.parse_time("01:30:00") == 90
    assert launcher.parse_time("01:30:01") == 91  # rounded up: never ask for less than given
    assert launcher.parse_time("45:30") == 46
    assert launcher.parse_time("2-00") == 2 * 1440
    assert launcher.parse_time("1-02:03:00") == 1440 + 123
    for bad in ("", "0", "1h", "1:2:3:4", "-5"):
        with pytest.raises(launcher.LaunchError):
            launcher.parse_time(bad)
    assert launcher.parse_mem("64G") == "64G"
    assert launcher.parse_mem("64gb") == "64G"
    assert launcher.parse_mem("4000") == "4000M"
    for bad in ("0G", "64X", "1.5G", "G"):
        with pytest.raises(launcher.LaunchError):
            launcher.parse_mem(bad)


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _fake_packs(root: Path, *names: str) -> None:
    """Manifests where the launcher looks for packed datasets (it checks they exist, not their content)."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}\n")


def test_dry_run_multisource_4_nodes(tmp_path: Path, no_submission: None, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "ms"
    _fake_packs(tmp_path / "shards", "market1501", "dukemtmc", "cuhk03np_detected", "msmt17")
    weights = tmp_path / "vit.pth"
    weights.touch()  # the launcher checks that the named weights exist (not their content)
    code = launcher.main(["--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "10",
                          "--mem", "400G", "--time", "48:00:00", "--partition", "gpu", "--account", "reid",
                          "--qos", "high", "--constraint", "a100", "--signal-delay", "180", "--max-requeues", "5",
                          "exp=multisource", f"run_dir={run_dir}", f"data.root={tmp_path / 'shards'}",
                          f"model.pretrained={weights}", "data.batch_scope=per_rank", "train.optim.lr_scaling=linear"])
    assert code == 0
    out = capsys.readouterr().out
    # 32 ranks of 16 identities x 4: 2,048 images per step, the LR scaled 32x from the experiment's 1e-3
    assert "# batch: 16 x 4 = 64 images per rank, 32 ranks, 2048 per step (data.batch_scope=per_rank); " \
           "lr 0.032 (train.optim.lr x 32, lr_scaling=linear)" in out, out
    assert "# steps per epoch: set by the identity sampler" in out  # the fake packs have no counts
    lines = _sbatch_lines(out)
    for expected in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=400G",
                     "--time=2880", "--signal=USR2@180", "--requeue", "--partition=gpu", "--account=reid",
                     "--qos=high", "--constraint=a100", "--job-name=reid-multisource", "--open-mode=append"):
        assert f"#SBATCH {expected}" in lines, (expected, out)
    assert "world size 32" in out and "max requeues 5" in out
    assert not run_dir.exists()  # a dry run creates nothing

    # the same request rendered by submitit itself (its private renderer, used here only to check ours)
    from submitit.slurm.slurm import _make_sbatch_string

    folder = run_dir / "submitit" / "%j"
    res = launcher.Resources(nodes=4, gpus_per_node=8, tasks_per_node=8, cpus_per_task=10, mem="400G",
                             time_min=2880, signal_delay_s=180, partition="gpu", account="reid", qos="high",
                             constraint="a100", max_requeues=5)
    theirs = _make_sbatch_string(command="true", folder=folder, **launcher.slurm_parameters(res, "reid-multisource"))
    assert sorted(_sbatch_lines(theirs)) == sorted(lines)


def test_dry_run_cpu_defaults(tmp_path: Path, no_submission: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main(["--dry-run", "--nodes", "2", "exp=pat_smoke", f"run_dir={tmp_path / 'r'}"]) == 0
    lines = _sbatch_lines(capsys.readouterr().out)
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --nodes=2" in lines
    assert not any("gpus" in line for line in lines)  # no GPU request on CPU


@pytest.mark.parametrize("cluster, flags, nv", [("slurm", ["--gpus-per-node", "1"], "--nv "), ("local", [], "")])
def test_apptainer_runs_each_rank_in_the_image(cluster: str, flags: list[str], nv: str, tmp_path: Path,
                                               no_submission: None, capsys: pytest.CaptureFixture[str]) -> None:
    """--apptainer: each rank is ``apptainer exec`` of the image, the checkout and the run dir bound at their
    paths (``make image-apptainer`` runs the local one for real: docs/containers.md)."""
    run_dir = (tmp_path / "r").resolve()
    assert launcher.main(["--dry-run", "--cluster", cluster, *flags, "--apptainer", "/images/reid.sif",
                          "exp=pat_smoke", f"run_dir={run_dir}"]) == 0
    cwd = os.getcwd()
    ranks = (f"apptainer exec {nv}--bind {cwd},{run_dir} --pwd {cwd} /images/reid.sif python "
             f"-u -m submitit.core._submit {run_dir}/submitit/%j")
    out = capsys.readouterr().out.splitlines()
    assert (f"srun --unbuffered {ranks}" if cluster == "slurm" else ranks) in out, out


def test_executors_get_what_their_cluster_honours(tmp_path: Path) -> None:
    res = launcher.Resources(nodes=1, tasks_per_node=2, cpus_per_task=3, time_min=30, signal_delay_s=45,
                             max_requeues=4)
    local = launcher.make_executor("local", tmp_path / "local", res, "reid-x", {})
    assert isinstance(local, submitit.LocalExecutor)
    assert {k: local.parameters[k] for k in ("timeout_min", "signal_delay_s", "tasks_per_node", "nodes")} == {
        "timeout_min": 30, "signal_delay_s": 45, "tasks_per_node": 2, "nodes": 1}
    assert local.max_num_timeout == 4  # submitit's own time-out cap follows --max-requeues
    apptainer = {"python": "apptainer exec i.sif python"}  # --apptainer: each local process runs the image's python
    contained = launcher.make_executor("local", tmp_path / "c", res, "reid-x", apptainer)
    assert isinstance(contained, submitit.LocalExecutor) and contained.python == apptainer["python"]
    assert isinstance(launcher.make_executor("debug", tmp_path / "debug", res, "reid-x", {}), submitit.DebugExecutor)
    # the slurm names must be SlurmExecutor parameters (checked without sbatch on this machine)
    from submitit.slurm.slurm import _get_default_parameters

    names = set(launcher.slurm_parameters(res, "reid-x"))
    assert names <= set(_get_default_parameters()), names - set(_get_default_parameters())


def test_job_environment() -> None:
    res = launcher.Resources(cpus_per_task=3)
    assert launcher.job_environment(res, "local") == {"OMP_NUM_THREADS": "3"}  # threads per rank
    assert launcher.job_environment(res, "slurm") == {}  # SLURM grants the cores itself
    assert launcher.job_environment(launcher.Resources(), "local") == {}


# -- process setup --------------------------------------------------------------------------------

def test_master_port_for() -> None:
    assert dist.master_port_for("1234") == 21234
    assert dist.master_port_for("41234") == 21234
    assert dist.master_port_for("987_3") == 20000 + 9873 % 20000  # array task ids stay deterministic
    assert all(20000 <= dist.master_port_for(str(j)) < 40000 for j in (0, 1, 19999, 20000, 10**9))
    with pytest.raises(ValueError):
        dist.master_port_for("abc")


def test_job_env_vars_from_fake_job_environment() -> None:
    env = SimpleNamespace(cluster="slurm", job_id="5123", global_rank=5, local_rank=1, num_tasks=8, num_nodes=4,
                          hostnames=["gpu017", "gpu018", "gpu019", "gpu020"])
    assert dist.job_env_vars(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "gpu017", "MASTER_PORT": "25123"}
    local = SimpleNamespace(cluster="local", job_id="777", global_rank=1, local_rank=1, num_tasks=2, num_nodes=1,
                            hostnames=["somehost"])
    assert dist.job_env_vars(local)["MASTER_ADDR"] == "127.0.0.1"


_JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_export_job_env_from_slurm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's real SlurmJobEnvironment parses what srun sets; stale exports are replaced."""
    for k in _JOB_VARS:
        monkeypatch.setenv(k, "stale")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                 "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}.items():
        monkeypatch.setenv(k, v)
    assert dist.export_job_env() == "submitit"
    assert {k: os.environ[k] for k in _JOB_VARS} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "24242"}


def test_export_job_env_torchrun_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")
    assert dist.export_job_env() == "torchrun"
    assert os.environ["RANK"] == "1"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    for k in _JOB_VARS:
        monkeypatch.delenv(k, raising=False)
    assert dist.export_job_env() == "single"


# -- preemption trap and requeue bookkeeping --------------------------------------------------------

@pytest.fixture
def fake_submitit_handler() -> list[int]:
    """A stand-in for submitit's USR2 handler (what it installs in a job), restored afterwards."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_trap_sets_the_flag_and_defers_submitit(fake_submitit_handler: list[int]) -> None:
    flag = StopFlag()
    trap = flag.install()
    try:
        assert not flag.agreed() and not trap.preempted
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.agreed() and trap.preempted
        assert fake_submitit_handler == []  # not run inside the signal: rank 0 must save first
        assert trap.submitit_handler() is not None
    finally:
        trap.uninstall()
    os.kill(os.getpid(), signal.SIGUSR2)  # the previous handler is back
    assert fake_submitit_handler == [signal.SIGUSR2]


def test_sigterm_stops_without_requeue() -> None:
    flag = StopFlag()
    trap = flag.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.agreed() and not trap.preempted
    finally:
        trap.uninstall()


def _job(tmp_path: Path, max_requeues: int) -> launcher.TrainJob:
    return launcher.TrainJob(["exp=pat_smoke", f"run_dir={tmp_path}"], str(tmp_path), str(REPO), max_requeues)


def test_requeue_after_preemption_hands_over_and_counts(tmp_path: Path, fake_submitit_handler: list[int]) -> None:
    launcher.reset_requeues(tmp_path, 2)
    trap = StopFlag().install()
    try:
        job = _job(tmp_path, 2)
        for expected in (1, 2):
            job._requeue_after_preemption(tmp_path, "77", trap, step=10 * expected)
            assert len(fake_submitit_handler) == expected
            state = launcher.read_requeues(tmp_path)
            last = state["events"][-1]
            assert state["count"] == expected and (last["reason"], last["step"]) == ("preempted", 10 * expected)
        with pytest.raises(submitit.core.utils.UncompletedJobError, match=r"requeue cap reached \(2/2\)"):
            job._requeue_after_preemption(tmp_path, "77", trap, step=30)
        assert len(fake_submitit_handler) == 2  # the cap: no third requeue
    finally:
        trap.uninstall()
    assert "requeue 2/2" in (tmp_path / launcher.LAUNCH_LOG).read_text()


def test_checkpoint_resubmits_the_same_job(tmp_path: Path) -> None:
    job = _job(tmp_path, 3)
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, launcher.TrainJob) and again is not job
    assert (again.overrides, again.run_dir, again.workdir, again.max_requeues) == \
        (job.overrides, job.run_dir, job.workdir, job.max_requeues)
    assert type(again).__module__ == "launch.slurm"  # pickled by reference, importable in the job


def test_requeue_counter_file(tmp_path: Path) -> None:
    assert launcher.read_requeues(tmp_path)["count"] == 0
    launcher.reset_requeues(tmp_path, 3)
    assert launcher.record_requeue(tmp_path, "failure", None, "1") == 1
    launcher.reset_requeues(tmp_path, 3)  # a new submission: a new count, history kept
    state = json.loads((tmp_path / launcher.REQUEUES_FILE).read_text())
    assert state["count"] == 0 and state["max"] == 3
    assert [e["event"] for e in state["events"]] == ["submitted", "requeue", "submitted"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_is_comm_failure() -> None:
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: "
                        "Connection reset by peer")
    assert launcher.is_comm_failure(gloo)
    assert not launcher.is_comm_failure(ValueError("data.root: no packed dataset"))
    assert not launcher.is_comm_failure(RuntimeError("shape mismatch"))


# -- end to end without SLURM ------------------------------------------------------------------------

@pytest.mark.slow
def test_local_cluster_two_tasks_end_to_end(tmp_path: Path) -> None:
    """``--cluster local``: two local processes (submitit's LocalExecutor) train pat_smoke together."""
    import subprocess

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "slurm.py"), "--cluster", "local",
                           "--tasks-per-node", "2", "--time", "20", "--wait", "exp=pat_smoke", "train.epochs=1",
                           f"run_dir={run_dir}"], capture_output=True, text=True, timeout=400, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"job \d+: finished at step 4", proc.stdout), proc.stdout
    assert (run_dir / "model_final.safetensors").is_file()
    log = (run_dir / "launch.log").read_text()
    assert "world 2" in log and "from scratch" in log
    assert json.loads((run_dir / "launch.json").read_text())["resources"]["tasks_per_node"] == 2


def test_debug_cluster_runs_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--cluster debug``: the same job in the launcher's process; handlers are restored after it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    run_dir = tmp_path / "run"
    assert launcher.main(["--cluster", "debug", "exp=pat_smoke", "train.epochs=1",
                          f"run_dir={run_dir}"]) == 0
    assert re.search(r"job DEBUG_\d+: finished at step 4", capsys.readouterr().out)
    assert (run_dir / "model_final.safetensors").is_file()
    assert {sig: signal.getsignal(sig) for sig in before} == before
