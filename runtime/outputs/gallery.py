"""`<out>/index.html`: the run's overlays on one page, highest image score first.

Reviewing a batch of parts is looking, not reading: the page shows each part's overlay (heat map
and fused boxes) with its score, OK/NG label and best region, the most anomalous first, and lists
the inputs that failed. It is static HTML beside the overlays (relative links), so it opens from
any file browser or can be copied off the line PC with the folder.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

from .summary import ranked

GALLERY_NAME = "index.html"
THUMB_WIDTH = 320  # CSS pixels; the link opens the full-size overlay
MAX_CARDS = 500  # a page a browser still opens quickly: a long watch shows its highest-scoring parts

_STYLE = """body{font-family:sans-serif;margin:1em;background:#f4f4f4}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;padding:6px;border:3px solid #ccc;width:%dpx;font-size:13px;overflow-wrap:anywhere}
.card.NG{border-color:#d22}.card.OK{border-color:#2a2}
.card img{width:100%%;display:block}.score{font-weight:bold}""" % THUMB_WIDTH


def write_gallery(out_dir: Path, rows: Sequence[Mapping[str, str]], title: str,
                  counts: Mapping[str, int] | None = None) -> Path:
    """Writes index.html from summary rows (runtime.outputs.summary.COLUMNS), at most MAX_CARDS of them,
    highest score first; counts: the run's totals where `rows` holds only some (a long watch).
    Returns its path."""
    done, failed = ranked(rows)
    total_done = (counts or {}).get("ok", len(done))
    total_failed = (counts or {}).get("failed", len(failed))
    done, failed = done[:MAX_CARDS], failed[-MAX_CARDS:]
    cards = []
    for row in done:
        overlay = quote(f"{row['outputs']}_overlay.png")
        label = row["label"]
        best = f"{row['top_prompt']} ({row['top_score']})" if row["top_prompt"] else "no fused region"
        cards.append(
            f'<div class="card {html.escape(label)}"><a href="{overlay}"><img loading="lazy" src="{overlay}" '
            f'alt="{html.escape(row["outputs"])}"></a><div class="score">{html.escape(row["image_score"])}'
            f'{" " + html.escape(label) if label else ""}</div><div>{html.escape(row["image"])}</div>'
            f"<div>{html.escape(best)}</div></div>")
    failures = "".join(f"<li>{html.escape(_failure_line(r['image'], r['error']))}</li>" for r in failed)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{total_done} parts{f', the {len(done)} highest shown' if len(done) < total_done else ''}, "
            "highest image score first; click an overlay for full size. "
            f"Table: <a href=\"summary.csv\">summary.csv</a>.</p><div class=\"grid\">{''.join(cards)}</div>"
            + (f"<h2>{total_failed} failed</h2><ul>{failures}</ul>" if failed else "") + "</body></html>\n")
    path = Path(out_dir) / GALLERY_NAME
    path.write_text(page, encoding="utf-8", errors="replace")
    return path


def _failure_line(image: str, error: str) -> str:
    """"image: error", without the name twice where the error already starts with it."""
    return error if error.startswith(f"{image}:") else f"{image}: {error}"
