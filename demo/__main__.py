"""``python -m demo [exp=NAME] [key=value …]`` — the PAT demo (:mod:`demo.pat`, ``exp=pat_demo``), or
with ``exp=tmgf_demo`` the TMGF demo (:mod:`demo.tmgf`), which starts from the PAT demo's model.

Exit status: 0, 2 for a user's mistake (one line on stderr), 1 when training failed, and for the TMGF
demo 3 when a run misses an acceptance bar.
"""

from __future__ import annotations

import sys

from demo.pat import run_pat_demo
from demo.tmgf import run_demo as run_tmgf_demo
from shards.errors import run_cli

PROG = "demo"


def run_demo(args: list[str]) -> int:
    exp = [a for a in args if a.startswith("exp=")] or ["exp=pat_demo"]
    rest = [a for a in args if not a.startswith("exp=")]
    if exp[-1] == "exp=tmgf_demo":
        return run_tmgf_demo(rest)
    return run_pat_demo(exp + rest)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: run_demo(args))


if __name__ == "__main__":
    sys.exit(main())
