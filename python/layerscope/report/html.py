"""HTML helpers of the report: one self-contained page (inline CSS, PNG figures embedded as
``data:image/png;base64``), no JavaScript and no network access needed to read it."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --accent:#3b5bdb; --bg:#ffffff; --card:#f6f7fb; --line:#dde1ea; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 14px 0 8px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
section { margin-top: 34px; padding-top: 8px; border-top: 1px solid var(--line); }
h2 { font-size: 20px; margin: 10px 0 8px; }
ul.summary { background: var(--card); border-left: 4px solid var(--accent); margin: 8px 0 16px;
             padding: 10px 16px 10px 34px; border-radius: 4px; }
ul.summary li { margin: 3px 0; }
p.note { background:#fff6e5; border-left:4px solid #f59f00; padding:8px 12px; border-radius:4px; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line);
             border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; max-width: 980px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0 18px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: right; }
th { background: var(--card); }
td.l, th.l { text-align: left; }
code { background: var(--card); padding: 1px 4px; border-radius: 3px; font-size: 13px; }
details { margin: 6px 0 10px; }
details summary { cursor: pointer; color: var(--accent); font-size: 14px; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
"""


def esc(text: Any) -> str:
    """HTML-escape any value's ``str``."""
    return html.escape(str(text), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as base64 (no external file)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def figure(png: bytes, caption: str, alt: str) -> str:
    return f"<figure>{img_tag(png, alt)}<figcaption>{esc(caption)}</figcaption></figure>"


def summary_list(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    return '<ul class="summary">' + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left_cols: int = 1) -> str:
    """A plain table; the first ``left_cols`` columns are left-aligned (names)."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left_cols else ""
        return f"<{tag}{cls}>{esc(v)}</{tag}>"

    head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table>{head}{body}</table>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], footer: str) -> str:
    """The whole document. ``sections``: (anchor id, heading, inner HTML)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(
        f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{inner}</section>' for a, h, inner in sections
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav>{body}<footer>{esc(footer)}</footer></main></body></html>\n"
    )
