"""Shared by the tests: the f64 references written from the papers' formulas (explicit
n × n Gram matrices) and the data generators of the adversarial cases (LLM-like per-feature
mean offsets, constant columns, duplicated rows, n < d). Test modules import them with
``from conftest import ...``.

References:
* biased HSIC (Gretton et al. 2005; CKA of Kornblith et al. 2019): ``tr(KHLH)/(n−1)²``;
* unbiased HSIC (Song et al. 2012, eq. 5) on ``K̃ = K − diag K``;
* linear CKA: both on ``K = X̄X̄ᵀ`` of the f64-centred data (``ref_linear``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from layerscope import write_store


def gram_lin(x: np.ndarray, centre: bool = True) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if centre:
        x = x - x.mean(axis=0)
    return x @ x.T


def hsic_biased(k: np.ndarray, lg: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ lg @ h)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, lg: np.ndarray) -> float:
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = lg - np.diag(np.diag(lg))
    one = np.ones(n)
    t1 = np.trace(kt @ lt)
    t2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((t1 + t2 - t3) / (n * (n - 3)))


def cka_from_grams(k: np.ndarray, lg: np.ndarray, unbiased: bool) -> float:
    f = hsic_unbiased if unbiased else hsic_biased
    return f(k, lg) / np.sqrt(f(k, k) * f(lg, lg))


def ref_linear(x: np.ndarray, y: np.ndarray, estimator: str) -> float:
    return cka_from_grams(gram_lin(x), gram_lin(y), estimator == "debiased")


def noisy_linear(
    m: int, d: int, e: int, noise: float, seed: int
) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    """Layers ``x`` (``m × d`` standard normal) and ``lin = x W + noise · N`` (``W`` ``d × e``,
    ``N`` ``m × e``, both standard normal), drawn in that order from a generator seeded with
    ``seed``; the generator is returned for the layers a test adds (the neighbourhood and
    kernel tests add non-linear ones)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d))
    lin = x @ rng.standard_normal((d, e)) + noise * rng.standard_normal((m, e))
    return rng, {"x": x, "lin": lin}


def llm_like(n: int, d: int, seed: int, ratio_lo: float = 50, ratio_hi: float = 1000) -> np.ndarray:
    """Per-feature mean offsets of 50–1000× the spread (as in LLM residual streams)."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.5, 2.0, d)
    offset = rng.uniform(ratio_lo, ratio_hi, d) * spread * rng.choice([-1, 1], d)
    return offset + spread * rng.standard_normal((n, d))


def adversarial(n: int = 150) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = llm_like(n, 300, 1)  # offsets 50–1000× the spread; wider than the tiles: split
    y = 0.5 * x[:, :40] @ rng.standard_normal((40, 90)) / 6 + llm_like(n, 90, 2)
    z = rng.standard_normal((n, 140))
    z[:, 7] = 4.5  # a constant column
    z[n // 2:] = z[: n - n // 2]  # duplicated rows
    w = np.hstack([y[:, :30], rng.standard_normal((n, 10))]) * 1e-3
    return {"x": x, "y": y, "z": z, "w": w}


TILED_BUDGET = "2M"  # several tiles, the 300-wide layer in column blocks


def adversarial_pair(
        tmp_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Path, Path]:
    """Two stores over the same rows, ``(d, e, path_d, path_e)``: :func:`adversarial` and a
    second model whose layer ``u`` is a wide (260) mixture of ``y`` (small shards, so passes
    cross shard ends)."""
    d = adversarial()
    e = {"u": d["y"] @ np.random.default_rng(3).standard_normal((90, 260)), "v": d["w"]}
    pa, pb = tmp_path / "a", tmp_path / "b"
    write_store(pa, d, shard_bytes=64 << 10)
    write_store(pb, e, shard_bytes=64 << 10)
    return d, e, pa, pb
