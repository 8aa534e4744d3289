"""The torch engine against the Rust CPU engine and plain torch (issue 33).

A bf16 store of ``L`` layers of width ``W`` and ``n`` rows with LLM-like per-feature offsets
(50–1000× the spread) is written once; then linear CKA (biased and debiased, all pairs) is
computed

* by the Rust CPU engine (``device=None``, ``compute="float32"``),
* by the torch engine on the device (``device=DEV``, ``compute="float32"`` and, on CUDA,
  ``"tf32"``),
* by plain torch on the same device, written well: every layer read and concatenated,
  centred, ``Zᵀ Z`` in f32 (TF32 off) — what the GPU peers (pytorch-cka, torchid) do,

and compared with an f64 reference (``Zᵀ Z`` of the centred data in f64 on the device, or
numpy on the CPU). Printed: the largest deviation from the reference, seconds, peak device
memory (CUDA) or peak RSS, and the throughput of the products as a fraction of the device's
f32 GEMM rate measured in this run (the useful work: the SYRK's ``n · D² / 2``
multiply-adds; a full ``Zᵀ Z`` GEMM does twice that, so it tops out at 50 %).

Defaults: the issue's 33 × 4096 bf16 store at n = 65 536 on a CUDA device; 8 × 512,
n = 16 384 without one (``--quick``: 4 × 256, n = 4096). ``--layers/--width/--rows``
override. Run from ``make bench`` or alone: ``python benches/bench_gpu.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_mib, reset_peak  # noqa: E402


def _store(path: Path, layers: int, width: int, rows: int) -> None:
    """LLM-like bf16 layers: offsets 50–1000× the spread, layers mixing a shared signal."""
    import layerscope

    rng = np.random.default_rng(0)
    chunk = 8192
    shared = rng.standard_normal((width, 64)).astype(np.float32)
    offsets = [(rng.uniform(50, 1000, width) * rng.choice([-1, 1], width)).astype(np.float32)
               for _ in range(layers)]
    with layerscope.StoreWriter(path, dtype="bfloat16", overwrite=True) as w:
        for r0 in range(0, rows, chunk):
            nb = min(chunk, rows - r0)
            z = rng.standard_normal((nb, 64)).astype(np.float32)
            w.append({f"layer{i:02d}": offsets[i] + z @ shared.T * (1 + i / layers)
                      + rng.standard_normal((nb, width)).astype(np.float32)
                      for i in range(layers)})


def _gemm_rate(torch: Any, dev: Any) -> float:
    """The device's f32 GEMM rate (TF32 off), GFLOP/s, best of 3 on 4096² (2048² on CPU)."""
    from layerscope._device.devices import precision

    size = 4096 if dev.type == "cuda" else 2048
    a = torch.randn(size, size, device=dev)
    with precision(torch, "float32"):
        a @ a
        best = float("inf")
        for _ in range(3):
            _sync(torch, dev)
            t = time.perf_counter()
            a @ a
            _sync(torch, dev)
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def _sync(torch: Any, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _mem(torch: Any, dev: Any) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB device"
    return f"{peak_mib():.0f} MiB RSS"


def _reset(torch: Any, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    reset_peak()


def _plain(torch: Any, dev: Any, store: Any, dtype: Any) -> np.ndarray:
    """Plain torch: concatenate, centre, ``Zᵀ Z``; biased linear CKA of every pair."""
    from layerscope._device.devices import precision

    names = list(store.layers)
    with precision(torch, "float32"), torch.no_grad():
        z = torch.cat([torch.from_numpy(store.read(x, dtype=np.float32)).to(dev)
                       for x in names], 1).to(dtype)
        z = z - z.mean(0)
        c = z.T @ z
        dims = [store.dims[x] for x in names]
        o = np.cumsum([0, *dims])
        nl = len(names)
        out = np.zeros((nl, nl))
        for i in range(nl):
            for j in range(nl):
                out[i, j] = float((c[o[i]:o[i + 1], o[j]:o[j + 1]].double() ** 2).sum())
        d = np.sqrt(np.diag(out))
        return out / np.outer(d, d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="torch device (default: cuda if seen)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-rust", action="store_true", help="skip the Rust CPU engine")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_gpu: torch is not installed; skipped")
        return 0
    import layerscope

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    layers, width, rows = (33, 4096, 65536) if cuda else ((4, 256, 4096) if args.quick
                                                          else (8, 512, 16384))
    layers = args.layers or layers
    width = args.width or width
    rows = args.rows or rows
    # the useful work: the SYRK's n·D²/2 multiply-adds (a full GEMM does twice that)
    flops = rows * (layers * width) ** 2
    rate = _gemm_rate(torch, dev)
    name = torch.cuda.get_device_name(dev) if cuda else "CPU (torch)"
    print(f"bench_gpu: {layers} × {width} bf16, n = {rows}, device {dev} ({name}); "
          f"f32 GEMM {rate:.0f} GFLOP/s (TF32 off, this run)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        t = time.perf_counter()
        _store(path, layers, width, rows)
        print(f"  store written in {time.perf_counter() - t:.1f} s "
              f"({layerscope.open(path).nbytes / 2**30:.2f} GiB)")
        store = layerscope.open(path)
        # the f64 reference: Zᵀ Z of the centred stored values in f64
        _reset(torch, dev)
        t = time.perf_counter()
        ref = _plain(torch, dev, store, torch.float64)
        print(f"  reference (f64 on {dev}): {time.perf_counter() - t:.1f} s")
        rows_out = []

        def run(label: str, f: Any, products: bool = True) -> None:
            _reset(torch, dev)
            _sync(torch, dev)
            t0 = time.perf_counter()
            v = f()
            _sync(torch, dev)
            sec = time.perf_counter() - t0
            err = float(np.nanmax(np.abs(v - ref)))
            frac = flops / sec / 1e9 / rate if products else float("nan")
            rows_out.append((label, sec, err, _mem(torch, dev), frac))

        kw: dict[str, Any] = dict(progress=False, estimator="biased")
        run(f"layerscope device={dev} float32",
            lambda: layerscope.cka(store, device=dev, compute="float32", **kw).values)
        if cuda:
            run(f"layerscope device={dev} tf32 (approx.)",
                lambda: layerscope.cka(store, device=dev, compute="tf32", **kw).values)
        if not args.no_rust:
            run("layerscope Rust CPU float32",
                lambda: layerscope.cka(store, compute="float32", **kw).values)
        run(f"plain torch on {dev} f32 (concat, centre, ZᵀZ)",
            lambda: _plain(torch, dev, store, torch.float32))
        print(f"  {'method':<46} {'seconds':>9} {'max |Δ| vs f64':>15} {'peak memory':>16} "
              f"{'SYRK / GEMM rate':>16}")
        for label, sec, err, mem, frac in rows_out:
            print(f"  {label:<46} {sec:9.2f} {err:15.2e} {mem:>16} {frac:16.0%}")
        base = rows_out[0][1]
        for label, sec, *_ in rows_out[1:]:
            print(f"  {label}: {sec / base:.2f}× the time of the device float32 run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
