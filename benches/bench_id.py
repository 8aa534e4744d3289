"""Intrinsic dimension benchmark: layerscope vs scikit-dimension (and dadapy if installed).

    python benches/bench_id.py --quick      # n=3000 × d=256, 3 layers (< 60 s)
    python benches/bench_id.py              # n=20000 × d=768, 13 layers (the issue's setting)

Reports: the distance-GEMM floor (numpy sgemm of the n×d sample against itself, 2n²d flops,
measured in the same run), wall times of TwoNN and MLE(k=20) for layerscope and the anchors,
the estimates (which must agree to 1e-6 relative), and L layers in one call vs L anchor calls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import layerscope


def make_layer(n: int, d: int, intrinsic: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, intrinsic))
    h = np.tanh(z @ rng.standard_normal((intrinsic, 64)))
    x = h @ rng.standard_normal((64, d)) + 0.01 * rng.standard_normal((n, d))
    return (x + 5.0 * rng.standard_normal(d)).astype(np.float32)


def timed(f, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    t = time.perf_counter()
    out = f(*a, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, d, nl = (3000, 256, 3) if args.quick else (20000, 768, 13)
    layers = {f"l{i}": make_layer(n, d, 4 + 2 * i % 12, i) for i in range(nl)}
    x = layers["l0"]
    x64 = x.astype(np.float64)

    _, t_s = timed(lambda: x @ x.T)
    _, t_d = timed(lambda: x64 @ x64.T)
    flops = 2.0 * n * n * d
    print(f"n={n} d={d} layers={nl}")
    print(f"floor: numpy sgemm {t_s:.3f}s ({flops / t_s / 1e9:.1f} GFLOP/s), dgemm {t_d:.3f}s")

    src = {"l0": x}
    r_t, t_ours_t = timed(layerscope.intrinsic_dimension, src, method="twonn", sample=None, progress=False)
    r_m, t_ours_m = timed(layerscope.intrinsic_dimension, src, method="mle", k=20, sample=None, progress=False)
    print(f"layerscope  TwoNN {t_ours_t:.3f}s  MLE(k=20) {t_ours_m:.3f}s  "
          f"-> {r_t.values['l0']:.6f} {r_m.values['l0']:.6f}")

    import skdim

    sk_t, t_sk_t = timed(lambda: skdim.id.TwoNN().fit(x64).dimension_)
    sk_m, t_sk_m = timed(lambda: skdim.id.MLE().fit(x64, n_neighbors=20).dimension_)
    print(f"skdim       TwoNN {t_sk_t:.3f}s  MLE(k=20) {t_sk_m:.3f}s  -> {sk_t:.6f} {sk_m:.6f}")
    rel = max(abs(r_t.values["l0"] / sk_t - 1), abs(r_m.values["l0"] / sk_m - 1))
    print(f"max relative difference of the estimates: {rel:.2e}")
    ours_total, sk_total = t_ours_t + t_ours_m, t_sk_t + t_sk_m
    print(f"TwoNN+MLE: layerscope {ours_total:.3f}s vs skdim {sk_total:.3f}s "
          f"({sk_total / ours_total:.1f}x); layerscope TwoNN / sgemm floor = {t_ours_t / t_s:.1f}x")
    best = t_sk_t
    try:
        import dadapy  # type: ignore[import-not-found]

        def dada() -> float:
            dd = dadapy.Data(x64, maxk=21)
            return float(dd.compute_id_2NN()[0])

        v, t_dd = timed(dada)
        print(f"dadapy      2NN {t_dd:.3f}s -> {v:.6f}")
        best = min(best, t_dd)
    except ImportError:
        print("dadapy not installed")

    _, t_all = timed(layerscope.intrinsic_dimension, layers, method="twonn", sample=None, progress=False)
    print(f"{nl} layers TwoNN in one call: {t_all:.3f}s vs {nl} x best anchor call ≈ {nl * best:.3f}s")


if __name__ == "__main__":
    main()
