"""One self-contained HTML page: the figures as base64 PNG data URIs, the ranking lists as tables."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

from trainer.visualize.ranking import COLORS, JUNK, QUERY_COLOR, RankingList

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 .3em 0 1em; }
img { max-width: 100%; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _legend() -> str:
    items = [("query", QUERY_COLOR), ("true match (same pid, other camera)", COLORS["true"]),
             ("false match", COLORS["false"]), ("junk: same pid and camera, not counted", COLORS[JUNK])]
    return "".join(f'<span class="swatch" style="background:{_hex(c)}"></span>{html.escape(t)}' for t, c in items)


def _table(r: RankingList) -> str:
    head = "<tr><th>rank</th><th>gallery</th><th>pid</th><th>cam</th><th>distance</th><th>verdict</th></tr>"
    body = "".join(
        f'<tr style="color:{_hex(COLORS[h.verdict])}"><td>{"junk" if h.rank is None else h.rank}</td>'
        f"<td>{h.gallery}</td><td>{h.pid}</td><td>{h.camid}</td><td>{h.distance:.4g}</td><td>{h.verdict}</td></tr>"
        for h in r.hits)
    ap = "skipped by the protocol (no true match)" if r.ap is None else f"AP {r.ap:.4f}"
    title = f"query {r.query}: pid {r.pid}, camera {r.camid}, {r.num_true} true match(es) in the gallery, {ap}"
    return f"<h3>{html.escape(title)}</h3><table>{head}{body}</table>"


def page(title: str, facts: Mapping[str, str], figures: list[tuple[str, str, bytes]],
         lists: list[RankingList]) -> str:
    """The page: ``facts`` as a table, each ``(heading, caption, png)`` figure inline, then the lists."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                   for k, v in facts.items())
    figs = "".join(f"<h2>{html.escape(h)}</h2><p>{html.escape(c)}</p>"
                   f'<img alt="{html.escape(h)}" src="{data_uri(png)}">' for h, c, png in figures)
    tables = "".join(_table(r) for r in lists)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><table>{rows}</table>"
            f"<p>{_legend()}</p>{figs}<h2>Ranking lists, as tables</h2>{tables}</body></html>\n")
