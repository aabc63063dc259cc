"""How a :class:`~launch.resources.Resources` request reaches submitit: the sbatch parameters (and the
``#SBATCH`` lines a dry run prints), the executor of each cluster kind, the container wrapping and
the environment the job inherits."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import submitit

from launch.resources import NAME, LaunchError, Resources

"""The checkout: the job imports ``launch`` and ``trainer`` from it."""


def container_setup(res: Resources, workdir: str, run_dir: str) -> dict[str, Any]:
    """SlurmExecutor arguments that run each rank in a container: ``python`` (the command that
    starts python in the job; every word shell-quoted here) and ``srun_args``. The checkout and the
    run directory are mounted at the same paths, so the job runs this checkout's code with the
    image's dependencies."""
    for path in (workdir, run_dir):
        if (res.apptainer or res.container_image) and not NAME.match(path):
            raise LaunchError(f"{path!r}: container mounts need a path without spaces or commas")
    if res.apptainer:
        words = ["apptainer", "exec", *(["--nv"] if res.gpus_per_node else []), "--bind",
                 f"{workdir},{run_dir}", "--pwd", workdir, res.apptainer, "python"]
        return {"python": " ".join(shlex.quote(w) for w in words)}
    if res.container_image:
        return {"python": "python", "srun_args": [
            f"--container-image={res.container_image}", f"--container-mounts={workdir}:{workdir},{run_dir}:{run_dir}",
            f"--container-workdir={workdir}"]}
    return {}


def slurm_parameters(res: Resources, job_name: str) -> dict[str, Any]:
    """Keyword arguments of submitit's SlurmExecutor (``update_parameters``) for ``res``.

    The one description of the sbatch request: it is what is submitted (prefixed ``slurm_``
    through AutoExecutor) and what ``--dry-run`` prints.
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "time": res.time_min,
        "signal_delay_s": res.signal_delay_s,
        # --requeue: SLURM itself requeues on node failure / preemption; `scontrol requeue` needs it
        # where the cluster's default is JobRequeue=0
        "additional_parameters": {"requeue": True},
    }
    optional = {"gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task, "mem": res.mem,
                "partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def render_sbatch(params: dict[str, Any], folder: str | os.PathLike[str]) -> str:
    """The ``#SBATCH`` lines submitit writes for ``params`` (same names, same quoting)."""
    flags: dict[str, Any] = {k: v for k, v in params.items() if k not in ("signal_delay_s", "additional_parameters")}
    flags["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{params['signal_delay_s']}"
    flags["output"] = str(Path(folder) / "%j_0_log.out")
    flags["error"] = str(Path(folder) / "%j_0_log.err")
    flags["open-mode"] = "append"
    flags["wckey"] = "submitit"  # submitit's default workload key
    flags.update(params.get("additional_parameters") or {})
    lines = []
    for key in sorted(flags):
        value = flags[key]
        name = key.replace("_", "-")
        lines.append(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}")
    return "\n".join(lines)


def executor_parameters(res: Resources, cluster: str, job_name: str) -> dict[str, Any]:
    """``update_parameters`` keywords of the executor :func:`make_executor` builds for ``cluster``.

    ``local``: what submitit's LocalExecutor honours (time limit, warning delay, ranks, GPUs);
    ``debug`` runs in this process and honours none (its flags are refused, see
    :data:`launch.resources.NOT_HONOURED`).
    """
    if cluster == "slurm":
        return {f"slurm_{k}": v for k, v in slurm_parameters(res, job_name).items()}
    if cluster == "debug":
        return {}
    params: dict[str, Any] = {"nodes": 1, "tasks_per_node": res.tasks_per_node, "timeout_min": res.time_min,
                              "signal_delay_s": res.signal_delay_s}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    return params


def make_executor(cluster: str, folder: str | os.PathLike[str], res: Resources, job_name: str,
                  container: dict[str, Any]) -> submitit.Executor:
    """The submitit executor for ``cluster``, its parameters set. ``local`` is built directly:
    AutoExecutor does not pass ``signal_delay_s`` (nor the time-out cap) to the LocalExecutor."""
    params = executor_parameters(res, cluster, job_name)
    folder = Path(folder)  # submitit takes str | Path (and makes a Path of it)
    executor: submitit.Executor
    if cluster == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=res.max_requeues,
                                         **({"slurm_python": container["python"]} if "python" in container else {}))
        if "srun_args" in container:
            params["slurm_srun_args"] = container["srun_args"]
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_requeues,  # apptainer: its python
                                          **({"python": container["python"]} if "python" in container else {}))
    else:
        executor = submitit.DebugExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor


def job_environment(res: Resources, cluster: str) -> dict[str, str]:
    """Variables to set in the launcher's environment, which sbatch and the local executor pass to
    the job: on ``local``, ``--cpus-per-task`` as each rank's thread count (SLURM grants it as cores).
    The job imports ``launch`` and ``trainer`` through the project's editable install in the same
    Python that runs the launcher (``sys.executable``), so no search path is set here."""
    env: dict[str, str] = {}
    if cluster == "local" and res.cpus_per_task is not None:
        env["OMP_NUM_THREADS"] = str(res.cpus_per_task)
    return env


def check_slurm_installed() -> None:
    """Submitting to SLURM needs its client here (submitit calls sbatch, the script calls srun)."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise LaunchError(f"--cluster slurm: {' and '.join(missing)} not found on PATH (SLURM is not installed on "
                          f"this machine); run here with --cluster local, or see the sbatch script with --dry-run")
