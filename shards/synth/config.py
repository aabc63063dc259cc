"""What to synthesize (:class:`SynthConfig`, every field checked) and what was written (:class:`SynthSummary`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from shards.records import Record
from shards.synth.streams import domain_id

LAYOUTS = ("market1501", "dukemtmc", "msmt17", "cuhk03np")
MAX_CAMS = {"market1501": 9, "dukemtmc": 8, "msmt17": 15, "cuhk03np": 2}
"""Camera limits of each naming convention (Market/Duke names hold one camera digit)."""
MSMT_SLOTS = tuple(
    f"{day}{part}" for day in ("0113", "0114", "0302", "0303") for part in ("morning", "noon", "afternoon")
)
"""MSMT17's time slots (the 4th name field); the slot of an image is its lighting session."""
SUMMARY_FILE = "synth.json"


@dataclass
class SynthConfig:
    """What to synthesize. ``None`` fields take the layout's own default (see ``resolved``)."""

    layout: str
    """One of ``market1501``, ``dukemtmc``, ``msmt17``, ``cuhk03np``."""
    out: str
    """Output root; created if missing, must not already hold the layout's folders with files."""
    ids: int = 50
    """Number of training identities."""
    cams: int = 6
    """Number of cameras (1-based in file names): market1501 <= 9 (the real set has 6; parse 7..9 with
    the ``synthetic`` layout), dukemtmc <= 8, msmt17 <= 15, cuhk03np exactly 2."""
    seed: int = 0
    """Seed of everything that is not domain style: identities, cameras, images."""
    domain: str | int | None = None
    """Style domain, a name or a non-negative int; None = the layout name."""
    images_per_id_cam: int = 4
    """Images of an identity in each camera it visits."""
    size: tuple[int, int] = (128, 64)
    """Image height and width in pixels."""
    test_ids: int | None = None
    """Number of test (query/gallery) identities, disjoint from the training ones; None = ``ids``."""
    min_cams_per_id: int = 2
    """Each identity visits a random subset of between this many and all cameras (at least 2 when
    ``cams`` >= 2 so that every query has a cross-camera match)."""
    distractors: int | None = None
    """Gallery distractor images (Market: pid 0000; Duke: gallery-only identities seen by one camera);
    None = the layout default (Market 10 %, Duke 5 % of the test images, others 0)."""
    junk: int | None = None
    """Gallery junk images (Market only: pid -1, partial bodies); None = 5 % of the test images."""
    val_fraction: float = 0.07
    """msmt17: fraction of training images listed in ``list_val.txt`` instead of ``list_train.txt``."""
    workers: int = 1
    """Worker processes; the output is identical for any number."""

    def resolved(self) -> SynthConfig:
        """A copy with defaults filled in and every field checked (one-line errors naming the field)."""
        c = SynthConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if c.layout not in LAYOUTS:
            raise ValueError(f"layout={c.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if c.domain is None:
            c.domain = c.layout
        domain_id(c.domain)  # a bad domain is an error here, not in a worker
        if c.test_ids is None:
            c.test_ids = c.ids
        h, w = (int(v) for v in c.size)
        c.size = (h, w)
        checks = [
            (c.ids >= 1, f"ids={c.ids}: expected >= 1"),
            (c.test_ids >= 1, f"test_ids={c.test_ids}: expected >= 1"),
            (1 <= c.cams <= MAX_CAMS[c.layout],
             f"cams={c.cams}: {c.layout} names hold cameras 1..{MAX_CAMS[c.layout]}"),
            (c.layout != "cuhk03np" or c.cams == 2, f"cams={c.cams}: cuhk03np has exactly 2 cameras"),
            (c.images_per_id_cam >= 1, f"images_per_id_cam={c.images_per_id_cam}: expected >= 1"),
            (c.cams >= 2 or c.images_per_id_cam >= 2,
             "cams=1 needs images_per_id_cam >= 2 to have a gallery match per query"),
            (h >= 32 and w >= 16, f"size={h}x{w}: expected at least 32x16"),
            (c.seed >= 0, f"seed={c.seed}: expected >= 0"),
            (0.0 <= c.val_fraction < 1.0, f"val_fraction={c.val_fraction}: expected in [0, 1)"),
            (c.workers >= 1, f"workers={c.workers}: expected >= 1"),
            (1 <= c.min_cams_per_id, f"min_cams_per_id={c.min_cams_per_id}: expected >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        n_test_images = c.test_ids * c.images_per_id_cam * c.cams
        default_distr = {"market1501": 0.10, "dukemtmc": 0.05}.get(c.layout, 0.0)
        default_junk = 0.05 if c.layout == "market1501" else 0.0
        if c.distractors is None:
            c.distractors = int(round(default_distr * n_test_images))
        if c.junk is None:
            c.junk = int(round(default_junk * n_test_images))
        if c.distractors < 0 or c.junk < 0:
            raise ValueError(f"distractors={c.distractors}, junk={c.junk}: expected >= 0")
        if c.distractors and c.layout not in ("market1501", "dukemtmc"):
            raise ValueError(f"distractors={c.distractors}: the {c.layout} layout has no distractors")
        if c.junk and c.layout != "market1501":
            raise ValueError(f"junk={c.junk}: only the market1501 layout has junk images (pid -1)")
        # Names hold 4-digit pids; MSMT17 numbers train and test from 0, the others share 1..9999
        # (Duke's gallery-only distractor identities included).
        if c.layout == "msmt17":
            n_pids = max(c.ids, c.test_ids) - 1
        else:
            extra = math.ceil(c.distractors / c.images_per_id_cam) if c.layout == "dukemtmc" else 0
            n_pids = c.ids + c.test_ids + extra
        if n_pids > 9999:
            raise ValueError(f"ids={c.ids}, test_ids={c.test_ids}: {c.layout} names hold 4-digit pids (<= 9999)")
        # Frame / index fields have fixed widths (see ``names.plan``).
        per_id = c.images_per_id_cam * c.cams
        limit = {"market1501": 24_999, "dukemtmc": 166_000, "msmt17": 999}.get(c.layout)
        if limit is not None and per_id > limit:
            raise ValueError(
                f"images_per_id_cam*cams={per_id}: {c.layout} names hold at most {limit} images per identity")
        if c.layout == "market1501" and max(c.junk, c.distractors) > 24_999:
            raise ValueError(f"junk={c.junk}, distractors={c.distractors}: Market names hold at most 24999 of each")
        return c


@dataclass
class SynthSummary:
    """What ``synthesize`` wrote."""

    layout: str
    out: str
    domain: int
    """Numeric domain id the style was drawn from (see ``domain_id``)."""
    counts: dict[str, int]
    """Images per split (``train``/``query``/``gallery``; msmt17 adds ``val`` (a subset of train),
    Market adds ``distractors``/``junk`` (inside gallery); cuhk03np counts one variant)."""
    num_train_ids: int
    num_test_ids: int
    """Query/gallery identities (Duke's gallery-only distractor identities not included)."""
    num_cams: int
    images_written: int
    """Files written (cuhk03np: both variants)."""
    seconds: float
    records: list[Record] = field(repr=False)
    """Every image written: relpath relative to ``out``, pid as the dataset states it (Market junk
    -1, distractors 0; msmt17 list pids), 0-based camid, split (msmt17 val images are ``train``)."""

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("records")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"
