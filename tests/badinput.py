"""Harness of the bad-input table (``tests/test_bad_inputs*.py``; listed for users in docs/errors.md).

A :class:`BadInput` row runs an entry point as a user would (a fresh ``python`` process in a scratch
folder) on one mistake, and :func:`check` asserts the whole contract of the error path:

- exit code 2 (a user mistake, not a bug's traceback, which exits 1);
- exactly one non-empty line on stderr and nothing on stdout — no traceback, no log chatter;
- the line contains every string of ``names`` (the file, key or value at fault) and of ``fix``
  (what to do), so a row fails if the message stops naming the culprit;
- nothing in the scratch folder was created, changed or removed (hash of every file before and
  after), except the paths a row declares in ``may_create`` — so nothing is overwritten or left
  half-written.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BadInput:
    """One row: a command, the mistake it carries and what its one-line error must name."""

    id: str
    """Short row name (the pytest id)."""
    argv: list[str]
    """Arguments after ``python`` (e.g. ``["-m", "shards.pack", ...]``); ``{tmp}`` is the scratch folder."""
    names: tuple[str, ...]
    """Strings the error line must contain: the culprit (file, key, value, flag)."""
    fix: tuple[str, ...] = ()
    """Strings naming what to do (a flag, a key, a command)."""
    setup: Callable[[Path], None] | None = None
    """Builds the scratch folder's content before the command runs."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the command."""
    may_create: tuple[str, ...] = ()
    """Paths (relative to the scratch folder) the command may create or change."""
    timeout: float = 240.0


def snapshot(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (folders as ``<dir>``)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p) or not os.path.isfile(p):
                out[os.path.relpath(p, root)] = "<special>"
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run(row: BadInput, tmp: Path) -> subprocess.CompletedProcess[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in row.argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **row.env}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run([sys.executable, *argv], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=row.timeout, stdin=subprocess.DEVNULL)


def check(row: BadInput, tmp: Path) -> str:
    """Run ``row`` in ``tmp`` and assert the error-path contract; returns the error line."""
    if row.setup is not None:
        row.setup(tmp)
    before = snapshot(tmp)
    proc = run(row, tmp)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    shown = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, shown
    assert len(lines) == 1, shown
    assert not proc.stdout.strip(), shown
    line = lines[0]
    assert "error:" in line, shown
    for s in (*row.names, *row.fix):
        assert s in line, f"{s!r} not in the error line: {line}"
    after = snapshot(tmp)
    allowed = lambda p: any(p == m or p.startswith(m.rstrip("/") + "/") for m in row.may_create)  # noqa: E731
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p) and not allowed(p))
    assert not changed, f"files created, changed or removed: {changed[:10]}\n{shown}"
    return line
