"""Spectra + all-pairs subspace alignment + Procrustes: layerscope (one moment pass, then
everything from the moments) against numpy/scipy written well (explicit centred f64 SVD per
layer, ``scipy.linalg.subspace_angles`` on the top-k left singular vectors,
``scipy.linalg.orthogonal_procrustes`` on the Frobenius-normalised centred layers), in ONE run.

    python benches/bench_align.py --quick            # L=13, d=384, n=4096  (< 60 s)
    python benches/bench_align.py                    # L=13, d=768, n=32768 (the issue's setting)
    python benches/bench_align.py --json out.json    # also write the figures as JSON

Each contender runs in its own fresh (spawned) process that builds the same seeded float32
layers (residual-stream-like: each layer = previous + a fresh low-rank update, per-feature
mean offsets of ~100x the spread), so one contender's peak memory is not inflated by the
other's: peak RSS above the RSS once the data are built (/proc clear_refs resets the
high-water mark).

layerscope's phases: ``pass`` (the one streaming moment pass, shared by CKA), ``cka`` (biased
+ debiased linear CKA from the moments), ``spectra+subspace`` (one eigendecomposition per
layer, in parallel across layers, shared by the spectra and the k-subspace principal angles
of all pairs), ``procrustes`` (nuclear norm of every C_ij). Printed: each phase, the ratio of
the whole numpy/scipy pipeline to ours, what spectra + alignment add to the CKA pass (the
issue's <= 10 % target), and the largest difference between the two sides' values.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np
from _common import gemm_rates, peak_mib, reset_peak, roofline_line, rss_mib


def make_layers(num: int, n: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``num`` float32 layers of ``n`` rows: h_0 = low-rank signal + noise; h_l = h_{l-1} +
    a rank-16 update + noise (like a residual stream); per-feature offsets ~100x the spread."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 32)).astype(np.float32)
    h = z @ rng.standard_normal((32, d)).astype(np.float32)
    h += 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    out = {}
    for i in range(num):
        if i:
            upd = rng.standard_normal((n, 16), dtype=np.float32)
            h = h + upd @ rng.standard_normal((16, d)).astype(np.float32)
            h += 0.3 * rng.standard_normal((n, d), dtype=np.float32)
        off = (100.0 * float(h.std()) * rng.uniform(-1.0, 1.0, d)).astype(np.float32)
        out[f"layer{i:02d}"] = h + off
    return out


def _measures_np(lam: np.ndarray, n: int, d: int) -> dict[str, float]:
    """Spectrum measures from covariance eigenvalues (descending), the same rank rule."""
    tol = lam[0] * max(n, d) * np.finfo(np.float64).eps
    pos = np.where(lam > tol, lam, 0.0)
    sig = np.sqrt(pos)
    p = sig[sig > 0] / sig.sum()
    cum = np.cumsum(pos) / pos.sum()
    return {
        "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
        "participation_ratio": float(pos.sum() ** 2 / np.sum(pos**2)),
        "stable_rank": float(pos.sum() / pos[0]),
        "pca_id_95": float(np.argmax(cum >= 0.95) + 1),
    }


def run_layerscope(data: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    from layerscope._moments import compute_moments

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    m, _ = compute_moments(data, progress=False)
    t["pass"] = time.perf_counter() - t0
    idx = list(range(len(data)))
    t0 = time.perf_counter()
    m.cka(idx, idx, debiased=False)
    m.cka(idx, idx, debiased=True)
    t["cka"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = m.alignment(idx, idx, method="subspace", k=k, symmetric=True, spectrum_layers=idx)
    t["spectra+subspace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pr = m.alignment(idx, idx, method="procrustes", symmetric=True)
    t["procrustes"] = time.perf_counter() - t0
    nl = len(idx)
    return {
        "times": t,
        "overlap": np.asarray(out["alignment"]["values"]).reshape(nl, nl).tolist(),
        "procrustes": np.asarray(pr["alignment"]["values"]).reshape(nl, nl).tolist(),
        "spectra": [
            {
                key: s[key]
                for key in ("effective_rank", "participation_ratio", "stable_rank", "pca_id_95")
            }
            for s in out["spectra"]
        ],
    }


def run_numpy(data: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    import scipy.linalg as sla

    t: dict[str, float] = {}
    names = list(data)
    nl = len(names)
    t0 = time.perf_counter()
    us, spectra, normed = [], [], []
    for name in names:
        x = data[name].astype(np.float64)
        x -= x.mean(axis=0)
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        us.append(np.ascontiguousarray(u[:, :k]))
        spectra.append(_measures_np(s**2 / (x.shape[0] - 1), *x.shape))
        x /= np.linalg.norm(x)
        normed.append(x)
        del u
    t["svd+spectra"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    overlap = np.eye(nl)
    for i in range(nl):
        for j in range(i + 1, nl):
            c = np.cos(sla.subspace_angles(us[i], us[j]))
            overlap[i, j] = overlap[j, i] = float(np.mean(c**2))
    t["subspace_angles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = np.eye(nl)
    for i in range(nl):
        for j in range(i + 1, nl):
            _, scale = sla.orthogonal_procrustes(normed[i], normed[j])
            proc[i, j] = proc[j, i] = float(scale)
    t["orthogonal_procrustes"] = time.perf_counter() - t0
    return {
        "times": t,
        "overlap": overlap.tolist(),
        "procrustes": proc.tolist(),
        "spectra": spectra,
    }


def _child(job: tuple[str, int, int, int, int]) -> dict[str, Any]:
    who, layers, n, d, k = job
    data = make_layers(layers, n, d)
    base = rss_mib()
    ok = reset_peak()
    t0 = time.perf_counter()
    res = run_layerscope(data, k) if who == "layerscope" else run_numpy(data, k)
    res["wall"] = time.perf_counter() - t0
    peak = peak_mib()
    # without clear_refs the high-water mark includes building the data: say so
    res["peak_mib_above_data"] = max(0.0, peak - base)
    res["peak_reset"] = ok
    res["data_mib"] = sum(x.nbytes for x in data.values()) / 2**20
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="L=13, d=384, n=4096 (< 60 s)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for BOTH sides (OpenBLAS/OMP and rayon); default: the usable CPUs. "
        "On a machine shared with other jobs, OpenBLAS threads spin and slow numpy 10-40x: "
        "use --threads 1 there for a fair comparison",
    )
    args = ap.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)  # inherited by the spawned contenders
    if args.quick:
        args.layers, args.n, args.d = 13, 4096, 384
    print(
        f"bench_align: L={args.layers} layers x d={args.d}, n={args.n} rows (float32 with "
        f"mean offsets), k={args.k}; {threads} thread(s) per side",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    res = {}
    for who in ("layerscope", "numpy"):
        with ctx.Pool(1) as pool:
            res[who] = pool.apply(_child, ((who, args.layers, args.n, args.d, args.k),))
        r = res[who]
        phases = ", ".join(f"{a} {b:.2f} s" for a, b in r["times"].items())
        print(
            f"  {who:10s} wall {r['wall']:7.2f} s  peak +{r['peak_mib_above_data']:7.1f} MiB"
            f" (data {r['data_mib']:.0f} MiB)  [{phases}]",
            flush=True,
        )
    ours, ref = res["layerscope"], res["numpy"]
    tt = ours["times"]
    ours_measures = tt["spectra+subspace"] + tt["procrustes"]
    ours_total = tt["pass"] + ours_measures
    ratio = ref["wall"] / ours_total
    added = (tt["spectra+subspace"] + tt["procrustes"]) / (tt["pass"] + tt["cka"])
    added_sub = tt["spectra+subspace"] / (tt["pass"] + tt["cka"])
    d_ov = float(np.max(np.abs(np.subtract(ours["overlap"], ref["overlap"]))))
    d_pr = float(np.max(np.abs(np.subtract(ours["procrustes"], ref["procrustes"]))))
    d_sp = max(
        abs(a[m] - b[m]) / abs(b[m]) for a, b in zip(ours["spectra"], ref["spectra"]) for m in a
    )
    print(f"  numpy/scipy time / layerscope time (pass + spectra + alignment): {ratio:.1f}x")
    dsum = args.layers * args.d
    dgemm, sgemm = gemm_rates()
    print("  " + roofline_line(dgemm, sgemm, {
        "moment pass": (args.n * dsum * dsum / tt["pass"] / 1e9, "f32"),
        "numpy/scipy": (args.n * dsum * dsum / ref["wall"] / 1e9, "f64"),
    }))
    print(
        f"  spectra + subspace + procrustes add {100 * added:.1f} % to the CKA pass "
        f"(spectra + subspace alone: {100 * added_sub:.1f} %)"
    )
    print(
        f"  max |diff| overlap {d_ov:.1e}, procrustes {d_pr:.1e}; spectrum measures max rel "
        f"diff {d_sp:.1e}"
    )
    if args.json:
        summary = {
            "config": vars(args),
            "threads": threads,
            "layerscope": ours,
            "numpy": ref,
            "ratio_numpy_over_layerscope": ratio,
            "added_fraction_over_cka_pass": added,
            "added_fraction_spectra_subspace": added_sub,
            "max_abs_diff_overlap": d_ov,
            "max_abs_diff_procrustes": d_pr,
            "max_rel_diff_spectra": d_sp,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
