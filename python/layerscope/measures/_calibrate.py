"""Calibrated CKA: a permutation p-value, the null mean and percentile bootstrap intervals
for every layer pair (``cka(..., null=B, bootstrap=B2)``).

On a seeded sample of ``m`` rows, each layer's kernel matrix is centred once (biased:
``HKH``; debiased: U-centred, so that ``⟨C_K, C_L⟩/(m(m−3))`` is Song et al.'s unbiased
HSIC) and held; ``CKA = ⟨C_K, C_L⟩ / (‖C_K‖ ‖C_L‖)``
(``layerscope_core::measures::cka::calibrate``).

* **Permutation null** (rows of one layer permuted against the other: ``C_L[π, π]``, a
  re-indexing, no new products): ``p = (1 + #{b: CKA_πb ≥ CKA}) / (B + 1)`` (Phipson & Smyth
  2010, "Permutation p-values should never be zero"), one set of ``B`` permutations for
  every pair; ``null_mean`` = the mean CKA under permutation, what unrelated layers give at
  this ``m`` and these widths (biased CKA is far from 0 when widths approach ``m``).
* **Bootstrap** (Efron 1979): ``B2`` resamples of the ``m`` rows with replacement, the
  estimator re-run on each (RBF: the median-rule bandwidth re-derived on the resample),
  with the pairs of copies of one row (``s_i = s_j``, ``i ≠ j``) left out of the sums
  (debiased: also zero in ``K̃`` before the U-centring). A resample repeats about a third
  of its rows and each copy pair acts as a diagonal term, which pulls plain resamples of
  nearly unrelated layers above the sample's value (HSIC is then a degenerate U-statistic,
  where the plain bootstrap fails: Arcones & Giné 1992); without them the resamples centre
  on it. The ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of those CKAs
  (numpy's linear interpolation) are the percentile interval.

Draws: the permutations are rows of ``default_rng([seed, 1]).permuted(…, axis=1)`` and the
resamples ``default_rng([seed, 2]).integers(0, m, …)``, in blocks of
:data:`DRAW_BLOCK` (:func:`draws` gives them), so a result is reproduced from ``seed``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _native
from .._defaults import SAMPLE_CAP
from .._memory import check_budget, memory_budget
from .._progress import Progress
from .._sample import indices_hash, load, sample_indices
from .._source import Source
from ..errors import NonFiniteError

#: Permutations or resamples drawn (and handed to the core) at a time.
DRAW_BLOCK = 16


def draws(kind: str, m: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """The ``count`` permutations (``kind="null"``) or resamples (``"bootstrap"``) of ``m``
    rows for ``seed``, as uint32 blocks of at most :data:`DRAW_BLOCK` rows."""
    rng = np.random.default_rng([seed, 1 if kind == "null" else 2])
    for t in range(0, count, DRAW_BLOCK):
        c = min(DRAW_BLOCK, count - t)
        if kind == "null":
            yield rng.permuted(np.tile(np.arange(m, dtype=np.uint32), (c, 1)), axis=1)
        else:
            yield rng.integers(0, m, size=(c, m), dtype=np.uint32)


def calibration_rows(n: int, sample: int | None, layers: int, dmax: int, kernel: str,
                     max_memory: int | None) -> tuple[int, str]:
    """The rows of the calibration sample and why: ``sample`` when given; else all ``n`` rows
    up to 4096 (the RBF default), fewer when the Grams of ``layers`` layers would not fit the
    budget (the largest ``m`` that does)."""
    if sample is not None:
        return min(sample, n), "sample="
    m = min(n, SAMPLE_CAP)
    budget = memory_budget(max_memory).bytes
    if _native.calibration_bytes(layers, m, dmax, kernel) <= budget:
        return m, "all rows" if m == n else f"a seeded sample of {SAMPLE_CAP} rows (the cap)"
    lo, hi = 1, m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _native.calibration_bytes(layers, mid, dmax, kernel) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, f"a seeded sample of {lo} rows (the most whose Grams fit the memory budget)"


def calibrate(a: Source, b: Source | None, la: list[str], lb: list[str] | None, *,
              kernel: str, estimator: str, sigma: float, null: int, bootstrap: int,
              confidence: float, sample: int | None, seed: int, max_memory: int | None,
              nonfinite: str, progress: Any, products: Any = None) -> dict[str, Any]:
    """The calibration entries of a CKA result's ``meta`` (module docstring): ``p_values``,
    ``null_mean``, ``ci`` and ``calibration`` (rows, draws, the sample's own CKA table, the
    null's spread, the interval's level)."""
    names_b = lb if lb is not None else la
    srcs = [(a, x, 0) for x in la] + ([(b, x, 1) for x in lb] if b is not None and lb else [])
    dmax = max(src.dims[x] for src, x, _ in srcs)
    n = a.num_rows
    m, why = calibration_rows(n, sample, len(srcs), dmax, kernel, max_memory)
    idx = sample_indices(n, m, seed) if m < n else np.arange(n, dtype=np.int64)
    check_budget(_native.calibration_bytes(len(srcs), m, dmax, kernel),
                 f"the calibration of {len(srcs)} layers on {m} rows (their centred Grams)",
                 "use a smaller sample (sample=...) or fewer layers", max_memory)
    # layers with NaN/Inf among the sampled rows (nonfinite="nan") are left out: NaN cells
    bad: set[tuple[int, str]] = set()
    cal = _native.Calibrator(kernel, sigma=sigma, unbiased=estimator == "debiased",
                             within=b is None, max_memory=max_memory)
    good_a: list[str] = []
    good_b: list[str] = []
    for src, x, side in srcs:
        try:
            rows = load(src, x, idx)
        except NonFiniteError:
            if nonfinite == "error":
                raise
            bad.add((side, x))
            continue
        cal.add(rows, other=side == 1, products=products)
        del rows
        (good_a if side == 0 else good_b).append(x)
    shape = (len(la), len(names_b))
    out: dict[str, Any] = {
        "p_values": np.full(shape, np.nan), "null_mean": np.full(shape, np.nan),
        "ci": np.full((2, *shape), np.nan),
    }
    info: dict[str, Any] = {
        "n": m, "rows": why, "sample_hash": indices_hash(idx), "seed": seed, "null": null,
        "bootstrap": bootstrap, "confidence": confidence,
        "values": np.full(shape, np.nan), "null_sd": np.full(shape, np.nan),
        "draws": "permutations: default_rng([seed, 1]).permuted; resamples: "
                 f"default_rng([seed, 2]).integers; in blocks of {DRAW_BLOCK}",
        "method": "centred Grams of the sample (biased: HKH; debiased: U-centred), "
                  "p = (1 + #{null >= observed}) / (B + 1), percentile bootstrap",
    }
    if bad:
        info["left_out"] = sorted(x if s == 0 else f"other:{x}" for s, x in bad)
    gb = good_b if b is not None else good_a
    if not good_a or not gb:
        out["calibration"] = info
        return out
    ri = [la.index(x) for x in good_a]
    ci = [names_b.index(x) for x in gb]
    cell = np.ix_(ri, ci)
    obs = cal.observed()
    info["values"][cell] = obs
    info["permuted_grams_held"] = cal.chunk
    with Progress(progress, "cka calibration", unit="draw") as prog:
        done, total = 0, null + bootstrap

        def step(c: int) -> None:
            nonlocal done
            done += c
            if prog.cb is not None:
                prog.cb(done, total)

        if null:
            ge = np.zeros(obs.shape, dtype=np.int64)
            s1 = np.zeros(obs.shape)
            s2 = np.zeros(obs.shape)
            for block in draws("null", m, null, seed):
                v = cal.null(block)
                ge += (v >= obs).sum(axis=0)
                s1 += v.sum(axis=0)
                s2 += (v * v).sum(axis=0)
                step(len(block))
            p = (1.0 + ge) / (null + 1.0)
            p[np.isnan(obs)] = np.nan
            mean = s1 / null
            out["p_values"][cell] = p
            out["null_mean"][cell] = mean
            with np.errstate(invalid="ignore"):
                sd = np.sqrt(np.maximum(s2 / null - mean * mean, 0.0) * null / max(null - 1, 1))
            info["null_sd"][cell] = sd
        if bootstrap:
            vals = np.empty((bootstrap, *obs.shape))
            t = 0
            for block in draws("bootstrap", m, bootstrap, seed):
                v, _ = cal.bootstrap(block)
                vals[t:t + len(block)] = v
                t += len(block)
                step(len(block))
            undefined = int(np.isnan(vals[:, np.isfinite(obs)]).any(axis=1).sum())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
                q = np.nanquantile(vals, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
            out["ci"][(slice(None), *cell)] = q
            if undefined > 0:
                info["bootstrap_undefined"] = (
                    f"{undefined} of {bootstrap} resamples left a layer without a defined CKA "
                    "(a resampled layer constant, or an RBF bandwidth of 0); the intervals use "
                    "the others")
    out["calibration"] = info
    return out
