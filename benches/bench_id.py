"""Intrinsic-dimension benchmark: layerscope's exact blocked kNN + TwoNN / MLE(k=20) against
scikit-dimension, scikit-learn's NearestNeighbors and dadapy (when installed), in ONE run.

    python benches/bench_id.py --quick          # n=3000 x d=384, 3 layers  (< 60 s)
    python benches/bench_id.py                  # n=20000 x d=384, 13 layers
    python benches/bench_id.py --n 20000 --d 768 --layers 13   # the issue's setting
    python benches/bench_id.py --minilm 600     # ID by depth of MiniLM on real text

Every contender runs in its own fresh interpreter that builds the same seeded data, so
the peak-memory figure of one contender is not inflated by another's (peak RSS above the
process's RSS once the data are built; /proc clear_refs resets the high-water mark).

Printed: numpy's sgemm peak measured in this run (a square float32 matmul) and the time of
the n x n x d distance GEMM alone; wall time, estimate and peak memory of each contender;
the ratios anchor / layerscope; the effective GFLOP/s of our kNN (2 n^2 d flops / kNN wall
time — the GEMM floor counted against everything the engine does) as a fraction of the sgemm
peak; L layers in one call against L x one anchor call (extrapolated from one layer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from _common import (
    cpu_seconds,
    gemm_rate,
    peak_mib,
    reset_peak,
    roofline_line,
    rss_mib,
    timed,
)


def make_layer(n: int, d: int, intrinsic: int, seed: int) -> np.ndarray:
    """A curved ``intrinsic``-dim manifold in ``d`` dims, small noise, LLM-like mean offset,
    stored float32 (no duplicate rows)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, intrinsic))
    h = np.tanh(z @ rng.standard_normal((intrinsic, 64)))
    x = h @ rng.standard_normal((64, d)) + 0.01 * rng.standard_normal((n, d))
    return (x + 5.0 * rng.standard_normal(d)).astype(np.float32)


def _run(job: tuple[str, int, int, int]) -> tuple[float, float, float, float]:
    """In a fresh process: build the data, run one contender; (value, s, CPU s, peak MiB)."""
    name, n, d, nl = job
    layers = {f"l{i}": make_layer(n, d, 4 + (2 * i) % 12, i) for i in range(nl)}
    x = layers["l0"]
    x64 = x.astype(np.float64)
    fns: dict[str, Callable[[], float]] = {}

    def ls_id(method: str, src: dict[str, np.ndarray]) -> float:
        import layerscope

        r = layerscope.intrinsic_dimension(
            src, method=method, k=20, sample=None, duplicates="keep", progress=False
        )
        return float(r.values["l0"])

    def ls_knn() -> float:
        from layerscope import _native

        g = _native.knn_graph(np.ascontiguousarray(x64), 20, duplicates="keep")
        return float(g["dist"][:, 0].mean())

    def sk_twonn() -> float:
        import skdim

        return float(skdim.id.TwoNN().fit(x64).dimension_)

    def sk_mle() -> float:
        import skdim

        return float(skdim.id.MLE().fit(x64, n_neighbors=20, n_jobs=-1).dimension_)

    def sklearn_nn() -> float:
        from sklearn.neighbors import NearestNeighbors

        dist, _ = NearestNeighbors(n_neighbors=21, n_jobs=-1).fit(x64).kneighbors(x64)
        return float(dist[:, 1].mean())

    def dadapy_2nn() -> float:
        import dadapy  # type: ignore[import-not-found]

        # maxk=3: dadapy's fastest setting for 2NN (it needs 2 neighbours; maxk=21 is the
        # same estimate, a little slower)
        return float(dadapy.Data(x64, maxk=3).compute_id_2NN()[0])

    fns["layerscope kNN(k=20) only"] = ls_knn
    fns["layerscope TwoNN"] = lambda: ls_id("twonn", {"l0": x})
    fns["layerscope MLE(k=20)"] = lambda: ls_id("mle", {"l0": x})
    fns["layerscope TwoNN+MLE, one graph"] = lambda: float(
        __import__("layerscope")
        .intrinsic_dimensions({"l0": x}, methods=("twonn", "mle"), k=20, sample=None,
                              duplicates="keep", progress=False)["mle"]
        .values["l0"]
    )
    fns["layerscope TwoNN, all layers"] = lambda: float(
        __import__("layerscope")
        .intrinsic_dimension(layers, method="twonn", sample=None, progress=False)
        .values["l0"]
    )
    fns["skdim TwoNN"] = sk_twonn
    fns["skdim MLE(k=20)"] = sk_mle
    fns["sklearn NearestNeighbors(21)"] = sklearn_nn
    fns["dadapy Data(maxk=3).compute_id_2NN"] = dadapy_2nn
    base = rss_mib()
    ok = reset_peak()
    c = cpu_seconds()
    t = time.perf_counter()
    v = fns[name]()
    sec = time.perf_counter() - t
    cpu = cpu_seconds() - c
    peak = peak_mib() - base if ok else float("nan")
    return v, sec, cpu, peak


def minilm_profile(texts: int, bootstrap: int) -> None:
    """ID by depth of all-MiniLM-L6-v2 on real text: token rows (padding, [CLS] and [SEP]
    excluded) of the embedding output and the 6 layer outputs, TwoNN / MLE(k=20) / GRIDE
    (n1=4, n2=8) on every token row, duplicates dropped, bootstrap CIs for TwoNN."""
    import layerscope
    import torch
    from layerscope.corpus import stdlib_corpus
    from layerscope.models import load_minilm

    model, tok = load_minilm()
    corpus = stdlib_corpus(texts)
    rows: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(corpus), 32):
            enc = tok(
                corpus[i : i + 32],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            out = model(**enc, output_hidden_states=True)
            keep = enc["attention_mask"].bool()
            keep[:, 0] = False  # [CLS]
            keep &= enc["input_ids"] != tok.sep_token_id
            for li, h in enumerate(out.hidden_states):
                name = "embeddings" if li == 0 else f"layer{li}"
                rows.setdefault(name, []).append(h[keep].float().numpy())
    data = {k: np.concatenate(v) for k, v in rows.items()}
    n = next(iter(data.values())).shape[0]
    print(f"MiniLM-L6: {len(corpus)} texts, {n} token rows, d=384")
    t0 = time.perf_counter()
    tw = layerscope.intrinsic_dimension(
        data, method="twonn", sample=None, bootstrap=bootstrap, progress=False
    )
    ml = layerscope.intrinsic_dimension(data, method="mle", k=20, sample=None, progress=False)
    gr = layerscope.intrinsic_dimension(
        data, method="gride", n1=4, n2=8, sample=None, progress=False
    )
    pca = layerscope.intrinsic_dimension(data, method="pca", progress=False)
    print(f"({time.perf_counter() - t0:.1f} s for all four methods, all layers)")
    print(
        f"{'layer':12s} {'TwoNN':>7s} {'95% CI':>15s} {'MLE(20)':>8s} {'GRIDE(4,8)':>10s} "
        f"{'PCA-95%':>8s} {'dups':>5s}"
    )
    for k in data:
        lo, hi = tw.ci[k]
        print(
            f"{k:12s} {tw.values[k]:7.2f} {f'[{lo:.2f}, {hi:.2f}]':>15s} {ml.values[k]:8.2f} "
            f"{gr.values[k]:10.2f} {pca.values[k]:8.0f} {tw.details[k]['duplicates']:5d}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n=3000, d=384, 3 layers (< 60 s)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument(
        "--minilm",
        type=int,
        default=0,
        metavar="TEXTS",
        help="instead: ID-by-depth profile of MiniLM on TEXTS real paragraphs",
    )
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        try:
            v, sec, cpu, peak_mib = _run((args.worker, args.n, args.d, args.layers))
            print(json.dumps({"value": v, "seconds": sec, "cpu": cpu, "peak_mib": peak_mib}))
        except ImportError as e:
            print(json.dumps({"missing": e.name}))
        return
    if args.minilm:
        minilm_profile(args.minilm, args.bootstrap)
        return
    n, d, nl = (3000, 384, 3) if args.quick else (20000, 384, 13)
    n, d, nl = args.n or n, args.d or d, args.layers or nl
    print(f"n={n} d={d} layers={nl} cores={os.cpu_count()}")

    peak = gemm_rate(1024 if args.quick else 4096, np.float32)
    x = make_layer(n, d, 4, 0)
    y = x.copy()  # x @ x.T would be a SYRK (half the flops); the kNN engine does a full GEMM
    t_dist = min(timed(lambda: x @ y.T) for _ in range(2))
    c = cpu_seconds()
    x @ y.T
    cpu_dist = cpu_seconds() - c
    flops = 2.0 * n * n * d
    print(f"numpy sgemm peak (square): {peak:.1f} GFLOP/s")
    print(
        f"distance GEMM alone (numpy x @ y.T, {flops / 1e9:.1f} GFLOP): {t_dist:.3f} s "
        f"= {flops / t_dist / 1e9:.1f} GFLOP/s; CPU {cpu_dist:.3f} s"
    )

    names = [
        "layerscope kNN(k=20) only",
        "layerscope TwoNN",
        "layerscope MLE(k=20)",
        "layerscope TwoNN+MLE, one graph",
        "skdim TwoNN",
        "skdim MLE(k=20)",
        "sklearn NearestNeighbors(21)",
        "dadapy Data(maxk=3).compute_id_2NN",
        "layerscope TwoNN, all layers",
    ]
    res: dict[str, tuple[float, float, float, float]] = {}
    print(f"{'contender':40s} {'seconds':>9s} {'CPU s':>8s} {'peak MiB':>9s}  value")
    for name in names:
        # a fresh interpreter per contender (not a multiprocessing child: joblib/loky would
        # fall back to one job there)
        cmd = [sys.executable, __file__, "--worker", name, "--n", str(n), "--d", str(d)]
        out = subprocess.run([*cmd, "--layers", str(nl)], capture_output=True, text=True)
        last = out.stdout.strip().splitlines()[-1:] or [""]
        try:
            got = json.loads(last[0])
        except json.JSONDecodeError:
            print(f"{name:40s} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        if "missing" in got:
            print(f"{name:40s} {'-':>9s} {'-':>8s} {'-':>9s}  not installed ({got['missing']})")
            continue
        res[name] = (got["value"], got["seconds"], got["cpu"], got["peak_mib"])
        v, s, c, m = res[name]
        print(f"{name:40s} {s:9.3f} {c:8.2f} {m:9.1f}  {v:.6f}")

    def t(name: str) -> float:
        return res[name][1] if name in res else float("nan")

    def c(name: str) -> float:
        return res[name][2] if name in res else float("nan")

    def ratio(label: str, anchors: list[str], ours: list[str]) -> None:
        wall = sum(t(a) for a in anchors) / sum(t(o) for o in ours)
        cpu = sum(c(a) for a in anchors) / sum(c(o) for o in ours)
        print(f"  {label:28s} {wall:6.1f}x wall {cpu:6.1f}x CPU")

    print("\nratios anchor / layerscope (same run; CPU time is robust to a shared machine):")
    ratio("TwoNN  skdim / ours", ["skdim TwoNN"], ["layerscope TwoNN"])
    ratio("MLE(k=20)  skdim / ours", ["skdim MLE(k=20)"], ["layerscope MLE(k=20)"])
    ratio(
        "TwoNN+MLE  skdim / ours",
        ["skdim TwoNN", "skdim MLE(k=20)"],
        ["layerscope TwoNN", "layerscope MLE(k=20)"],
    )
    ratio(
        "TwoNN+MLE  skdim / ours(1 graph)",
        ["skdim TwoNN", "skdim MLE(k=20)"],
        ["layerscope TwoNN+MLE, one graph"],
    )
    ratio(
        "kNN(k=20)  sklearn / ours", ["sklearn NearestNeighbors(21)"], ["layerscope kNN(k=20) only"]
    )
    if "dadapy Data(maxk=3).compute_id_2NN" in res:
        ratio("2NN  dadapy / ours", ["dadapy Data(maxk=3).compute_id_2NN"], ["layerscope TwoNN"])
    rel = max(
        abs(res["layerscope TwoNN"][0] / res["skdim TwoNN"][0] - 1),
        abs(res["layerscope MLE(k=20)"][0] / res["skdim MLE(k=20)"][0] - 1),
    )
    print(f"max relative difference of the estimates vs skdim: {rel:.2e}")
    tk = t("layerscope kNN(k=20) only")
    print(
        f"our kNN: {flops / tk / 1e9:.1f} effective GFLOP/s (2n^2d / kNN wall time) = "
        f"{flops / tk / 1e9 / peak:.0%} of the sgemm peak; kNN / numpy distance GEMM = "
        f"{tk / t_dist:.1f}x wall, {res['layerscope kNN(k=20) only'][2] / cpu_dist:.1f}x CPU"
    )
    dgemm = gemm_rate(1024 if args.quick else 2048, np.float64)
    print(roofline_line(dgemm, peak, {"kNN(k=20) effective": (flops / tk / 1e9, "f32")}))
    best = min(t(k) for k in ("skdim TwoNN", "dadapy Data(maxk=3).compute_id_2NN") if k in res)
    ta = t("layerscope TwoNN, all layers")
    print(
        f"{nl} layers TwoNN in one call: {ta:.3f} s vs {nl} x best anchor call "
        f"~ {nl * best:.3f} s (extrapolated) -> {nl * best / ta:.1f}x"
    )


if __name__ == "__main__":
    main()
