"""How each cost grows: time and peak memory of CKA, spectra + alignment and intrinsic
dimension against the rows n, the width d per layer and the layer count L (three sweeps),
the fitted exponents printed beside the expected ones, and a plot saved (the table of how
each cost grows, for the docs).

    python benches/bench_growth.py            # default sweeps, about 6 minutes on 2 cores
    python benches/bench_growth.py --quick    # smaller points (about a minute)
    python benches/bench_growth.py --out growth.png --json growth.json
                                              # (default plot: bench-results/bench_growth.png)

Measures (each point in a fresh child process, so its peak RSS is its own):

* ``cka``: ``layerscope.cka(arrays)`` — one moment pass, f32 products into f64 sums:
  ``n · D²`` multiply-adds with ``D = L · d``, so time ∝ n¹ d² L²; memory is the ``(D+L)²``
  f64 accumulator plus one row block: ∝ n⁰ (d L)².
* ``alignment``: ``layerscope.alignment(arrays, method="subspace", k=32)`` — the same pass,
  then one eigendecomposition per layer (``d³``) and one ``k × k`` product per pair:
  time ∝ n¹ d² L² while the pass dominates.
* ``id``: ``layerscope.intrinsic_dimension(arrays, method="twonn", sample=None)`` — an exact
  kNN per layer: a ``2 n² d`` distance GEMM and an ``O(n²)`` selection, so time ∝ n² d¹ L¹;
  memory is the sample and one block of distances per thread: ∝ n¹ d¹.

Printed per sweep: seconds and peak MiB above the child's baseline at each point, and the
least-squares slope of log(time) and log(memory) against log(x) over the points (the
memory exponent of a sweep whose memory does not depend on x is about 0). Fixed overheads
(thread start-up, the interpreter, small blocks) bend the curves at small sizes, so the
fitted exponents sit a little below the asymptotic ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import gemm_rates, peak_mib, reset_peak, roofline_line, rss_mib

MEASURES = ("cka", "alignment", "id")
# expected exponents of time in (n, d, L) per measure
EXPECTED = {"cka": (1, 2, 2), "alignment": (1, 2, 2), "id": (2, 1, 1)}


def data(n: int, d: int, nl: int, seed: int = 0) -> dict[str, np.ndarray]:
    """L float32 layers of n × d: a shared low-rank signal plus noise, with LLM-like
    per-feature mean offsets."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 16)).astype(np.float32)
    out = {}
    for i in range(nl):
        w = rng.standard_normal((16, d)).astype(np.float32)
        x = base @ w + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
        out[f"l{i:02d}"] = x + rng.uniform(-50, 50, d).astype(np.float32)
    return out


def child(measure: str, n: int, d: int, nl: int) -> dict[str, Any]:
    import layerscope as ls

    x = data(n, d, nl)
    base = rss_mib()
    reset_peak()
    t = time.perf_counter()
    if measure == "cka":
        ls.cka(x, progress=False)
    elif measure == "alignment":
        ls.alignment(x, method="subspace", k=min(32, d), progress=False)
    else:
        ls.intrinsic_dimension(x, method="twonn", sample=None, duplicates="keep",
                               progress=False)
    sec = time.perf_counter() - t
    return {"seconds": sec, "peak_mib": max(peak_mib() - base, 0.0)}


def run(measure: str, n: int, d: int, nl: int) -> dict[str, Any]:
    import subprocess

    r = subprocess.run([sys.executable, __file__, "--child", measure, str(n), str(d), str(nl)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{measure} n={n} d={d} L={nl} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than 2 positive points)."""
    pts = [(np.log(a), np.log(b)) for a, b in zip(xs, ys) if a > 0 and b > 0]
    if len(pts) < 2:
        return float("nan")
    u, v = np.array(pts).T
    return float(np.polyfit(u, v, 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller points (< 1 minute)")
    ap.add_argument("--out", default="bench-results/bench_growth.png",
                    help="where the plot goes (bench-results/ is git-ignored)")
    ap.add_argument("--json", default=None, help="write all figures as JSON here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, n, d, nl = args.child
        print(json.dumps(child(m, int(n), int(d), int(nl))))
        return 0
    q = args.quick
    # (fixed n, d, L), the sweeps, and the ID's own row sweep (its n² cost: smaller rows)
    # sizes where the compute dominates the fixed costs (the pass: n·(dL)² = 5.5e11 flops)
    n0, d0, l0 = (8192, 256, 4) if q else (32768, 512, 8)
    sweeps = {
        "n": [n0 // 4, n0 // 2, n0, 2 * n0] if not q else [n0 // 2, n0, 2 * n0],
        "d": [d0 // 2, d0, 2 * d0, 4 * d0] if not q else [d0 // 2, d0, 2 * d0],
        "L": [2, 4, 8, 16] if not q else [2, 4, 8],
    }
    id_n0 = n0 // 4  # the ID's rows (its n² cost): a quarter of the pass's, in every sweep
    dgemm, sgemm = gemm_rates(1024 if q else 2048)
    print(f"# bench_growth: {os.cpu_count()} CPUs; fixed n={n0} (ID: {id_n0}), d={d0}, L={l0}")
    print(roofline_line(dgemm, sgemm))
    results: dict[str, Any] = {"fixed": {"n": n0, "d": d0, "L": l0, "id_n": id_n0},
                               "sweeps": {}}
    fits: dict[str, dict[str, tuple[float, float]]] = {}
    for var, xs in sweeps.items():
        print(f"\n{'sweep ' + var:<12} {'measure':<10}" + "".join(f"{x:>16}" for x in xs)
              + f"{'time exp':>10}{'(want)':>7}{'mem exp':>9}")
        results["sweeps"][var] = {}
        for meas in MEASURES:
            pts = []
            for x in xs:
                n = x if var == "n" else (id_n0 if meas == "id" else n0)
                if meas == "id" and var == "n":
                    n = x // 4
                d = x if var == "d" else d0
                nl = x if var == "L" else l0
                pts.append({"n": n, "d": d, "L": nl, **run(meas, n, d, nl)})
            xv = [float(p["n"] if var == "n" else p["d"] if var == "d" else p["L"]) for p in pts]
            te = slope(xv, [p["seconds"] for p in pts])
            me = slope(xv, [p["peak_mib"] for p in pts])
            want = EXPECTED[meas]["ndL".index(var)]
            cells = "".join(f"{p['seconds']:>8.2f}s{p['peak_mib']:>6.0f}M" for p in pts)
            print(f"{'':<12} {meas:<10}{cells}{te:>10.2f}{want:>7}{me:>9.2f}")
            results["sweeps"][var][meas] = {"points": pts, "time_exponent": te,
                                            "memory_exponent": me, "expected_time": want}
            fits.setdefault(var, {})[meas] = (te, me)
    print("\n# time exponents (fitted / expected): "
          + "; ".join(f"{m}: n {fits['n'][m][0]:.2f}/{EXPECTED[m][0]}, "
                      f"d {fits['d'][m][0]:.2f}/{EXPECTED[m][1]}, "
                      f"L {fits['L'][m][0]:.2f}/{EXPECTED[m][2]}" for m in MEASURES))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
        for col, var in enumerate(sweeps):
            for meas in MEASURES:
                r = results["sweeps"][var][meas]
                xv = [p["n" if var == "n" else "d" if var == "d" else "L"] for p in r["points"]]
                axes[0, col].loglog(xv, [p["seconds"] for p in r["points"]], "o-",
                                    label=f"{meas} (slope {r['time_exponent']:.2f})")
                axes[1, col].loglog(xv, [max(p["peak_mib"], 1e-1) for p in r["points"]], "o-",
                                    label=f"{meas} (slope {r['memory_exponent']:.2f})")
            axes[0, col].set_title(f"time against {var}")
            axes[1, col].set_title(f"peak memory against {var}")
            axes[1, col].set_xlabel(var)
            for ax in axes[:, col]:
                ax.set_xticks(sweeps[var] if var != "n" else [])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.legend(fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
        axes[0, 0].set_ylabel("seconds")
        axes[1, 0].set_ylabel("MiB above baseline")
        fig.suptitle(f"layerscope cost growth (fixed n={n0}, d={d0}, L={l0}; "
                     f"{os.cpu_count()} CPUs)")
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"# plot saved to {Path(args.out).resolve()}")
    except ImportError as e:
        print(f"# no plot: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
