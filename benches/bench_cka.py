"""All-pairs CKA: layerscope against the best alternatives a user has, in one run.

Workload (issue 4): L = 13 layers × d = 768 (BERT-base-like, with per-feature mean offsets of
about 100× the spread), n rows, stored as bf16. Every method computes the full L × L matrix.

* ``layerscope``: ``layerscope.cka(store, compute="float64")`` — one streamed pass (biased
  **and** debiased), every product in f64; ``layerscope_f32``: ``compute="float32"`` (f32
  block products, f64 accumulation) — what ``layerscope.cka(store)`` does by default
  (``compute="auto"``) on this bf16 store.
* ``numpy_f64``: the well-written numpy reference — all layers in memory as one centred f64
  ``Z`` (n × D), ``C = ZᵀZ`` accumulated over row blocks, then the same formulas.
* ``torch_f64`` / ``torch_f32``: the same in torch on the CPU (f32: centred in f32, so less
  accurate — its max error against f64 is printed).
* ``pytorch-cka`` (PyPI ``pytorch-cka``, ``cka.cka_from_features``): one n × n f32 Gram per
  layer, unbiased HSIC, clamped to [0, 1]. ``ckatorch`` (``ckatorch.cka_base``, f64, one
  pair at a time): a few pairs are timed and the total is extrapolated (labelled).
  ``make bench`` installs them (``make bench-deps``); missing ones are skipped.

Each method runs in its own child process so that its peak RSS (``VmHWM`` minus the
child's RSS before the method) is its own. Reported: seconds, ratio to layerscope, achieved
GFLOP/s on the symmetric product (``n·D²`` flops for ``ZᵀZ`` by SYRK) against the machine's
dgemm and sgemm rates measured by numpy in the same run, peak extra RSS, and the max
absolute difference from the numpy f64 values.

Also: RBF CKA on a sample of m rows (layerscope vs a numpy Gram reference) and minibatch CKA
(linear and RBF, batch 256) timings.

``--quick`` (about a minute on 2 shared cores): n = 1024, d = 384, m = 512. Default: n = 32768, m = 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common
import numpy as np
from _common import gemm_rates

L_DEFAULT, D_DEFAULT = 13, 768


# ----------------------------------------------------------------------------------------
# data


def make_store(path: Path, n: int, nl: int, d: int, seed: int = 0) -> None:
    """A bf16 store of nl layers: a residual stream h_{l+1} = h_l + tanh(h_l W_l)/2 with
    per-feature offsets ~100× the spread added to what is stored."""
    from layerscope.store import StoreWriter

    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d) for _ in range(nl)]
    offs = [rng.uniform(-100, 100, d).astype(np.float32) for _ in range(nl)]
    with StoreWriter(path, dtype="bfloat16", shard_bytes=128 << 20) as w:
        for s in range(0, n, 4096):
            m = min(4096, n - s)
            h = rng.standard_normal((m, d)).astype(np.float32)
            blk = {}
            for i in range(nl):
                blk[f"layer{i:02d}"] = h + offs[i]
                h = h + np.tanh(h @ ws[i]) * 0.5
            w.append(blk)


def load_f64(path: str, dtype: Any = np.float64) -> list[np.ndarray]:
    import layerscope

    s = layerscope.open(path)
    return [s.read(x, dtype=dtype) for x in s.layers]


# ----------------------------------------------------------------------------------------
# methods (each runs in a child)


def cka_from_cov(c: np.ndarray, dims: list[int]) -> np.ndarray:
    o = np.cumsum([0, *dims])
    nl = len(dims)
    sq = np.empty((nl, nl))
    for i in range(nl):
        for j in range(i, nl):
            v = float(np.sum(c[o[i] : o[i + 1], o[j] : o[j + 1]] ** 2))
            sq[i, j] = sq[j, i] = v
    dg = np.sqrt(np.diag(sq))
    return sq / np.outer(dg, dg)


def _layerscope(path: str, _: dict[str, Any], compute: str) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    res = layerscope.cka(path, compute=compute, progress=False)
    dt = time.perf_counter() - t
    return {
        "seconds": dt,
        "values": res.values.tolist(),
        "debiased_same_pass": res.extra["debiased"].tolist(),
        "note": f"compute={compute}; pass {res.meta['timings']['pass']:.2f}s "
        "(read+accumulate+finalize)",
    }


def m_numpy_f64(path: str, _: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    xs = load_f64(path, np.float32)
    t1 = time.perf_counter()
    dims = [x.shape[1] for x in xs]
    z = np.concatenate(xs, axis=1, dtype=np.float64)
    del xs
    z -= z.mean(axis=0)
    c = np.zeros((z.shape[1], z.shape[1]))
    for s in range(0, z.shape[0], 8192):
        b = z[s : s + 8192]
        c += b.T @ b
    vals = cka_from_cov(c, dims)
    t2 = time.perf_counter()
    return {"seconds": t2 - t1, "load_seconds": t1 - t0, "values": vals.tolist()}


def _torch(path: str, _: dict[str, Any], dtype: str) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    xs = load_f64(path, np.float32)
    t1 = time.perf_counter()
    dims = [x.shape[1] for x in xs]
    dt = torch.float64 if dtype == "f64" else torch.float32
    z = torch.cat([torch.from_numpy(x) for x in xs], dim=1).to(dt)
    del xs
    z -= z.mean(dim=0)
    c = z.T @ z
    vals = cka_from_cov(c.double().numpy(), dims)
    t2 = time.perf_counter()
    return {"seconds": t2 - t1, "load_seconds": t1 - t0, "values": vals.tolist()}


def m_pytorch_cka(path: str, _: dict[str, Any]) -> dict[str, Any]:
    import torch
    from cka import cka_from_features  # PyPI pytorch-cka

    t0 = time.perf_counter()
    xs = [torch.from_numpy(x) for x in load_f64(path, np.float32)]
    t1 = time.perf_counter()
    with torch.no_grad():
        vals = cka_from_features(xs, xs).double().numpy()
    return {
        "seconds": time.perf_counter() - t1,
        "load_seconds": t1 - t0,
        "values": vals.tolist(),
        "note": "unbiased HSIC, f32, clamped to [0, 1]",
    }


def m_ckatorch(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import torch
    from ckatorch import cka_base

    xs = [torch.from_numpy(x) for x in load_f64(path, np.float32)]
    nl = len(xs)
    pairs = [(i, j) for i in range(nl) for j in range(i + 1, nl)]
    k = min(len(pairs), opts.get("ckatorch_pairs", 3))
    t = time.perf_counter()
    got = {}
    with torch.no_grad():
        for i, j in pairs[:k]:
            got[f"{i},{j}"] = float(cka_base(xs[i], xs[j]))
    per = (time.perf_counter() - t) / k
    return {
        "seconds": per * len(pairs),
        "extrapolated_from_pairs": k,
        "pairs": got,
        "note": f"{k} of {len(pairs)} pairs timed, total extrapolated",
    }


def m_rbf_layerscope(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    res = layerscope.cka(path, kernel="rbf", sample=opts["m"], seed=0, progress=False)
    return {"seconds": time.perf_counter() - t, "values": res.values.tolist()}


def m_rbf_numpy(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope
    from layerscope._sample import sample_indices

    s = layerscope.open(path)
    idx = sample_indices(s.num_rows, opts["m"], 0)
    t = time.perf_counter()
    grams = []
    for x in s.layers:
        a = s.take(x, idx, dtype=np.float64)
        a = a - a.mean(0)
        sq = (a * a).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (a @ a.T), 0)
        np.fill_diagonal(d2, 0)
        k = np.exp(-d2 / (2 * np.median(d2)))
        k -= k.mean(0)
        k -= k.mean(1)[:, None]
        grams.append(k)
    nl = len(grams)
    h = np.array([[np.vdot(grams[i], grams[j]) for j in range(nl)] for i in range(nl)])
    dg = np.sqrt(np.diag(h))
    vals = h / np.outer(dg, dg)
    return {"seconds": time.perf_counter() - t, "values": vals.tolist()}


def m_minibatch_linear(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    res = layerscope.cka(path, estimator="minibatch", batch_size=256, progress=False)
    return {
        "seconds": time.perf_counter() - t,
        "values": res.values.tolist(),
        "batches": res.meta["n_batches"],
    }


def m_minibatch_rbf(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    res = layerscope.cka(path, kernel="rbf", estimator="minibatch", batch_size=256, progress=False)
    return {
        "seconds": time.perf_counter() - t,
        "values": res.values.tolist(),
        "batches": res.meta["n_batches"],
    }


def m_minibatch_torch(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Minibatch linear CKA written well in torch f64: per batch, centred Grams of all layers
    (bmm), unbiased HSIC of all pairs with einsum (Nguyen et al. 2021)."""
    import torch

    xs = load_f64(path, np.float32)
    t = time.perf_counter()
    nl, n, bs = len(xs), xs[0].shape[0], 256
    hs = torch.zeros((nl, nl), dtype=torch.float64)
    for s in range(0, n - 3, bs):
        g = []
        for x in xs:
            b = torch.from_numpy(x[s : s + bs]).double()
            b = b - b.mean(0)
            k = b @ b.T
            k.fill_diagonal_(0)
            g.append(k)
        k = torch.stack(g)
        m = k.shape[-1]
        if m < 4:
            continue
        tr = torch.einsum("aij,bij->ab", k, k)
        rs = k.sum(-1)
        tot = rs.sum(-1)
        hs += (tr + torch.outer(tot, tot) / ((m - 1) * (m - 2)) - 2 / (m - 2) * rs @ rs.T) / (
            m * (m - 3)
        )
    dg = torch.sqrt(torch.diag(hs))
    vals = (hs / torch.outer(dg, dg)).numpy()
    return {"seconds": time.perf_counter() - t, "values": vals.tolist()}


#: Every contender by name, in the order they run (the layerscope and torch ones at both
#: precisions from one function each).
METHODS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "layerscope": partial(_layerscope, compute="float64"),
    "layerscope_f32": partial(_layerscope, compute="float32"),
    "numpy_f64": m_numpy_f64,
    "torch_f64": partial(_torch, dtype="f64"),
    "torch_f32": partial(_torch, dtype="f32"),
    **{k[2:]: v for k, v in globals().items() if k.startswith("m_") and k != "m_numpy_f64"},
}


TORCH_METHODS = {"torch_f64", "torch_f32", "pytorch_cka", "ckatorch", "minibatch_torch"}


def child(method: str, path: str, opts: dict[str, Any]) -> None:
    _common.child(METHODS, method, path, opts, torch=method in TORCH_METHODS)


# Bytes per n² that the Gram-based peers hold at once (f32 / f64 n × n Grams and centred
# copies; at n = 32768 on 24 GiB pytorch-cka was killed for memory and ckatorch thrashed at
# 19 GB resident), to skip them with a reason instead of swapping for hours.
GRAM_BYTES = {"pytorch_cka": 6 * 4, "ckatorch": 3 * 8}


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def run_child(method: str, path: str, opts: dict[str, Any]) -> dict[str, Any]:
    return _common.run_child(__file__, method, path, opts)


# ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small n (< 60 s)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--m", type=int, default=None, help="RBF sample rows")
    ap.add_argument("--layers", type=int, default=L_DEFAULT)
    ap.add_argument("--dim", type=int, default=None, help="width per layer (768; --quick 384)")
    ap.add_argument("--store", default=None, help="(child) the store path")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip")
    ap.add_argument("--json", default=None, help="write all figures as JSON here")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.store, json.loads(args.opts))
        return 0
    n = args.n or (1024 if args.quick else 32768)
    m = args.m or (512 if args.quick else 4096)
    nl, d = args.layers, args.dim or (384 if args.quick else D_DEFAULT)
    dsum = nl * d
    dgemm, sgemm = gemm_rates()
    print(
        f"# all-pairs CKA, L={nl} × d={d} (D={dsum}), n={n} rows, bf16 store; "
        f"{os.cpu_count()} CPUs; numpy dgemm {dgemm:.1f} GFLOP/s, sgemm {sgemm:.1f} GFLOP/s"
    )
    report: dict[str, Any] = {
        "n": n,
        "m": m,
        "layers": nl,
        "dim": d,
        "cpus": os.cpu_count(),
        "dgemm_gflops": dgemm,
        "sgemm_gflops": sgemm,
        "linear": {},
        "rbf": {},
        "minibatch": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "store")
        t = time.perf_counter()
        make_store(Path(path), n, nl, d)
        print(f"# store written in {time.perf_counter() - t:.1f} s")
        opts = {"m": m, "ckatorch_pairs": 1 if args.quick else 3}
        flops = n * dsum * dsum  # SYRK of Z (n × D): n·D² flops
        ref = None
        results = {}
        for meth in (
            "layerscope",
            "layerscope_f32",
            "numpy_f64",
            "torch_f64",
            "torch_f32",
            "pytorch_cka",
            "ckatorch",
        ):
            if meth in args.skip:
                continue
            need = GRAM_BYTES.get(meth, 0) * n * n
            if need > 0.8 * _available_bytes():
                results[meth] = {"skipped": (
                    f"needs about {need / 2**30:.0f} GiB of n×n Gram matrices (n = {n}), "
                    f"more than 80 % of the {_available_bytes() / 2**30:.0f} GiB available")}
                continue
            results[meth] = r = run_child(meth, path, opts)
            if meth == "numpy_f64" and "values" in r:
                ref = np.asarray(r["values"])
        ours = results.get("layerscope", {}).get("seconds")
        deb = None
        if "debiased_same_pass" in results.get("layerscope", {}):
            deb = np.asarray(results["layerscope"]["debiased_same_pass"])
        print(
            f"\n{'linear (biased)':<14} {'seconds':>9} {'ratio':>7} {'GFLOP/s':>8} "
            f"{'%dgemm':>7} {'%sgemm':>7} {'peak MB':>8} {'max|Δ| vs f64':>14}  notes (GFLOP/s = n·D² / seconds)"
        )
        for meth, r in results.items():
            if "skipped" in r:
                print(f"{meth:<14} skipped: {r['skipped']}")
                continue
            s = r["seconds"]
            gf = flops / s / 1e9
            err = ""
            if ref is not None and "values" in r:
                err = f"{np.nanmax(np.abs(np.asarray(r['values']) - ref)):.1e}"
            if meth == "pytorch_cka" and deb is not None and "values" in r:
                de = np.nanmax(np.abs(np.asarray(r["values"]) - deb))
                r["note"] += f"; max|Δ| vs debiased {de:.1e}"
            elif ref is not None and "pairs" in r:
                err = f"{max(abs(v - ref[tuple(map(int, k.split(',')))]) for k, v in r['pairs'].items()):.1e}"
            ratio = f"{s / ours:.2f}" if ours else "-"
            note = r.get("note", "")
            if "load_seconds" in r:
                note = f"+{r['load_seconds']:.1f}s load; {note}"
            print(
                f"{meth:<14} {s:>9.2f} {ratio:>7} {gf:>8.1f} {100 * gf / dgemm:>6.0f}% "
                f"{100 * gf / sgemm:>6.0f}% {r['peak_extra_mb']:>8.0f} {err:>14}  {note}"
            )
            report["linear"][meth] = {k: v for k, v in r.items() if k not in ("values",)}
            report["linear"][meth]["gflops"] = gf
        acc_mb = (dsum + nl) ** 2 * 8 / 2**20
        print(
            f"# accumulator (D+L)²·8 = {acc_mb:.0f} MB; bound n·D²/sgemm = "
            f"{flops / sgemm / 1e9:.2f} s, n·D²/dgemm = {flops / dgemm / 1e9:.2f} s; "
            "layerscope's time includes reading + bf16 conversion + debiased from the same pass"
        )
        if (
            ref is not None
            and "layerscope" in results
            and "debiased_same_pass" in results["layerscope"]
        ):
            deb = np.asarray(results["layerscope"]["debiased_same_pass"])
            print(
                f"# debiased (same pass) off-diagonal range {np.min(deb):.4f} .. "
                f"{np.max(deb[~np.eye(nl, dtype=bool)]):.4f}"
            )

        kern = {}
        for meth, prec in (("layerscope_f32", "f32"), ("layerscope", "f64")):
            if "seconds" in results.get(meth, {}):
                kern[f"cka {prec} pass"] = (flops / results[meth]["seconds"] / 1e9, prec)
        print(_common.roofline_line(dgemm, sgemm, kern))
        report["roofline"] = _common.roofline()
        f32 = results.get("layerscope_f32", {})
        if "seconds" in f32:
            parts = [f"# compute=float32: {flops / f32['seconds'] / 1e9:.1f} GFLOP/s, "
                     f"{f32['seconds'] / (flops / sgemm / 1e9):.2f}x the sgemm bound"]
            for peer in ("numpy_f64", "torch_f32"):
                if "seconds" in results.get(peer, {}):
                    parts.append(f"{peer} / it = {results[peer]['seconds'] / f32['seconds']:.2f}x")
            if "debiased_same_pass" in results.get("layerscope", {}):
                dd = np.nanmax(np.abs(np.asarray(f32["debiased_same_pass"])
                                      - np.asarray(results["layerscope"]["debiased_same_pass"])))
                parts.append(f"debiased max|Δ| vs float64 {dd:.1e}")
            print("; ".join(parts))

        # RBF and minibatch
        print(f"\n{'rbf / minibatch':<18} {'seconds':>9}  notes")
        extra = {}
        for meth in (
            "rbf_layerscope",
            "rbf_numpy",
            "minibatch_linear",
            "minibatch_torch",
            "minibatch_rbf",
        ):
            if meth in args.skip:
                continue
            extra[meth] = r = run_child(meth, path, opts)
            if "skipped" in r:
                print(f"{meth:<18} skipped: {r['skipped']}")
                continue
            note = f"peak +{r['peak_extra_mb']:.0f} MB"
            if meth.startswith("rbf"):
                note += f"; m={m} sampled rows"
            if "batches" in r:
                note += f"; {r['batches']} batches of 256"
            print(f"{meth:<18} {r['seconds']:>9.2f}  {note}")
        for a, b in (("rbf_layerscope", "rbf_numpy"), ("minibatch_linear", "minibatch_torch")):
            if "values" in extra.get(a, {}) and "values" in extra.get(b, {}):
                diff = np.max(
                    np.abs(np.asarray(extra[a]["values"]) - np.asarray(extra[b]["values"]))
                )
                print(
                    f"# {a} vs {b}: {extra[b]['seconds'] / extra[a]['seconds']:.2f}× "
                    f"faster, max|Δ| = {diff:.1e}"
                )
        for k, r in extra.items():
            report["rbf" if k.startswith("rbf") else "minibatch"][k] = {
                kk: v for kk, v in r.items() if kk != "values"
            }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
