"""Launchers: ``python launch/slurm.py`` submits a training run to SLURM (or runs it locally) with
submitit; from Python, :func:`launch.slurm.submit_and_wait` takes the same path."""
