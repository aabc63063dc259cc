"""bench/memory.py: the working memory of a known allocation, and that an earlier, higher peak of the
process does not hide it. Each case runs in a fresh interpreter, so that this test process's own
history (pytest, earlier tests) is not part of what is measured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# Above the allocation: what the interpreter and the allocator add around it (numpy's dispatch, the
# page tables of 64 MiB, glibc arenas, a status-file read) is a few MiB; 48 MiB leaves room for a busy
# machine yet is well below a second copy of the array, which is what a broken reset or base would add.
SLACK = 48 * MIB


def _measure(code: str) -> int:
    """Run ``code`` (it prints the measured bytes last) in a fresh interpreter; the figure."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


PRELUDE = """
import numpy as np
from bench.memory import mark, working_memory
def touched(mib):
    a = np.empty(mib << 20, dtype=np.uint8)
    a.fill(1)  # every page written: resident, not just reserved
    return a
touched(1)  # numpy's first-call state, before the mark
"""


def test_working_memory_of_a_touched_allocation() -> None:
    work = _measure(PRELUDE + """
m = mark()
a = touched(64)
print(working_memory(m))
""")
    assert 60 * MIB <= work < 64 * MIB + SLACK, work / MIB


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's clear_refs")
def test_earlier_higher_peak_does_not_hide_the_call() -> None:
    # 128 MiB allocated and freed before the mark: the process's high-water mark stays ~128 MiB above
    # the RSS. Without the reset the old peak is what is read (checked: ~128 MiB instead of 32 against
    # the RSS as base; 0 against ``ru_maxrss`` as base, the 32 MiB never passing the old mark).
    work = _measure(PRELUDE + """
big = touched(128)
del big
m = mark()
assert m.reset
a = touched(32)
print(working_memory(m))
""")
    assert 30 * MIB <= work < 32 * MIB + SLACK, work / MIB
