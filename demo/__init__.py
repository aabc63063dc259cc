"""The two demos, end to end on this machine, through the launcher's Python API.

``python -m demo`` (``make demo``): PAT on synthetic persons (:mod:`demo.pat`); ``python -m demo.tmgf``
(``make tmgf-demo``): TMGF, unsupervised, starting from the PAT demo's model (:mod:`demo.tmgf`).
Both train with 2 local gloo processes submitted by :func:`launch.slurm.submit_and_wait`, the path a
cluster user's ``python launch/slurm.py --cluster local`` takes.
"""
