"""Real model sizes: the planner's three exact routes measured, in one run.

Three parts (issue 25, slice 4), every figure measured in this run on this machine:

1. **The Gram route** — L = 33 layers × d = 4096 (a 7–8B model's residual stream), n = 2048
   rows, bf16 store. ``layerscope.cka(store)`` (the planner takes ``"gram"``: one centred
   ``n × n`` Gram per layer, packed SYRK, f32 products, f64 sums) against
   * ``numpy_grams``: the best a user writes by hand — each layer read as f32, centred, one
     ``X Xᵀ`` Gram per layer (sgemm), then every pair's ``⟨K_i, K_j⟩`` (one ``G Gᵀ``);
   * ``peers_pairwise``: what the peer libraries do (torch-cka, ckatorch, pytorch-cka's
     loops): for every pair, both layers' Grams built again (torch f32 on the CPU) and HSIC
     from them. A few pairs are timed and the total is extrapolated to all
     ``L (L + 1) / 2`` pairs (labelled).
2. **Tiled against untiled** — L = 8 × d = 3072, n = 32 768 rows, bf16 store:
   ``cka(store, strategy="single-pass")`` (its 4.8 GB accumulator fits this machine) against
   ``cka(store, max_memory="1.5G")`` (the planner tiles). Goal: the tiled time ≤ 1.25× the
   single pass, peak RSS ≤ budget + 300 MB; bytes read as a multiple of the store.
3. **How cost grows** — the single pass (float32 products, in-memory f32 arrays of 4
   layers): time against n at D = 2048 and against D at n = 8192; fitted exponents of
   ``time ∝ n^a`` and ``time ∝ D^b`` (expect a ≈ 1, b ≈ 2), printed and plotted
   (``--out``, default ``bench-results/bench_scale.png``).

Each measured call runs in its own child process: its peak RSS (``VmHWM``, which counts
mapped store pages while they are resident — the reader releases them per block) minus the
child's RSS before the call is its own. The machine's sgemm/dgemm rates (numpy, 2048²) and the
packed kernel's measured rate are printed beside the achieved rates.

4. **The arithmetic of real models** — ``layerscope.planner.plan_shapes`` for 7B (33 × 4096)
   and 70B (81 × 8192) at 10⁵–10⁷ rows under this machine's budget and 64 GiB: the plan,
   passes, peak, bytes read, FLOPs and the estimated time (a markdown table, for
   ``docs/scale.md``).

``--quick`` (under a minute on 2 cores): 33 × 1024 with n = 512; 8 × 768 with n = 8192 and a
budget of 100M; n up to 16 384 and D up to 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np
from _common import gemm_rates, roofline_line, timed


def make_store(path: Path, n: int, nl: int, d: int, seed: int = 0) -> None:
    """A bf16 store of ``nl`` layers: a residual stream ``h_{l+1} = h_l + tanh(h_l W_l)/2``
    (``W_l`` of rank 64, so a wide store is quick to write) with per-feature offsets ~100×
    the spread added to what is stored."""
    from layerscope.store import StoreWriter

    rng = np.random.default_rng(seed)
    r = min(64, d)
    us = [rng.standard_normal((d, r)).astype(np.float32) / np.sqrt(d) for _ in range(nl)]
    vs = [rng.standard_normal((r, d)).astype(np.float32) for _ in range(nl)]
    offs = [rng.uniform(-100, 100, d).astype(np.float32) for _ in range(nl)]
    step = max(1, min(4096, (64 << 20) // (4 * d * nl)))
    with StoreWriter(path, dtype="bfloat16", shard_bytes=256 << 20) as w:
        for s in range(0, n, step):
            m = min(step, n - s)
            h = rng.standard_normal((m, d)).astype(np.float32)
            blk = {}
            for i in range(nl):
                blk[f"layer{i:02d}"] = h + offs[i]
                h = h + np.tanh((h @ us[i]) @ vs[i]) * 0.5
            w.append(blk)


# ---------------------------------------------------------------------------- methods


def m_layerscope(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    r = layerscope.cka(path, progress=False, strategy=opts.get("strategy"),
                       max_memory=opts.get("max_memory"))
    return {"seconds": time.perf_counter() - t, "values": np.asarray(r.values).tolist(),
            "plan": r.meta["plan"], "compute": r.meta["compute"]}


def _centred_f32(s: Any, name: str) -> np.ndarray:
    x = s.read(name, dtype=np.float32)
    return x - x.mean(axis=0, dtype=np.float64).astype(np.float32)


def m_numpy_grams(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    s = layerscope.open(path)
    t = time.perf_counter()
    grams = []
    for name in s.layers:
        x = _centred_f32(s, name)
        grams.append((x @ x.T).ravel())  # centred data: K = X̄X̄ᵀ is already HKH
        del x
    g = np.stack(grams)
    hs = (g.astype(np.float64) @ g.T.astype(np.float64))
    dg = np.sqrt(np.diag(hs))
    vals = hs / np.outer(dg, dg)
    return {"seconds": time.perf_counter() - t, "values": vals.tolist()}


def m_peers_pairwise(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope
    import torch

    s = layerscope.open(path)
    names = list(s.layers)
    pairs = [(i, j) for i in range(len(names)) for j in range(i, len(names))]
    rng = np.random.default_rng(1)
    timed = [pairs[k] for k in rng.choice(len(pairs), size=opts["pairs"], replace=False)]
    t = time.perf_counter()
    for i, j in timed:
        # what the peers do per pair: read both layers, build both Grams, centre, HSIC
        x = torch.from_numpy(s.read(names[i], dtype=np.float32))
        y = torch.from_numpy(s.read(names[j], dtype=np.float32))
        n = x.shape[0]
        h = torch.eye(n) - 1.0 / n
        k = h @ (x @ x.T) @ h
        m = h @ (y @ y.T) @ h
        hsic = (k * m).sum() / ((k * k).sum() * (m * m).sum()).sqrt()
        del x, y, k, m, h, hsic
    each = (time.perf_counter() - t) / len(timed)
    return {"seconds": each * len(pairs), "timed_pairs": len(timed), "pairs": len(pairs),
            "extrapolated": True}


METHODS = {k[2:]: v for k, v in globals().items() if k.startswith("m_")}


def child(method: str, path: str, opts: dict[str, Any]) -> None:
    _common.child(METHODS, method, path, opts, torch=method == "peers_pairwise")


def run_child(method: str, path: str, opts: dict[str, Any]) -> dict[str, Any]:
    return _common.run_child(__file__, method, path, opts)


def _fmt(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    return f"{r['seconds']:8.2f} s  peak +{r['peak_extra_mb']:7.0f} MB"


# ---------------------------------------------------------------------------- parts


def part_gram(tmp: Path, quick: bool, report: dict[str, Any]) -> None:
    nl, d, n = (33, 1024, 512) if quick else (33, 4096, 2048)
    path = tmp / "gram"
    t = time.perf_counter()
    make_store(path, n, nl, d)
    print(f"\n## 1. the Gram route: {nl} × {d}, n = {n}, bf16 "
          f"({nl * d * n * 2 / 2**20:.0f} MiB, written in {time.perf_counter() - t:.1f} s)")
    res = {
        "layerscope": run_child("layerscope", str(path), {}),
        "numpy_grams": run_child("numpy_grams", str(path), {}),
        "peers_pairwise": run_child("peers_pairwise", str(path), {"pairs": 2 if quick else 6}),
    }
    ls = res["layerscope"]
    base = ls["seconds"]
    ref = np.asarray(res["numpy_grams"].get("values", np.nan))
    for name, r in res.items():
        extra = ""
        if "seconds" in r:
            extra = f"  {r['seconds'] / base:6.2f}× layerscope"
        if r.get("extrapolated"):
            extra += f"  (timed {r['timed_pairs']} of {r['pairs']} pairs, extrapolated)"
        if name == "layerscope":
            extra += f"  plan {r['plan']['strategy']}, {r['plan']['flops']:.2e} flops"
        print(f"  {name:<16} {_fmt(r)}{extra}")
    if "values" in ls and ref.ndim == 2:
        err = float(np.abs(np.asarray(ls["values"]) - ref).max())
        print(f"  max |Δ| layerscope vs numpy_grams: {err:.1e}")
        ls["max_abs_diff_vs_numpy"] = err
    for r in res.values():
        r.pop("values", None)
    report["gram"] = {"layers": nl, "dim": d, "n": n, **res}


def part_tiled(tmp: Path, quick: bool, report: dict[str, Any]) -> None:
    nl, d, n, budget = (8, 768, 8192, "100M") if quick else (8, 3072, 32768, "1.5G")
    path = tmp / "tiled"
    t = time.perf_counter()
    make_store(path, n, nl, d)
    store_mb = nl * d * n * 2 / 2**20
    print(f"\n## 2. tiled against untiled: {nl} × {d}, n = {n}, bf16 ({store_mb:.0f} MiB, "
          f"written in {time.perf_counter() - t:.1f} s), max_memory = {budget}")
    one = run_child("layerscope", str(path), {"strategy": "single-pass"})
    tiled = run_child("layerscope", str(path), {"max_memory": budget})
    from layerscope import memory_budget

    limit_mb = memory_budget(budget).bytes / 2**20
    for name, r in (("single-pass", one), ("tiled", tiled)):
        if "plan" in r:
            p = r["plan"]
            print(f"  {name:<12} {_fmt(r)}  {p['strategy']}, {p['passes']} pass(es), "
                  f"planned peak {p['peak_bytes'] / 2**20:.0f} MB, bytes read "
                  f"{p['bytes_read'] / p['bytes_selected']:.2f}× the store, "
                  f"{p['flops'] / r['seconds'] / 1e9:.0f} GFLOP/s")
        else:
            print(f"  {name:<12} {_fmt(r)}")
    if "seconds" in one and "seconds" in tiled:
        ratio = tiled["seconds"] / one["seconds"]
        err = float(np.abs(np.asarray(one["values"]) - np.asarray(tiled["values"])).max())
        ok_t = "meets" if ratio <= 1.25 else "MISSES"
        ok_m = "meets" if tiled["peak_extra_mb"] <= limit_mb + 300 else "MISSES"
        print(f"  tiled / single-pass time: {ratio:.2f}× ({ok_t} the ≤ 1.25× goal); tiled peak "
              f"+{tiled['peak_extra_mb']:.0f} MB against budget + 300 MB = "
              f"{limit_mb + 300:.0f} MB ({ok_m}); max |Δ| = {err:.1e}")
        tiled["ratio_to_single_pass"] = ratio
        tiled["max_abs_diff"] = err
    for r in (one, tiled):
        r.pop("values", None)
    report["tiled"] = {"layers": nl, "dim": d, "n": n, "budget": budget,
                       "single_pass": one, "tiled": tiled}


def _fit(x: list[int], t: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(t), 1)[0])


def part_growth(quick: bool, report: dict[str, Any], out: Path) -> None:
    import layerscope

    rng = np.random.default_rng(0)
    ns = [2048, 4096, 8192, 16384] if quick else [8192, 16384, 32768, 65536]
    ds = [128, 256, 512, 1024] if quick else [256, 512, 1024, 2048]  # per layer, 4 layers
    n_fixed, d_fixed = (4096, 256) if quick else (8192, 512)

    def seconds(n: int, d: int) -> float:
        x = {f"l{i}": rng.standard_normal((n, d)).astype(np.float32) for i in range(4)}
        layerscope.cka(x, strategy="single-pass", progress=False)  # warm
        return min(timed(lambda: layerscope.cka(x, strategy="single-pass", progress=False))
                   for _ in range(2))

    print("\n## 3. how cost grows (single pass, float32 products, 4 in-memory f32 layers)")
    tn = [seconds(n, d_fixed) for n in ns]
    td = [seconds(n_fixed, d) for d in ds]
    a, b = _fit(ns, tn), _fit([4 * d for d in ds], td)
    print("  n:     " + "  ".join(f"{n:>7}" for n in ns) + f"   (D = {4 * d_fixed})")
    print("  s:     " + "  ".join(f"{t:7.3f}" for t in tn) + f"   time ∝ n^{a:.2f}")
    print("  D:     " + "  ".join(f"{4 * d:>7}" for d in ds) + f"   (n = {n_fixed})")
    print("  s:     " + "  ".join(f"{t:7.3f}" for t in td) + f"   time ∝ D^{b:.2f}")
    report["growth"] = {"n": ns, "seconds_vs_n": tn, "D_fixed": 4 * d_fixed,
                        "D": [4 * d for d in ds], "seconds_vs_D": td, "n_fixed": n_fixed,
                        "exponent_n": a, "exponent_D": b}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    ax[0].loglog(ns, tn, "o-", label=f"measured (slope {a:.2f})")
    ax[0].loglog(ns, [tn[0] * n / ns[0] for n in ns], "k:", label="∝ n")
    ax[0].set_xlabel("rows n")
    ax[0].set_title(f"time against n (D = {4 * d_fixed})")
    xs = [4 * d for d in ds]
    ax[1].loglog(xs, td, "o-", label=f"measured (slope {b:.2f})")
    ax[1].loglog(xs, [td[-1] * (x / xs[-1]) ** 2 for x in xs], "k:", label="∝ D²")
    ax[1].set_xlabel("total width D")
    ax[1].set_title(f"time against D (n = {n_fixed})")
    for x in ax:
        x.set_ylabel("seconds")
        x.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"  plot: {out}")


MODELS = [("7B (Llama-2-7B: 32 blocks + embeddings)", 33, 4096),
          ("70B (Llama-2-70B: 80 blocks + embeddings)", 81, 8192)]


def part_arithmetic(budgets: list[str | None]) -> None:
    """The plans of real model sizes (no data: ``plan_shapes``), as a markdown table."""
    from layerscope import MemoryBudgetError, memory_budget
    from layerscope.planner import plan_shapes
    from layerscope.store import _human

    print("\n## 4. the arithmetic of real models (bf16 stores; times at the rates measured "
          "here)\n")
    print("| model | rows | budget | measure | plan | passes | peak | bytes read | FLOPs "
          "| est. time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, nl, d in MODELS:
        for n in (10**5, 10**6, 10**7):
            for budget in budgets:
                for measure in ("cka", "alignment", "spectrum"):
                    b = str(memory_budget(budget).bytes // 2**30) + " GiB"
                    try:
                        p = plan_shapes([d] * nl, n, measure=measure, max_memory=budget)
                    except MemoryBudgetError as e:
                        print(f"| {name} | {n:.0e} | {b} | {measure} | does not fit: "
                              f"{str(e).split('; ')[0]} | | | | | |")
                        continue
                    print(f"| {name} | {n:.0e} | {b} | {measure} | {p.strategy} | {p.passes} "
                          f"| {_human(p.peak_bytes)} | {_human(p.bytes_read)} "
                          f"({p.bytes_read / p.bytes_selected:.0f}×) | {p.flops:.1e} "
                          f"| {p.estimated_seconds / 3600:.1f} h |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    ap.add_argument("--parts", nargs="*", default=["gram", "tiled", "growth", "arithmetic"],
                    choices=["gram", "tiled", "growth", "arithmetic"])
    ap.add_argument("--out", default="bench-results/bench_scale.png", help="the plot")
    ap.add_argument("--json", default=None, help="write all figures as JSON here")
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.store, json.loads(args.opts))
        return 0
    from layerscope.planner import gemm_rate

    dgemm, sgemm = gemm_rates()
    k64, k32 = 2 * gemm_rate("float64") / 1e9, 2 * gemm_rate("float32") / 1e9
    print(f"# bench_scale: {os.cpu_count()} CPUs; numpy dgemm {dgemm:.0f} GFLOP/s, sgemm "
          f"{sgemm:.0f} GFLOP/s; layerscope packed kernel f64 {k64:.0f}, f32 {k32:.0f} GFLOP/s")
    print(roofline_line(dgemm, sgemm, {"packed kernel": (k32, "f32"),
                                       "packed kernel ": (k64, "f64")}))
    report: dict[str, Any] = {"cpus": os.cpu_count(), "dgemm_gflops": dgemm,
                              "sgemm_gflops": sgemm, "kernel_f64_gflops": k64,
                              "kernel_f32_gflops": k32}
    with tempfile.TemporaryDirectory() as tmp:
        if "gram" in args.parts:
            part_gram(Path(tmp), args.quick, report)
            import shutil

            shutil.rmtree(Path(tmp) / "gram")
        if "tiled" in args.parts:
            part_tiled(Path(tmp), args.quick, report)
    if "growth" in args.parts:
        part_growth(args.quick, report, Path(args.out))
    if "arithmetic" in args.parts:
        part_arithmetic([None, "64G"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
