"""Layer selection, the same everywhere (every measure, the capture, the CLI): a layer name,
a dotted-path glob or a list of them. ``*`` matches within one path segment, ``**`` across
segments, ``?`` one character of a segment, ``[...]`` a character class: ``"encoder.layer.*"``
selects the six blocks of MiniLM, not their children. A name or pattern that matches nothing
is an error naming the closest names."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a dotted-path glob (see the module docstring)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def closest(pattern: str, names: Sequence[str], n: int = 6) -> list[str]:
    """Up to ``n`` names most like ``pattern`` (and like it without its wildcards)."""
    plain = pattern.replace("**", "").replace("*", "").replace("?", "")
    out = difflib.get_close_matches(pattern, names, n=n, cutoff=0.3)
    out += [c for c in difflib.get_close_matches(plain, names, n=n, cutoff=0.3) if c not in out]
    return out[:n]


def match_layers(patterns: Sequence[str], names: Sequence[str], *, error: type[Exception],
                 where: str) -> list[str]:
    """The names selected by ``patterns``, in the order of the patterns (an exact name is
    itself; a glob's matches come in the order of ``names``), each once. A pattern that
    matches nothing raises ``error`` naming ``where`` and the closest names."""
    out: dict[str, None] = {}
    for pat in patterns:
        if pat in names:
            out[pat] = None
            continue
        rx = glob_regex(pat)
        hit = [x for x in names if rx.match(x)]
        if not hit:
            hint = ", ".join(repr(c) for c in closest(pat, names)) or "(none similar)"
            raise error(f"layer {pat!r} matches no layer of {where} ({len(names)} layers); "
                        f"closest names: {hint}")
        out.update(dict.fromkeys(hit))
    return list(out)


def add_layer_args(parser: Any, other: bool = True) -> None:
    """The ``--layers`` (and ``--other-layers``) options of every command, with these rules."""
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="layer names or dotted globs, e.g. 'encoder.layer.*' (default: all)")
    if other:
        parser.add_argument("--other-layers", nargs="+", default=None, metavar="LAYER",
                            help="the same, for the second store")
