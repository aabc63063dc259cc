"""The run directory's launch ledger: the requeue counter (``requeues.json``) and the event log
(``launch.log``) that submissions, job starts and ends, and requeues append to.

Requeues are counted per submission and capped by ``--max-requeues``: one writer at a time (rank 0,
or the one rank that claimed a failure), each write atomic.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from shards.atomic import atomic_write_bytes

log = logging.getLogger("launch")

REQUEUES_FILE = "requeues.json"
LAUNCH_LOG = "launch.log"


def read_requeues(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / REQUEUES_FILE
    if not path.is_file():
        return {"count": 0, "max": 0, "events": []}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: unreadable requeue counter ({exc})") from exc


def reset_requeues(run_dir: str | os.PathLike[str], max_requeues: int) -> None:
    """A new submission starts a new count (earlier submissions' events are kept). Called before
    submitting, so a fast-starting job never has its first requeue wiped."""
    state = read_requeues(run_dir)
    events = state.get("events", []) + [{"event": "submitted", "time": time.time()}]
    _write_requeues(run_dir, {"count": 0, "max": max_requeues, "events": events})


def record_requeue(run_dir: str | os.PathLike[str], reason: str, step: int | None, job_id: str) -> int:
    """Count one requeue (one writer: rank 0, or the rank that claimed a failure); returns the new count."""
    state = read_requeues(run_dir)
    state["count"] = int(state.get("count", 0)) + 1
    state.setdefault("events", []).append(
        {"event": "requeue", "reason": reason, "step": step, "job_id": job_id, "time": time.time()})
    _write_requeues(run_dir, state)
    return state["count"]


def _write_requeues(run_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    atomic_write_bytes(Path(run_dir) / REQUEUES_FILE, (json.dumps(state, indent=1) + "\n").encode())


def launch_log(run_dir: Path, message: str) -> None:
    """Log ``message`` and append it, timestamped, to ``run_dir/launch.log``."""
    log.info(message)
    with open(run_dir / LAUNCH_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
