"""Writing a dataset: the plan's images rendered (in worker processes or not), the MSMT17 lists and
``synth.json``, written last and atomically: its presence means the dataset is complete."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

from shards.atomic import atomic_write_bytes
from shards.records import Record
from shards.synth.config import SUMMARY_FILE, SynthConfig, SynthSummary
from shards.synth.names import Shot, plan
from shards.synth.people import Person, random_person
from shards.synth.render import Context, render_image
from shards.synth.streams import K_DISTRACTOR, K_ID, K_JUNK, T_PERSON, domain_id, stream

_WORKER_CTX: Context | None = None


def _write_file(path: Path, data: bytes) -> None:
    """Temp file + rename: a crash never leaves a truncated image under a real name (no fsync per
    image: the dataset is complete when ``synth.json`` exists, which is written atomically last)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _person_for(ctx: Context, shot: Shot) -> Person | None:
    c = ctx.cfg
    assert c.test_ids is not None and c.distractors is not None, "Context holds a resolved config"
    if shot.kind == K_ID:
        n = {0: c.ids, 1: int(c.test_ids), 2: math.ceil(c.distractors / c.images_per_id_cam)}[shot.group]
        return ctx.group(shot.group, n)[shot.ident]
    r = stream(c.seed, ctx.dom, T_PERSON, 10 + shot.kind, shot.ident)
    if shot.kind == K_DISTRACTOR and r.random() < 0.5:
        return None  # a false detection: background only
    return random_person(r, ctx.style)


def _work(args: tuple[SynthConfig, list[Shot]]) -> int:
    global _WORKER_CTX
    cfg, shots = args
    if _WORKER_CTX is None or _WORKER_CTX.cfg != cfg:
        _WORKER_CTX = Context(cfg)
    ctx = _WORKER_CTX
    root = Path(cfg.out)
    for s in shots:
        person = _person_for(ctx, s)
        for v, rel in enumerate(s.relpaths):
            data = render_image(cfg, ctx, s.kind, s.group * 1_000_000 + s.ident if s.kind == K_ID else s.ident,
                           s.cam, s.k, s.session, person, detected=(cfg.layout == "cuhk03np" and v == 0))
            _write_file(root / rel, data)
    return sum(len(s.relpaths) for s in shots)


def synthesize(cfg: SynthConfig) -> SynthSummary:
    """Write a synthetic dataset in ``cfg.layout``'s real layout under ``cfg.out``; return what was written."""
    t0 = time.perf_counter()
    cfg = cfg.resolved()
    assert cfg.domain is not None and cfg.test_ids is not None, "resolved() fills every default"
    dom = domain_id(cfg.domain)
    root = Path(cfg.out)
    shots = plan(cfg, dom)
    n_files = sum(len(s.relpaths) for s in shots)
    if len({rel for s in shots for rel in s.relpaths}) != n_files:  # would silently overwrite images
        raise RuntimeError(f"{cfg.layout}: the plan names two images alike (a bug in shards/synth/names.py)")
    dirs = sorted({str(Path(rel).parent) for s in shots for rel in s.relpaths})
    tops = sorted({rel.split("/")[0] for s in shots for rel in s.relpaths})
    for t in tops:
        if (root / t).exists() and any((root / t).iterdir()):
            raise FileExistsError(f"{root / t}: already exists and is not empty (choose an empty --out)")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    if cfg.workers == 1:
        written = _work((cfg, shots))
    else:
        import multiprocessing as mp

        chunks = [(cfg, shots[i::cfg.workers * 8]) for i in range(cfg.workers * 8)]
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            written = sum(pool.map(_work, chunks))
    if cfg.layout == "msmt17":
        lists: dict[str, list[str]] = {
            "list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
        for s in shots:
            rel = s.relpaths[0].split("/", 1)[1]  # lists are relative to train/ or test/
            name = {"train": "list_val.txt" if s.val else "list_train.txt", "query": "list_query.txt",
                    "gallery": "list_gallery.txt"}[s.split]
            lists[name].append(f"{rel} {s.pid}")
        for name, lines in lists.items():
            atomic_write_bytes(root / name, ("\n".join(sorted(lines)) + "\n" if lines else "").encode())
    records = sorted(Record(rel, s.pid, s.cam, s.split) for s in shots for rel in s.relpaths)
    counts = {sp: sum(1 for s in shots if s.split == sp) for sp in ("train", "query", "gallery")}
    if cfg.layout == "msmt17":
        counts["val"] = sum(1 for s in shots if s.val)
    if cfg.layout == "market1501":
        counts["distractors"] = sum(1 for s in shots if s.kind == K_DISTRACTOR)
        counts["junk"] = sum(1 for s in shots if s.kind == K_JUNK)
    summary = SynthSummary(
        layout=cfg.layout, out=str(root), domain=dom, counts=counts, num_train_ids=cfg.ids,
        num_test_ids=int(cfg.test_ids), num_cams=cfg.cams, images_written=written,
        seconds=time.perf_counter() - t0, records=records,
    )
    meta = json.loads(summary.to_json())
    meta.pop("seconds")  # keep the folder byte-identical between runs (and between places)
    meta.pop("out")
    meta["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    atomic_write_bytes(root / SUMMARY_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return summary
