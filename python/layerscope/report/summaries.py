"""The plain-words lines of the report, computed from the numbers alone (no figures, no I/O):
which adjacent layers are near-duplicates, the most and least similar pairs, how far two
estimators disagree, the best cross-model match of each layer, the shape of the ID profile."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ADJ_THRESHOLD = 0.95  # "redundant neighbour" threshold used in the summary lines


def fmt(x: Any, nd: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(v):
        return "nan"
    return f"{v:.{nd}f}"


def finite_mean(x: Any) -> float:
    """Mean of the finite entries (NaN when there are none, without a warning)."""
    v = np.asarray(x, dtype=float).ravel()
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _span(names: Sequence[str], i: int, j: int) -> str:
    return names[i] if i == j else f"{names[i]}–{names[j]}"


def adjacent_summary(adj: np.ndarray, names: Sequence[str], label: str,
                     threshold: float = ADJ_THRESHOLD) -> list[str]:
    """Plain-words lines about the adjacent-layer CKA curve ``adj[i] = CKA(layer i, i+1)``."""
    adj = np.asarray(adj, dtype=float)
    if adj.size == 0 or not np.isfinite(adj).any():
        return []
    lines = []
    runs = []
    i = 0
    while i < adj.size:
        if np.isfinite(adj[i]) and adj[i] > threshold:
            j = i
            while j + 1 < adj.size and np.isfinite(adj[j + 1]) and adj[j + 1] > threshold:
                j += 1
            runs.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    if runs:
        spans = ", ".join(f"layers {_span(names, a, b)}" for a, b in runs)
        lines.append(f"{label}: {spans} are > {threshold:.2f} similar to their neighbours "
                     "(candidates to prune, skip or merge).")
    hi, lo = int(np.nanargmax(adj)), int(np.nanargmin(adj))
    if not runs:
        lines.append(f"{label}: no two adjacent layers exceed {threshold:.2f}; the closest "
                     f"neighbours are layers {names[hi]} and {names[hi + 1]} ({fmt(adj[hi])}).")
    if fmt(adj[lo]) == fmt(adj[hi]):
        # a flat curve has no "largest change": saying so beside the most similar pair (the
        # same number) reads as a contradiction
        if adj.size > 1:
            lines.append(f"{label}: adjacent-layer CKA is flat ({fmt(adj[lo])} between every "
                         "pair of neighbours): no step stands out.")
    elif adj[lo] > threshold:
        lines.append(f"{label}: the least similar neighbours, layers {names[lo]} and "
                     f"{names[lo + 1]} (CKA {fmt(adj[lo])}), are still above {threshold:.2f}.")
    else:
        lines.append(f"{label}: the largest change is between layers {names[lo]} and "
                     f"{names[lo + 1]} (CKA {fmt(adj[lo])}).")
    return lines


def pair_summary(values: np.ndarray, names: Sequence[str], label: str) -> list[str]:
    """The most and least similar pair of distinct layers of a symmetric table."""
    v = np.asarray(values, dtype=float)
    L = v.shape[0]
    if L < 2:
        return []
    iu = np.triu_indices(L, 1)
    off = v[iu]
    if not np.isfinite(off).any():
        return []
    a, b = int(np.nanargmax(off)), int(np.nanargmin(off))
    return [f"{label}: the most similar pair of distinct layers is {names[iu[0][a]]} and "
            f"{names[iu[1][a]]} ({fmt(off[a])}); the least similar is {names[iu[0][b]]} and "
            f"{names[iu[1][b]]} ({fmt(off[b])})."]


def agreement_summary(ref: np.ndarray, other: np.ndarray, names: Sequence[str], label: str,
                      other_label: str, ref_label: str) -> list[str]:
    """How far a second estimator's table is from the reference one (max |difference| over
    distinct layer pairs, and where)."""
    a, b = np.asarray(ref, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.shape[0] < 2:
        return []
    iu = np.triu_indices(a.shape[0], 1)
    d = np.abs(b[iu] - a[iu])
    if not np.isfinite(d).any():
        return []
    k = int(np.nanargmax(d))
    i, j = int(iu[0][k]), int(iu[1][k])
    top = f"{d[k]:.1e}" if d[k] < 5e-4 else fmt(d[k])
    return [f"{label}: {other_label} and {ref_label} differ by at most {top} over all pairs of "
            f"layers (largest at {names[i]} / {names[j]}: {fmt(b[i, j])} vs "
            f"{fmt(a[i, j])})."]


def best_match(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the column of the largest value and that value (NaN rows give -1)."""
    v = np.asarray(values, dtype=float)
    idx = np.full(v.shape[0], -1, dtype=np.int64)
    best = np.full(v.shape[0], np.nan)
    for i in range(v.shape[0]):
        if np.isfinite(v[i]).any():
            idx[i] = int(np.nanargmax(v[i]))
            best[i] = v[i, idx[i]]
    return idx, best


def relative_depth(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)


def cross_summary(values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                  label_a: str, label_b: str) -> list[str]:
    idx, best = best_match(values)
    if (idx < 0).all():
        return []
    ra, rb = relative_depth(len(rows)), relative_depth(len(cols))
    ok = idx >= 0
    same_depth = int(np.sum(np.abs(ra[ok] - rb[idx[ok]]) <= 0.15 + 1e-12))
    pairs = ", ".join(f"{rows[i]}→{cols[idx[i]]}" for i in range(len(rows)) if idx[i] >= 0)
    k = int(np.nanargmax(best))
    w = int(np.nanargmin(best))
    return [
        f"Best match in {label_b} for each layer of {label_a}: {pairs}.",
        f"{same_depth} of {int(ok.sum())} layers of {label_a} best match a layer of {label_b} "
        "at about the same relative depth (within 15 %).",
        f"Best-match CKA ranges from {fmt(best[w])} ({rows[w]}) to {fmt(best[k])} ({rows[k]}); "
        f"mean {fmt(finite_mean(best))}.",
    ]


def id_summary(values: Sequence[float], names: Sequence[str], label: str) -> list[str]:
    v = np.asarray(values, dtype=float)
    if v.size == 0 or not np.isfinite(v).any():
        return []
    d = np.diff(v)
    k = int(np.nanargmax(v))
    rng = f"from {fmt(v[0], 1)} ({names[0]}) to {fmt(v[-1], 1)} ({names[-1]})"
    if v.size < 3:
        shape = f"ID goes {rng}"
    elif np.all(d < 0):
        shape = f"ID decreases monotonically with depth, {rng}"
    elif np.all(d > 0):
        shape = f"ID increases monotonically with depth, {rng}"
    elif 0 < k < v.size - 1:
        shape = (f"ID peaks at {names[k]} ({fmt(v[k], 1)}) and is lower at both ends "
                 f"({fmt(v[0], 1)} first, {fmt(v[-1], 1)} last): a hunchback profile")
    else:
        shape = (f"ID is not monotonic: maximum {fmt(v[k], 1)} at {names[k]}, "
                 f"minimum {fmt(np.nanmin(v), 1)} at {names[int(np.nanargmin(v))]}")
    return [f"{label}: {shape}."]


def duplicate_summary(details: dict[str, Any], layers: Sequence[str], label: str) -> list[str]:
    """Which layers had duplicated sampled rows (dropped before the neighbour estimators)."""
    dup = [(name, int(details[name].get("duplicates") or 0),
            int(details[name].get("rows_used") or 0) + int(details[name].get("duplicates") or 0))
           for name in layers if isinstance(details.get(name), dict)]
    dup = [d for d in dup if d[1] > 0]
    if not dup:
        return []
    return [f"{label}: duplicated rows in the sample were dropped before estimating ID — "
            + "; ".join(f"{name}: {k} of {n}" for name, k, n in dup)
            + " (identical inputs give identical rows, e.g. the same token at the same position of "
            "an embedding layer)."]


def id_disagreement(twonn: Any, mle: Any, label: str, factor: float = 2.0) -> list[str]:
    """Layers where TwoNN and MLE differ by more than ``factor`` (either way)."""
    if twonn is None or mle is None:
        return []
    far = []
    for name in getattr(twonn, "layers", []):
        a, b = twonn.values.get(name, np.nan), mle.values.get(name, np.nan)
        if np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0 and max(a / b, b / a) > factor:
            far.append(f"{name} ({fmt(a, 1)} vs {fmt(b, 1)})")
    if not far:
        return [f"{label}: TwoNN and MLE agree within a factor {factor:g} at every layer."]
    return [f"{label}: TwoNN and MLE differ by more than {factor:g}× at " + ", ".join(far)
            + ". TwoNN looks only at the two nearest neighbours, so near-duplicate rows pull it "
            "towards 1 and isolated points push it up; MLE averages over k = 20 neighbours."]


def spectrum_summary(table: dict[str, dict[str, float]], evr: dict[str, np.ndarray],
                     layers: Sequence[str], names: Sequence[str], label: str) -> list[str]:
    lines = []
    er = [table.get(name, {}).get("effective_rank", np.nan) for name in layers]
    er = np.asarray(er, dtype=float)
    if np.isfinite(er).any():
        lo, hi = int(np.nanargmin(er)), int(np.nanargmax(er))
        lines.append(f"{label}: effective rank ranges from {fmt(er[lo], 1)} ({names[lo]}) to "
                     f"{fmt(er[hi], 1)} ({names[hi]}).")
    top1 = np.array([float(np.asarray(evr[name])[0]) if name in evr and np.asarray(evr[name]).size
                     else np.nan for name in layers])
    if np.isfinite(top1).any():
        k = int(np.nanargmax(top1))
        lines.append(f"{label}: the top principal component explains up to "
                     f"{100 * top1[k]:.1f} % of the variance ({names[k]}); "
                     f"median over layers {100 * np.nanmedian(top1):.1f} %.")
    pid = [table.get(name, {}).get("pca_id_90", np.nan) for name in layers]
    pid = np.asarray(pid, dtype=float)
    if np.isfinite(pid).any():
        lines.append(f"{label}: components for 90 % of the variance: "
                     + "; ".join(f"{n}: {int(p)}" for n, p in zip(names, pid) if np.isfinite(p))
                     + ".")
    return lines


def overlap_summary(values: np.ndarray, names: Sequence[str], label: str, k: int) -> list[str]:
    v = np.asarray(values, dtype=float)
    L = v.shape[0]
    if L < 3:
        return pair_summary(v, names, label)
    adj = np.array([v[i, i + 1] for i in range(L - 1)])
    far = v[np.triu_indices(L, 2)]
    if not (np.isfinite(adj).any() and np.isfinite(far).any()):
        return pair_summary(v, names, label)
    return [f"{label}: top-{k} subspaces of adjacent layers overlap {fmt(finite_mean(adj))} "
            f"on average (mean cos²), layers two or more apart {fmt(finite_mean(far))}."]
