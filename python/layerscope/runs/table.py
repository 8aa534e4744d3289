"""The batch's tidy table: one row per (store_a, store_b, layer_a, layer_b, measure,
estimator) with its value, the rows it used (``n``) and the sampling seed (empty when every
row was used: no sample, no seed).

* ``cka`` (store pair, or a store with itself under ``pairs="each"``): every cell of the
  layer × layer table; ``estimator`` = ``"<kernel>-<estimator>"`` (``linear-biased``, ...).
* ``align``: every cell; ``estimator`` = the method (``subspace``, ``svcca``, ...).
* ``id`` (per store; ``store_b``, ``layer_b`` empty): one row per layer and method
  (``estimator`` = ``twonn``, ``mle``, ...), ``n`` = rows used after duplicates.
* ``spectrum`` (per store): one row per layer and spectral measure (``estimator`` =
  ``effective_rank``, ``participation_ratio``, ``stable_rank``, ``pca_id_95``, ...).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from typing import Any

COLUMNS = ("store_a", "store_b", "layer_a", "layer_b", "measure", "estimator", "value", "n",
           "seed")

Row = tuple[str, str, str, str, str, str, float, "int | None", "int | None"]


def _seed(meta: dict[str, Any]) -> int | None:
    """The seed when the rows were a sample (``n < n_total``), else None."""
    n, total = meta.get("n"), meta.get("n_total", meta.get("n"))
    if n is None or total is None or int(n) >= int(total) or meta.get("seed") is None:
        return None
    return int(meta["seed"])


def _int(x: Any) -> int | None:
    return None if x is None else int(x)


def _matrix(a: str, b: str, measure: str, estimator: str, res: Any) -> list[Row]:
    n, seed = _int(res.meta.get("n")), _seed(res.meta)
    return [(a, b, r, c, measure, estimator, float(res.values[i, j]), n, seed)
            for i, r in enumerate(res.rows) for j, c in enumerate(res.cols)]


def item_rows(measure: str, a: str, b: str | None, options: dict[str, Any],
              results: dict[str, Any]) -> list[Row]:
    """The tidy rows of one finished item (``results``: the item's results as restored from
    its JSON: :class:`~layerscope.results.Result` objects)."""
    if measure == "cka":
        est = f"{options.get('kernel', 'linear')}-{options.get('estimator', 'biased')}"
        return _matrix(a, b or a, "cka", est, results["cka"])
    if measure == "align":
        return _matrix(a, b or a, "align", str(options.get("method", "subspace")),
                       results["align"])
    rows: list[Row] = []
    if measure == "id":
        for method, res in results.items():
            seed = _seed(res.meta)
            for layer in res.layers:
                used = res.details.get(layer, {}).get("rows_used", res.meta.get("n"))
                rows.append((a, "", layer, "", "id", method, res.values[layer], _int(used),
                             seed))
        return rows
    res = results["spectrum"]
    n = _int(res.meta.get("n"))
    for layer in res.layers:
        for metric, value in res.table[layer].items():
            if metric != "rank_tol":
                rows.append((a, "", layer, "", "spectrum", metric, value, n, None))
    return rows


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else ("nan" if math.isnan(x) else repr(x))
    return str(x)


def to_csv(rows: Iterable[Row]) -> str:
    """The table as CSV text (header first; floats written exactly, ``repr``; NaN as
    ``nan``; no sample → empty ``seed``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in rows:
        w.writerow([_cell(x) for x in row])
    return buf.getvalue()


def read_csv(text: str) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` as dicts (``value`` float, ``n``/``seed`` int or None)."""
    out = []
    for rec in csv.DictReader(io.StringIO(text)):
        out.append({**rec, "value": float(rec["value"]),
                    "n": int(rec["n"]) if rec["n"] else None,
                    "seed": int(rec["seed"]) if rec["seed"] else None})
    return out
