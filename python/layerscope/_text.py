"""Plain-text output of the command line, with no optional dependency: the one table type
behind ``to_pandas()`` and the printed tables, and the escaping of names read from stores
(a crafted layer name must not move the cursor or recolour the terminal)."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from typing import Any, NamedTuple


def escape(text: Any, keep_newlines: bool = False) -> str:
    """``text`` with control and format characters (categories Cc and Cf: ESC, CSI, NUL,
    bidi overrides, ...) written as Python escapes (``\\x1b``, ``\\u202e``); newlines kept
    when ``keep_newlines`` (multi-line error messages)."""
    out = []
    for ch in str(text):
        if (ch == "\n" and keep_newlines) or unicodedata.category(ch) not in ("Cc", "Cf"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _cell(x: Any, digits: int) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int) or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") in "iu"):
        return str(int(x))
    if isinstance(x, float) or hasattr(x, "dtype"):
        v = float(x)
        if math.isnan(v):
            return "nan"
        if v == 0 or 10.0 ** -digits <= abs(v) < 1e6:
            return f"{v:.{digits}f}"
        return f"{v:.{digits}g}"
    return escape(x)


def _empty(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


class Table(NamedTuple):
    """Rows labelled by ``index`` under ``columns``; ``rows[i][j]`` is a number, a string or
    None (missing). :meth:`to_pandas` and :meth:`to_text` show the same table."""

    index: list[str]
    columns: list[str]
    rows: list[list[Any]]
    index_name: str = ""

    def to_pandas(self) -> Any:
        from ._optional import require

        pd = require("pandas", "a table as a pandas DataFrame")
        return pd.DataFrame(self.rows, index=pd.Index(self.index, name=self.index_name or None),
                            columns=self.columns)

    def without_empty_columns(self) -> Table:
        """The table less the columns with no value in any row (e.g. CI bounds without a
        bootstrap)."""
        keep = [j for j in range(len(self.columns))
                if not all(_empty(r[j]) for r in self.rows)]
        return self._replace(columns=[self.columns[j] for j in keep],
                             rows=[[r[j] for j in keep] for r in self.rows])

    def to_text(self, digits: int = 4) -> str:
        """Right-aligned columns, the index left-aligned; numbers with ``digits`` decimals
        (or significant digits outside [10⁻ᵈⁱᵍⁱᵗˢ, 10⁶)), integers as integers, names
        escaped."""
        head = [escape(self.index_name), *(escape(c) for c in self.columns)]
        body = [[escape(i), *(_cell(x, digits) for x in r)]
                for i, r in zip(self.index, self.rows)]
        widths = [max(len(line[j]) for line in [head, *body]) for j in range(len(head))]
        lines = []
        for line in [head, *body]:
            cells = [line[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def matrix_table(values: Any, rows: Sequence[str], cols: Sequence[str]) -> Table:
    """A layer × layer table."""
    return Table(list(rows), list(cols), [[float(v) for v in r] for r in values])
