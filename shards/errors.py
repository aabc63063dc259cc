"""One error path for every entry point: a user's mistake is one line and exit 2, a bug a traceback.

``UserError`` is the base of every exception whose message tells a user what they did wrong (the
file, key or value involved) and what to do: :class:`trainer.config.ConfigError`,
``launch.slurm.LaunchError``, the shard readers' errors, … Entry points run their body through
:func:`run_cli`, which prints ``<prog>: error: <message>`` for a ``UserError`` and exits 2; anything
else propagates, so a bug keeps its traceback (exit 1). Torch-free: the packer imports it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

USAGE_EXIT = 2
"""Exit code of a user mistake (argparse's own, so a bad flag and a bad value look alike)."""


class UserError(ValueError):
    """A mistake the user can fix: the message is one line naming the culprit and the fix."""


def one_line(text: str, limit: int = 4000) -> str:
    """``text`` folded onto one line (whitespace runs → one space), cut at ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run an entry point's ``body``; a :class:`UserError` becomes one line on stderr and exit 2."""
    try:
        return int(body() or 0)
    except UserError as exc:
        print(f"{prog}: error: {one_line(str(exc))}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class CliParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<name>: error: …`` and exit 2, like :func:`run_cli`'s."""

    def __init__(self, name: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.name = name

    def error(self, message: str) -> NoReturn:
        print(f"{self.name}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_EXIT)
