"""Activation store throughput and memory against what a user would otherwise do.

Data: ``L`` layers × ``D`` features × ``N`` rows (default 4 × 768 × 200 000; ``--quick``:
4 × 768 × 10 000), LLM-like (per-feature offsets of ~300× the spread), stored as f16, bf16
and f32. All throughputs are **stored payload bytes per second** (layers only, GB = 1e9 B)
with the files in the OS page cache (written just before; a cold-cache read is bounded by
the disk instead).

* write: ``layerscope.write_store`` (sha256 + fsync of every shard and manifest, atomic
  renames) vs ``safetensors.numpy.save_file`` of one file and ``np.save`` per layer (both
  followed by an fsync so that all three reach the disk).
* read everything as float32: ``store.read(layer)`` for every layer vs loading every shard
  with ``safetensors.numpy.load_file`` + ``np.concatenate`` + ``astype(float32)`` (for bf16:
  ``safetensors.torch.load_file`` + ``torch.cat`` + ``.float()``) vs ``np.load(mmap_mode='r')``
  + ``astype(float32)``.
* stream all layers as float32 blocks of ``--block-rows`` rows: ``store.blocks()`` (fresh
  arrays per block, and ``reuse=True``: one set of buffers refilled) vs
  slicing ``np.load(mmap_mode='r')`` arrays block by block + ``astype``.
* baselines in memory (same run): a plain copy of the stored payload (``np.copy``) and an
  in-memory ``astype(float32)`` of it.

Every read runs in a fresh subprocess, which resets the kernel's peak-RSS mark just before
the timed work (imports done, nothing loaded; ``/proc/self/clear_refs``) and reports the peak
(``VmHWM``, which counts mapped file pages as well as allocations) minus the RSS it had then:
"peak extra RSS", what the method costs in memory. Linux only; elsewhere it is omitted.

    python benches/bench_store.py --quick [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import gemm_rates, peak_mib, reset_peak, roofline_line, status_bytes

GB = 1e9


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_data(layers: int, dim: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        x += (300.0 * rng.standard_normal(dim)).astype(np.float32)
        out[f"layer.{i}"] = x
    return out


def _to_dtype(x: np.ndarray, dtype: str) -> Any:
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x).to(torch.bfloat16)
    return x.astype(dtype)


# ----------------------------------------------------------------------------- workers
def _worker(method: str, base: str, dtype: str, block_rows: int) -> dict[str, Any]:
    """One timed read in this (fresh) process; returns seconds and peak extra RSS."""
    import layerscope as ls

    root = Path(base)
    store = root / f"ls_{dtype}"
    layers = ls.open(store).layers
    if method.startswith("st_") and dtype == "bfloat16":
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401  (import cost outside the timing)
    elif method.startswith("st_"):
        import safetensors.numpy  # noqa: F401
    prep: Any = None
    if method.startswith("mem_"):  # the stored payload, in memory (not timed)
        s = ls.open(store)
        prep = []
        for n in layers:
            x = s.read(n)
            if dtype == "float16":
                x = x.astype(np.float16)
            elif dtype == "bfloat16":  # exact: the values are bf16 numbers
                x = (x.view(np.uint32) >> 16).astype(np.uint16)
            prep.append(x)
        del s, x
    rss0 = (status_bytes("VmRSS") or 0) / 2**20 or peak_mib()
    reset = reset_peak()
    t0 = time.perf_counter()
    checksum = 0.0
    if method == "ls_read":
        s = ls.open(store)
        out = [s.read(n, dtype=np.float32) for n in layers]
        checksum = float(sum(o[-1, -1] for o in out))
    elif method in ("ls_blocks", "ls_blocks_reuse"):
        s = ls.open(store)
        reuse = method == "ls_blocks_reuse"
        for _, blk in s.blocks(block_rows=block_rows, dtype=np.float32, reuse=reuse):
            checksum += float(sum(b[-1, -1] for b in blk.values()))
    elif method == "st_load":
        s = ls.open(store)
        files = [store / sh["file"] for sh in s.shards]
        if dtype == "bfloat16":
            import torch
            from safetensors.torch import load_file

            parts = [load_file(str(f)) for f in files]
            out = [torch.cat([p[n] for p in parts]).float().numpy() for n in layers]
        else:
            from safetensors.numpy import load_file

            parts = [load_file(str(f)) for f in files]
            out = [np.concatenate([p[n] for p in parts]).astype(np.float32) for n in layers]
        del parts
        checksum = float(sum(o[-1, -1] for o in out))
    elif method == "npy_mmap":
        out = [
            np.load(root / f"npy_{dtype}" / f"{n}.npy", mmap_mode="r").astype(np.float32)
            for n in layers
        ]
        checksum = float(sum(o[-1, -1] for o in out))
    elif method == "npy_mmap_blocks":
        arrs = [np.load(root / f"npy_{dtype}" / f"{n}.npy", mmap_mode="r") for n in layers]
        rows = arrs[0].shape[0]
        for a in range(0, rows, block_rows):
            blk = [x[a : a + block_rows].astype(np.float32) for x in arrs]
            checksum += float(sum(b[-1, -1] for b in blk))
    elif method == "mem_copy":
        out = [np.copy(p) for p in prep]
        checksum = float(sum(float(o[-1, -1]) for o in out))
    elif method == "mem_astype":
        if dtype == "bfloat16":
            out = [(p.astype(np.uint32) << 16).view(np.float32) for p in prep]
        else:
            out = [p.astype(np.float32) for p in prep]
        checksum = float(sum(o[-1, -1] for o in out))
    else:
        raise SystemExit(f"unknown method {method}")
    secs = time.perf_counter() - t0
    # ru_maxrss counts file pages mapped by mmap as well as allocations. The in-memory
    # baselines allocate their input before the timing, so their peak says nothing.
    extra = None if prep is not None or not reset else max(peak_mib() - rss0, 0.0)
    return {"seconds": secs, "peak_extra_rss_mb": extra, "checksum": checksum}


def _run_worker(method: str, base: Path, dtype: str, block_rows: int, repeats: int) -> dict:
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        r = subprocess.run(
            [sys.executable, __file__, "--worker", method, str(base), dtype, str(block_rows)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        if r.returncode != 0:
            raise RuntimeError(f"worker {method} {dtype} failed:\n{r.stderr}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if best is None or res["seconds"] < best["seconds"]:
            best = res
    assert best is not None
    return best


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 000 rows, best of 2 (< 60 s)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--block-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, base, dtype, br = args.worker
        print(json.dumps(_worker(method, base, dtype, int(br))))
        return 0

    import layerscope as ls
    from safetensors.numpy import save_file

    rows = args.rows or (10_000 if args.quick else 200_000)
    repeats = args.repeats or (2 if args.quick else 3)
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_store_"))
    base.mkdir(parents=True, exist_ok=True)
    dtypes = ["float16", "bfloat16", "float32"]
    print(
        f"bench_store: {args.layers} layers x {args.dim} x {rows} rows, block_rows "
        f"{args.block_rows}, best of {repeats}, {os.cpu_count()} CPUs, page cache warm"
    )
    t_start = time.perf_counter()
    data32 = _make_data(args.layers, args.dim, rows)
    results: dict[str, Any] = {
        "config": {
            "layers": args.layers,
            "dim": args.dim,
            "rows": rows,
            "block_rows": args.block_rows,
            "repeats": repeats,
            "quick": args.quick,
        },
        "write": {},
        "read": {},
    }
    try:
        for dtype in dtypes:
            data = {k: _to_dtype(v, dtype) for k, v in data32.items()}
            itemsize = 2 if dtype in ("float16", "bfloat16") else 4
            payload = args.layers * args.dim * rows * itemsize
            w: dict[str, float] = {}
            for _ in range(repeats):
                t = time.perf_counter()
                ls.write_store(base / f"ls_{dtype}", data, overwrite=True)
                w["layerscope.write_store"] = min(
                    w.get("layerscope.write_store", 1e9), time.perf_counter() - t
                )
                if dtype != "bfloat16":  # numpy has no bfloat16
                    f = base / f"st_{dtype}.safetensors"
                    t = time.perf_counter()
                    save_file(data, str(f))
                    _fsync(f)
                    w["safetensors.save_file"] = min(
                        w.get("safetensors.save_file", 1e9), time.perf_counter() - t
                    )
                    os.remove(f)
                    d = base / f"npy_{dtype}"
                    d.mkdir(exist_ok=True)
                    t = time.perf_counter()
                    for k, v in data.items():
                        np.save(d / f"{k}.npy", v)
                        _fsync(d / f"{k}.npy")
                    w["np.save"] = min(w.get("np.save", 1e9), time.perf_counter() - t)
            results["write"][dtype] = {
                k: {"seconds": v, "gb_per_s": payload / v / GB} for k, v in w.items()
            }
            del data
            methods = ["ls_read", "ls_blocks", "ls_blocks_reuse", "st_load", "mem_copy", "mem_astype"]
            if dtype != "bfloat16":
                methods[3:3] = ["npy_mmap", "npy_mmap_blocks"]
            r: dict[str, Any] = {}
            for m in methods:
                res = _run_worker(m, base, dtype, args.block_rows, repeats)
                res["gb_per_s"] = payload / res["seconds"] / GB
                r[m] = res
            results["read"][dtype] = {"payload_bytes": payload, **r}
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)

    names = {
        "ls_read": "layerscope store.read (all layers, f32)",
        "ls_blocks": "layerscope store.blocks (stream, f32)",
        "ls_blocks_reuse": "layerscope store.blocks(reuse=True)",
        "st_load": "safetensors load_file+concat+astype",
        "npy_mmap": "np.load(mmap)+astype (all)",
        "npy_mmap_blocks": "np.load(mmap) blocks+astype (stream)",
        "mem_copy": "in-memory copy of the payload",
        "mem_astype": "in-memory astype(float32)",
    }
    for dtype in dtypes:
        print(f"\n== {dtype}: payload {results['read'][dtype]['payload_bytes'] / GB:.3f} GB")
        for k, v in results["write"][dtype].items():
            print(f"  write {k:<40} {v['gb_per_s']:7.2f} GB/s  {v['seconds']:7.3f} s")
        rd = results["read"][dtype]
        for k, label in names.items():
            if k in rd:
                v = rd[k]
                mem = v["peak_extra_rss_mb"]
                mem_s = "" if mem is None else f"  peak extra RSS {mem:8.1f} MB"
                print(
                    f"  read  {label:<40} {v['gb_per_s']:7.2f} GB/s  {v['seconds']:7.3f} s{mem_s}"
                )
        lb = rd["ls_blocks"]["gb_per_s"]
        lr = rd["ls_blocks_reuse"]["gb_per_s"]
        ratios = {
            "blocks(reuse) / safetensors load": lr / rd["st_load"]["gb_per_s"],
            "blocks(reuse) / in-memory copy": lr / rd["mem_copy"]["gb_per_s"],
            "blocks / safetensors load": lb / rd["st_load"]["gb_per_s"],
            "blocks / in-memory copy": lb / rd["mem_copy"]["gb_per_s"],
            "blocks / in-memory astype": lb / rd["mem_astype"]["gb_per_s"],
            "read / safetensors load": rd["ls_read"]["gb_per_s"] / rd["st_load"]["gb_per_s"],
        }
        if "npy_mmap" in rd:
            ratios["read / np.load(mmap)+astype"] = (
                rd["ls_read"]["gb_per_s"] / rd["npy_mmap"]["gb_per_s"]
            )
            ratios["blocks / npy mmap blocks"] = lb / rd["npy_mmap_blocks"]["gb_per_s"]
        wr = results["write"][dtype]
        if "safetensors.save_file" in wr:
            ratios["write / safetensors.save_file"] = (
                wr["layerscope.write_store"]["gb_per_s"] / wr["safetensors.save_file"]["gb_per_s"]
            )
            ratios["write / np.save"] = (
                wr["layerscope.write_store"]["gb_per_s"] / wr["np.save"]["gb_per_s"]
            )
        rd["ratios"] = ratios
        print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    results["seconds_total"] = time.perf_counter() - t_start
    print(roofline_line(*gemm_rates()) + " (no FMA kernel here: this benchmark is bound by "
          "memory and I/O bandwidth, in GB/s above)")
    print(f"\ntotal {results['seconds_total']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
