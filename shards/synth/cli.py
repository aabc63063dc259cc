"""``python -m shards.synth --layout L --out DIR [options]``: one dataset, every argument checked
before anything is written; a user's mistake is one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from shards.errors import CliParser, UserError, run_cli
from shards.synth.config import LAYOUTS, SynthConfig
from shards.synth.write import synthesize

DESCRIPTION = "Synthetic person re-identification datasets, written in the *real* on-disk layouts."


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        return h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 128x64") from None


_FIELD = re.compile(r"\b(" + "|".join(f.name for f in fields(SynthConfig)) + r")(?=[=*]| >=)")
"""A config field named in a :meth:`SynthConfig.resolved` message (``ids=0: …``)."""
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
"""Write failures under ``--out`` that the user fixes (space, quota, permissions, a file in the way)."""


def _as_flags(message: str) -> str:
    """A config message in the CLI's terms: ``images_per_id_cam=0`` → ``--images-per-id-cam=0``."""
    return _FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def _run(cfg: SynthConfig) -> int:
    try:
        cfg.resolved()  # every argument checked before anything is written
    except ValueError as exc:
        raise UserError(_as_flags(str(exc))) from None
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose an empty or new folder")
    try:
        s = synthesize(cfg)
    except FileExistsError as exc:
        if exc.filename is not None:  # a file in the way of a folder to create
            raise UserError(f"{exc.filename}: exists and is not a folder; choose an empty or new --out") from None
        raise UserError(str(exc)) from None  # synthesize's own refusal: names the folder and the fix
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        raise UserError(f"{exc.filename or out}: {exc.strerror}; choose a writable --out with room") from None
    rate = s.images_written / max(s.seconds, 1e-9)
    print(f"{s.layout}: wrote {s.images_written} images to {s.out} in {s.seconds:.1f} s ({rate:.0f} img/s); "
          f"counts {s.counts}; domain {s.domain}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser("synth", prog="python -m shards.synth", description=DESCRIPTION)
    p.add_argument("--layout", required=True, choices=LAYOUTS)
    p.add_argument("--out", required=True)
    p.add_argument("--ids", type=int, default=50, help="training identities")
    p.add_argument("--cams", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default=None, help="style domain: a name or an int (default: the layout name)")
    p.add_argument("--images-per-id-cam", type=int, default=4)
    p.add_argument("--size", type=_parse_size, default=(128, 64), help="HxW (default 128x64)")
    p.add_argument("--test-ids", type=int, default=None, help="test identities (default: --ids)")
    p.add_argument("--min-cams-per-id", type=int, default=2)
    p.add_argument("--distractors", type=int, default=None, help="gallery distractor images (layout default)")
    p.add_argument("--junk", type=int, default=None, help="gallery junk images, market1501 only (layout default)")
    p.add_argument("--val-fraction", type=float, default=0.07, help="msmt17: share of train images in list_val")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    cfg = SynthConfig(layout=a.layout, out=a.out, ids=a.ids, cams=a.cams, seed=a.seed, domain=a.domain,
                      images_per_id_cam=a.images_per_id_cam, size=a.size, test_ids=a.test_ids,
                      min_cams_per_id=a.min_cams_per_id, distractors=a.distractors, junk=a.junk,
                      val_fraction=a.val_fraction, workers=a.workers)
    return run_cli("synth", lambda: _run(cfg))

