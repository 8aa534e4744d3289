"""``layerscope.convert`` against the loop a user writes by hand, on the dumps people have.

Data (default; ``--quick`` shrinks it ~16×): ``--files`` safetensors files of ``L`` bf16 layers
``[B, T, d]`` (13 × [64, 256, 768], 4 files: 65 536 token rows, 1.3 GB), and one ``.npy`` per
layer of the same rows in float32 ``[N, d]``. Every contender writes a bf16 (safetensors) or
float32 (npy) store of every token row, in a fresh subprocess (peak RSS above the RSS after
the imports: what the method costs in memory).

* safetensors: ``layerscope.convert(glob)`` vs ``safetensors.torch.load_file`` of each file +
  ``reshape`` + ``StoreWriter.append`` (the hand-written loop: correct, bit-exact, whole files
  in memory).
* npy: ``layerscope.convert(folder)`` (row blocks through memory maps) vs ``np.load`` of each
  layer + ``StoreWriter.append`` per layer block (whole arrays in memory).

Throughput is source bytes per second (GB = 1e9 B), files in the page cache (written just
before).

    python benches/bench_convert.py --quick
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


def _convert(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    src = os.path.join(path, opts["pattern"])
    t = time.perf_counter()
    st = layerscope.convert(src, os.path.join(path, "out-convert"), progress=False,
                            overwrite=True)
    return {"seconds": time.perf_counter() - t, "rows": st.num_rows}


def _loop_safetensors(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import glob

    import layerscope
    from safetensors.torch import load_file

    t = time.perf_counter()
    out = os.path.join(path, "out-loop")
    shutil.rmtree(out, ignore_errors=True)
    with layerscope.StoreWriter(out, dtype="bfloat16") as w:
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            d = load_file(f)
            w.append({k: v.reshape(-1, v.shape[-1]) for k, v in d.items()})
        st = w.close()
    return {"seconds": time.perf_counter() - t, "rows": st.num_rows}


def _loop_npy(path: str, opts: dict[str, Any]) -> dict[str, Any]:
    import layerscope

    t = time.perf_counter()
    out = os.path.join(path, "out-loop")
    shutil.rmtree(out, ignore_errors=True)
    names = sorted(Path(path, "npy").glob("*.npy"))
    arrays = {p.stem: np.load(p) for p in names}
    with layerscope.StoreWriter(out) as w:
        n = next(iter(arrays.values())).shape[0]
        for lo in range(0, n, 8192):
            w.append({k: a[lo:lo + 8192] for k, a in arrays.items()})
        st = w.close()
    return {"seconds": time.perf_counter() - t, "rows": st.num_rows}


METHODS = {"convert": _convert, "loop-safetensors": _loop_safetensors, "loop-npy": _loop_npy}


def _make(path: Path, files: int, layers: int, b: int, t: int, d: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    (path / "npy").mkdir(parents=True)
    npy: dict[str, list[np.ndarray]] = {f"layer.{i}": [] for i in range(layers)}
    for f in range(files):
        batch = {f"layer.{i}": torch.randn(b, t, d, generator=g).to(torch.bfloat16)
                 for i in range(layers)}
        save_file(batch, str(path / f"batch-{f}.safetensors"))
        for k, v in batch.items():
            npy[k].append(v.reshape(-1, d).float().numpy())
    for k, parts in npy.items():
        np.save(path / "npy" / f"{k}.npy", np.concatenate(parts))
    st_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    npy_bytes = sum(p.stat().st_size for p in (path / "npy").glob("*.npy"))
    return st_bytes, npy_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--store", default=None)
    ap.add_argument("--opts", default="{}")
    args = ap.parse_args()
    if args.child:
        child(METHODS, args.child, args.store, json.loads(args.opts), torch=True)
        return 0
    layers, b, t, d = (13, 64, 256, 768) if not args.quick else (13, 16, 64, 768)
    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        st_bytes, npy_bytes = _make(tmp, args.files, layers, b, t, d)
        rows = args.files * b * t
        print(f"{args.files} safetensors files of {layers} bf16 layers [{b}, {t}, {d}] = "
              f"{rows} token rows, {st_bytes / 1e9:.2f} GB; npy: {npy_bytes / 1e9:.2f} GB f32")
        results = {}
        for label, method, opts, size in (
                ("safetensors: convert", "convert", {"pattern": "batch-*.safetensors"},
                 st_bytes),
                ("safetensors: load_file + StoreWriter", "loop-safetensors", {}, st_bytes),
                ("npy: convert", "convert", {"pattern": "npy"}, npy_bytes),
                ("npy: np.load + StoreWriter", "loop-npy", {}, npy_bytes)):
            r = run_child(__file__, method, str(tmp), opts)
            results[label] = r
            if "skipped" in r:
                print(f"  {label:40s} skipped: {r['skipped']}")
                continue
            assert r["rows"] == rows, r
            print(f"  {label:40s} {r['seconds']:6.2f} s  {size / 1e9 / r['seconds']:5.2f} GB/s"
                  f"  peak +{r['peak_extra_mb']:7.0f} MiB")
        for fmt in ("safetensors", "npy"):
            conv = results[f"{fmt}: convert"]
            loop = next(v for k, v in results.items() if k.startswith(fmt) and k != f"{fmt}: "
                        "convert")
            if "seconds" in conv and "seconds" in loop:
                print(f"  {fmt}: convert is {loop['seconds'] / conv['seconds']:.2f}x the loop's "
                      f"speed at {conv['peak_extra_mb'] / max(loop['peak_extra_mb'], 1):.2f}x "
                      "its peak memory")
        print("  " + roofline_line(*gemm_rates()) + " (no FMA kernel here: conversion is "
              "bound by I/O and memory bandwidth, in GB/s above)")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
