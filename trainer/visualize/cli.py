"""The command line of ``python -m trainer.visualize``: a user's mistake is one line and exit 2."""

from __future__ import annotations

import argparse
import sys

from shards.errors import CliParser, run_cli

PROG = "trainer.visualize"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = CliParser(PROG, prog=f"python -m {PROG}", description=(
        "Attention maps and ranking lists of a trained run on one of its target sets, as PNG and one "
        "self-contained HTML page."))
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trainer.train run directory (its config.yaml)")
    p.add_argument("--weights", help="model_final.safetensors, a checkpoint folder or its state.pt "
                   "(default: RUN_DIR/model_final.safetensors, else the newest checkpoint)")
    p.add_argument("--target", help="a target set of the run (default: the first of data.targets)")
    p.add_argument("--queries", type=_positive, default=6, help="queries to show, spread over the evaluated ones")
    p.add_argument("--query", type=int, action="append", metavar="INDEX",
                   help="a query index to show (repeatable; replaces --queries)")
    p.add_argument("--topk", type=_positive, default=10, help="gallery images per ranking list (junk not counted)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/visualize/TARGET)")
    p.add_argument("--data-root", help="folder of the packed datasets (default: the run's data.root)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        from trainer.visualize.rundir import check_run

        check_run(args.run_dir, args.target, args.data_root)  # before torch is imported: these fail at once
        from trainer.visualize.report import visualize

        report = visualize(args.run_dir, weights=args.weights, target=args.target, queries=args.queries,
                           query_ids=args.query, topk=args.topk, out=args.out, data_root=args.data_root)
        for path in report.files.values():
            print(path)
        return 0

    return run_cli(PROG, body)
