"""bench/million.py end to end at a toy size: its table rows and the two summary lines that runs are
followed by (their wording is what scripts parse), exact vs IVF at W = 1 and 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_million_quick_rows_and_summary_lines() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "million.py"), "--exact-sizes", "900",
                          "--ivf-sizes", "900", "--worlds", "1,2", "--proxies", "1001", "--threads", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| 900 |")]
    assert len(rows) == 4, out.stdout  # flat and IVF at W = 1, 2
    for row in rows:  # every rank agrees, and W = 2 gives W = 1's labels
        assert "| yes, yes |" in row, row
    ivf = [r for r in rows if "| ivf |" in r]
    recall = float(ivf[0].split("|")[9])
    assert 0.0 < recall <= 1.0
    assert re.fullmatch(r"clustering N=900 W=2: \d+ s, working memory per rank \d+\.\d\d GiB, "
                        r"recall@20 [01]\.\d{4}", lines[-2]), lines[-2]
    # 1001 proxies over 2 ranks: the larger shard holds 501 of them
    assert lines[-1] == f"proxy memory per rank, sharded W=2 vs replicated: {501 / 1001:.3f}×", lines[-1]
