"""Working memory of one call: the peak RSS during the call minus the RSS just before it (bytes).

Shared by the benchmarks that report what a call itself needs, apart from the interpreter, the imports
and the inputs that exist before it (``bench/million.py``, ``bench/eval.py``):

    m = mark()
    run_the_call()
    extra = working_memory(m)

Two things would otherwise hide the call's memory:

- the process's earlier history: the peak RSS (``VmHWM``, ``ru_maxrss``) is a high-water mark since
  the process started, so a warm-up or an earlier call that peaked higher would mask this call's
  peak. On Linux :func:`mark` resets it to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs``;
- heap the allocator keeps: memory an earlier call freed but glibc did not hand back sits in the RSS
  before the call, and the call can grow into it unseen. :func:`mark` first calls ``malloc_trim(0)``.

Fallbacks: where ``/proc`` or ``clear_refs`` is absent (not Linux, a restricted sandbox) the base and
the peak are both ``ru_maxrss``, the high-water mark since the process started, so the figure is the
call's growth beyond that mark (0 when an earlier peak was higher); where there is no glibc, nothing is
trimmed. Note that ``ru_maxrss`` also counts the parent's peak when the process was started by
``vfork`` + ``exec`` (as ``subprocess`` does), which ``VmHWM`` does not.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from dataclasses import dataclass

__all__ = ["Mark", "mark", "status_bytes", "trim", "working_memory"]


def status_bytes(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes; None without ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel writes these in kB (KiB)
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def trim() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``). Best effort: nothing
    where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class Mark:
    """Where a measurement starts: ``base`` bytes (the RSS after the reset, or ``ru_maxrss`` when the
    peak could not be reset) and whether the peak was reset (then the peak is read from ``VmHWM``)."""

    base: int
    reset: bool


def mark() -> Mark:
    """Start measuring: hand freed heap back (:func:`trim`), then, on Linux, reset the process's peak
    RSS (VmHWM) to its current RSS, so that :func:`working_memory` sees only what follows."""
    trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS
    except OSError:
        return Mark(_maxrss_bytes(), False)
    rss = status_bytes("VmRSS")  # read after the reset: the floor the new peak starts from
    return Mark(rss, True) if rss is not None else Mark(_maxrss_bytes(), False)


def working_memory(m: Mark) -> int:
    """The peak RSS since :func:`mark` minus its base (bytes, >= 0)."""
    hwm = status_bytes("VmHWM") if m.reset else None
    peak = hwm if hwm is not None else _maxrss_bytes()
    return max(0, peak - m.base)
