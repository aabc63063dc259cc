"""``python -m trainer.visualize RUN_DIR``: what a trained model looks at, and what it retrieves.

For one target set of a run (its final model or a checkpoint): attention maps over the query images
(PAT: the class token and each part token in the last block; TMGF: attention rollout for each branch),
ranking lists (a query and its top-k gallery images: true matches framed green, false red, same-camera
junk grey), written as ``attention.png``, ``ranking.png`` and one self-contained ``index.html``.
The entry point for Python is :func:`trainer.visualize.report.visualize`; docs/visualize.md describes
the pictures. This package file imports nothing, so the command reports a mistake in a run directory
before it loads torch.
"""
