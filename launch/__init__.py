"""Launchers: ``python launch/slurm.py`` submits a training run to SLURM (or runs it locally) with submitit."""
