"""The benchmarks' command lines on the project's error path: a bad argument is one line, exit 2.

``Parser`` is argparse whose errors raise :class:`shards.errors.UserError` instead of printing the
usage block, so a bench's ``main`` run through :func:`shards.errors.run_cli` prints
``bench/NAME.py: error: <what> (see --help)`` and exits 2; ``--help`` works as usual. The value
types below refuse what the benches cannot run with (a size of 0, a list that does not parse).
"""

from __future__ import annotations

import argparse

from shards.errors import UserError, run_cli

__all__ = ["Parser", "int_list", "positive_int", "non_negative_int", "run_cli"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one-line :class:`UserError` s."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see python {self.prog} --help)")


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. ``10000,20000`` (argparse type)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 1, e.g. 1000,2000")
    return [positive_int(p) for p in parts]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
