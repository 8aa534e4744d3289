"""Calibrated similarity side by side (``python benches/bench_calibrated.py [--quick]``):

* ``cka(..., null=B)`` / ``bootstrap=B`` against the best numpy a user would write: the
  centred Grams stacked once, each permutation one fancy-indexing of every Gram and one dgemm
  of the stacks (the same algorithm, in numpy);
* ``cknna`` against the authors' formula in numpy (dense Grams, ``argpartition`` top-k,
  dense masked HSIC with two ``m × m`` products per pair);
* ``shape_metric`` (one moment pass) against netrep-style numpy on the rows (whiten each
  layer, then an SVD of ``(XZ)ᵀ(YZ)`` per pair).

Each line: seconds, the ratio, the largest difference of the results, and the peak RSS; the
machine's dgemm rate is measured in the same run (the roofline of the Gram products).
"""

from __future__ import annotations

import sys

import layerscope as ls
import numpy as np
from _common import gemm_rates, peak_mib, reset_peak, roofline_line, timed


def numpy_null(xs: list[np.ndarray], perms: np.ndarray) -> np.ndarray:
    m = xs[0].shape[0]
    h = np.eye(m) - 1.0 / m
    c = np.stack([h @ (x - x.mean(0)) @ (x - x.mean(0)).T @ h for x in xs])
    norms = np.sqrt(np.einsum("lij,lij->l", c, c))
    flat = c.reshape(len(xs), -1)
    out = []
    for p in perms:
        pc = c[:, p][:, :, p].reshape(len(xs), -1)
        out.append(flat @ pc.T / np.outer(norms, norms))
    return np.array(out)


def numpy_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def mask(g: np.ndarray) -> np.ndarray:
        g = g.copy()
        np.fill_diagonal(g, -np.inf)
        idx = np.argpartition(-g, k, axis=1)[:, :k]
        mm = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mm, idx, True, axis=1)
        return mm

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        n = a.shape[0]
        return float(((a * b.T).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2))
                      - 2 * (a @ b).sum() / (n - 2)) / (n * (n - 3)))

    kx, ky = unit(x) @ unit(x).T, unit(y) @ unit(y).T
    mx, my = mask(kx), mask(ky)
    m2 = mx & my
    return hsic(kx * m2, ky * m2) / np.sqrt(hsic(kx * mx, kx * mx) * hsic(ky * my, ky * my))


def numpy_shape(xs: list[np.ndarray], alpha: float) -> np.ndarray:
    def whiten(x: np.ndarray) -> np.ndarray:
        xc = (x - x.mean(0)) / np.sqrt(len(x) - 1)
        lam, v = np.linalg.eigh(xc.T @ xc)
        lam = np.maximum(lam, lam.max() * max(xc.shape) * np.finfo(float).eps)
        return xc @ (v * (alpha + (1 - alpha) / np.sqrt(lam))) @ v.T

    ws = [whiten(x) for x in xs]
    out = np.zeros((len(xs), len(xs)))
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            nuc = np.linalg.svd(ws[i].T @ ws[j], compute_uv=False).sum()
            cos = nuc / (np.linalg.norm(ws[i]) * np.linalg.norm(ws[j]))
            out[i, j] = out[j, i] = np.arccos(min(cos, 1.0))
    return out


def main() -> int:
    quick = "--quick" in sys.argv
    rng = np.random.default_rng(0)
    dgemm, sgemm = gemm_rates(1024 if quick else 2048)
    print(f"machine: numpy dgemm {dgemm:.1f} GFLOP/s (same run)")

    m, nl, d, b = (512, 4, 64, 19) if quick else (2048, 8, 256, 99)
    base = rng.standard_normal((m, d))
    xs = {f"l{i}": base @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal((m, d))
          for i in range(nl)}
    reset_peak()
    res = ls.cka(xs, null=b, progress=False)
    ours = res.meta["timings"]["calibration"]
    peak = peak_mib()
    from layerscope.measures._calibrate import draws

    perms = np.concatenate(list(draws("null", m, b, 0))).astype(np.int64)
    t_np = timed(lambda: numpy_null(list(xs.values()), perms))
    ref = numpy_null(list(xs.values()), perms)
    p_np = (1 + (ref >= res.meta["calibration"]["values"]).sum(0)) / (b + 1)
    macs = b * nl * nl * m * m
    print(f"cka null={b}, {nl} layers x {m} rows: layerscope {ours:.2f} s, numpy (stacked "
          f"Grams + dgemm) {t_np:.2f} s -> {t_np / ours:.1f}x; {2 * macs / ours / 1e9:.1f} "
          f"GFLOP/s of Gram inner products = {2 * macs / ours / 1e9 / dgemm:.0%} of dgemm; "
          f"p-values equal: {np.array_equal(p_np, res.meta['p_values'])}; peak {peak:.0f} MiB")
    print(roofline_line(dgemm, sgemm, {"null Gram inner products": (2 * macs / ours / 1e9,
                                                                  "f64")}))
    t_boot = timed(lambda: ls.cka(xs, bootstrap=b, progress=False))
    print(f"cka bootstrap={b}: {t_boot:.2f} s")

    m, d, k = (500, 64, 10) if quick else (2000, 384, 10)
    x = rng.standard_normal((m, d))
    y = x @ rng.standard_normal((d, d)) * 0.5 + rng.standard_normal((m, d))
    reset_peak()
    t_ours = timed(lambda: ls.cknna({"x": x, "y": y}, k=k, sample=None, progress=False))
    peak = peak_mib()
    ours_v = ls.cknna({"x": x, "y": y}, k=k, sample=None, progress=False).values[0, 1]
    t_np = timed(lambda: numpy_cknna(x, y, k))
    print(f"cknna {m} rows x {d}, k={k}: layerscope {t_ours:.2f} s, numpy (authors' formula, "
          f"dense) {t_np:.2f} s -> {t_np / t_ours:.1f}x; |diff| "
          f"{abs(ours_v - numpy_cknna(x, y, k)):.1e}; peak {peak:.0f} MiB")

    n, d, nl = (4000, 64, 4) if quick else (50000, 256, 6)
    base = rng.standard_normal((n, d))
    ys = {f"l{i}": base @ rng.standard_normal((d, d)) + rng.standard_normal((n, d))
          for i in range(nl)}
    for alpha in (1.0, 0.5):
        reset_peak()
        t_ours = timed(lambda a=alpha: ls.shape_metric(ys, alpha=a, progress=False))
        peak = peak_mib()
        v = ls.shape_metric(ys, alpha=alpha, progress=False).values
        t_np = timed(lambda a=alpha: numpy_shape(list(ys.values()), a))
        diff = np.abs(v - numpy_shape(list(ys.values()), alpha)).max()
        print(f"shape_metric alpha={alpha:g}, {nl} layers x {n} rows x {d}: layerscope "
              f"{t_ours:.2f} s, numpy (netrep-style, on the rows) {t_np:.2f} s -> "
              f"{t_np / t_ours:.1f}x; max |diff| {diff:.1e}; peak {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
