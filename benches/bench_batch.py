"""``layerscope.batch`` against the loop a user writes by hand over checkpoints.

Data (default; ``--quick`` shrinks it): ``--stores`` bf16 "checkpoints" of ``L`` layers ×
``d`` over the same ``n`` rows (13 × 384, n = 8 192, 6 stores); the job: linear CKA of every
layer of each checkpoint against every layer of the last one (pairs="reference"), results
saved. Each contender runs in a fresh subprocess (peak RSS above the RSS after the imports).

* ``loop``: ``for s in stores: layerscope.cka(ref, s).save(...)`` — what a user writes; no
  table, no resume, no lock.
* ``batch, 1 worker`` / ``batch, 2 workers``: ``layerscope.batch(..., figures=False)`` — the
  same numbers plus the tidy table, per-item JSON, fingerprints and the lock.
* ``batch, resumed``: the same batch run again on its finished folder (every item skipped:
  the cost of checking fingerprints and rebuilding the table).
* ``figures``: index.html with every figure, timed on its own.

The FLOPs of the job (the planner's count for the plan each item runs under the whole
budget: ``layerscope.plan``; items run two at a time are planned within half of it and may
take another plan) against numpy's sgemm rate measured in the same run give the roofline
fraction.

    python benches/bench_batch.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child, gemm_rates, roofline_line, run_child  # noqa: E402


def _stores(path: str) -> list[str]:
    return sorted(str(p) for p in Path(path).glob("ckpt-*"))


def _loop(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    stores = _stores(path)
    out = Path(path) / "out-loop"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t = time.perf_counter()
    for s in stores[:-1]:
        layerscope.cka(stores[-1], s, progress=False).save(out / f"{Path(s).name}.json")
    return {"seconds": time.perf_counter() - t}


def _batch(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    stores = _stores(path)
    out = Path(path) / opts["out"]
    if opts.get("fresh", True):
        shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = layerscope.batch(stores, out=out, reference=stores[-1], workers=opts["workers"],
                           figures=opts.get("figures", False), progress=False)
    return {"seconds": time.perf_counter() - t, "computed": len(res.computed),
            "rows": len(res.rows)}


def _best(fn: Any) -> Any:
    """The contender run ``opts["repeat"]`` times in its process: the fastest run."""
    def run(path: str, opts: dict[str, Any]) -> dict[str, Any]:
        runs = [fn(path, opts) for _ in range(opts.get("repeat", 1))]
        return min(runs, key=lambda r: r["seconds"])

    return run


METHODS = {"loop": _best(_loop), "batch": _best(_batch)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data (about 15 s)")
    ap.add_argument("--stores", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender (fastest kept)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--store", default=None)
    ap.add_argument("--opts", default="{}")
    args = ap.parse_args()
    if args.child:
        child(METHODS, args.child, args.store, json.loads(args.opts))
        return
    import layerscope

    n, layers, d = (2048, 6, 256) if args.quick else (8192, 13, 384)
    tmp = tempfile.mkdtemp(prefix="bench-batch-")
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, d)).astype(np.float32)
        for s in range(args.stores):
            arrays = {}
            for li in range(layers):
                w = np.random.default_rng(li).standard_normal((d, d)).astype(np.float32)
                drift = np.random.default_rng(100 * s + li).standard_normal((d, d)) * 0.1 * s
                arrays[f"layer.{li}"] = np.tanh(x @ (w + drift.astype(np.float32)) / d**0.5)
            layerscope.write_store(os.path.join(tmp, f"ckpt-{s:02d}"), arrays, dtype="bfloat16")
        items = args.stores - 1
        stores = _stores(tmp)
        plan = layerscope.plan(stores[-1], stores[0])
        flops = items * plan.flops
        dgemm, sgemm = gemm_rates()
        print(f"{args.stores} bf16 stores of {layers} x {d}, n = {n}; {items} CKA items "
              f"(each {layers}x{layers} layer pairs); plan of one item: {plan.strategy}, "
              f"{plan.flops / 1e9:.0f} GFLOP, peak {plan.peak_bytes / 2**20:.0f} MiB; numpy "
              f"sgemm {sgemm:.0f} GFLOP/s, dgemm {dgemm:.0f} GFLOP/s in this run")
        script = os.path.abspath(__file__)
        runs = [
            ("loop of layerscope.cka + save", "loop", {}),
            ("batch, 1 worker", "batch", {"out": "b1", "workers": 1}),
            ("batch, 2 workers", "batch", {"out": "b2", "workers": 2}),
            ("batch, resumed (all done)", "batch", {"out": "b2", "workers": 2,
                                                    "fresh": False}),
            ("batch, resumed + figures", "batch", {"out": "b2", "workers": 2, "fresh": False,
                                                   "figures": True}),
        ]
        base = None
        kern: dict[str, tuple[float, str]] = {}
        print(f"{'contender':34s} {'seconds':>8s} {'vs loop':>8s} {'GFLOP/s':>8s} "
              f"{'of sgemm':>8s} {'peak MiB':>9s}")
        for name, method, opts in runs:
            r = run_child(script, method, tmp, {**opts, "repeat": args.repeat})
            if "skipped" in r:
                print(f"{name:34s} skipped: {r['skipped']}")
                continue
            sec = r["seconds"]
            base = sec if base is None else base
            computes = method == "loop" or r.get("computed")
            rate = flops / sec / 1e9 if computes else float("nan")
            print(f"{name:34s} {sec:8.2f} {sec / base:7.2f}x {rate:8.1f} "
                  f"{rate / sgemm:8.0%} {r['peak_extra_mb']:9.0f}")
            if computes and rate == rate:
                kern[name] = (rate, "f32")
        print(roofline_line(dgemm, sgemm, kern))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
