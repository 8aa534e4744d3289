"""What every benchmark measures the same way: memory from ``/proc/self/status`` (peak RSS
as ``VmHWM``, resettable through ``/proc/self/clear_refs``), CPU seconds, wall time, and the
machine's GEMM rates measured by numpy in the same run (the roofline each kernel is
compared with). Imported as ``from _common import ...`` (the benches run as scripts)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_mib() -> float:
    """Current resident set size (MiB), or ``ru_maxrss`` where /proc is missing."""
    b = status_bytes("VmRSS")
    return (b if b is not None else _maxrss_bytes()) / 2**20


def peak_mib() -> float:
    """Peak RSS (MiB): ``VmHWM``, per address space (``ru_maxrss`` is carried across fork +
    exec from the parent, so a child's would start at the bench process's own peak)."""
    b = status_bytes("VmHWM")
    return (b if b is not None else _maxrss_bytes()) / 2**20


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU seconds of this process, all threads (robust to other load on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(f: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``f``."""
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def gemm_rate(size: int = 2048, dtype: Any = np.float64, repeats: int = 3) -> float:
    """numpy's GEMM rate in GFLOP/s on ``size``² matrices of ``dtype`` (best of ``repeats``,
    after one warm-up)."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def gemm_rates(size: int = 2048) -> tuple[float, float]:
    """numpy dgemm and sgemm GFLOP/s on ``size``² (best of 3)."""
    return gemm_rate(size, np.float64), gemm_rate(size, np.float32)


_ROOF: dict[str, Any] | None = None


def roofline() -> dict[str, Any]:
    """The machine's FMA roofline (``layerscope._native.roofline``, measured once per
    process): clock from a chain of dependent adds, FMA units from a register-only FMA test,
    vector width of the packed kernels' ISA."""
    global _ROOF
    if _ROOF is None:
        from layerscope import _native

        _ROOF = dict(_native.roofline())
    return _ROOF


def roofline_line(dgemm: float, sgemm: float,
                  kernels: dict[str, tuple[float, str]] | None = None) -> str:
    """One printable line: the machine's FMA peak (cores × clock × FMA units × lanes × 2,
    each stated), numpy's sgemm/dgemm measured in the same run as fractions of it, and each
    kernel's GFLOP/s (``name: (gflops, "f32" | "f64")``) as a fraction of the peak and of
    numpy's GEMM of its precision."""
    r = roofline()
    p32, p64 = r["peak_f32_gflops"], r["peak_f64_gflops"]
    parts = [
        f"# roofline: {r['cores']} cores × {r['clock_ghz']:.2f} GHz (measured) × "
        f"{r['fma_units']} FMA units × {r['lanes_f32']} f32 lanes ({r['kernel']}) × 2 = "
        f"{p32:.0f} GFLOP/s f32, {p64:.0f} f64; numpy sgemm {sgemm:.0f} ({sgemm / p32:.0%} "
        f"of peak), dgemm {dgemm:.0f} ({dgemm / p64:.0%})"
    ]
    for name, (gf, prec) in (kernels or {}).items():
        peak, ref, refname = (p64, dgemm, "dgemm") if prec == "f64" else (p32, sgemm, "sgemm")
        parts.append(f"{name} {gf:.0f} GFLOP/s {prec} = {gf / peak:.0%} of peak, "
                     f"{gf / ref:.0%} of {refname}")
    return "; ".join(parts)


def child(methods: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]], method: str,
          path: str, opts: dict[str, Any], torch: bool = False) -> None:
    """Run one contender in this (child) process and print its result: ``RESULT {json}``
    with ``peak_extra_mb``, the peak RSS above the baseline taken after the imports
    (``torch``: import torch before the baseline too). A missing package or an out-of-memory
    becomes ``{"skipped": why}``."""
    import layerscope  # noqa: F401  (imports happen before the RSS baseline)

    if torch:
        import torch as _torch  # noqa: F401
    base = rss_mib()
    try:
        out = methods[method](path, opts)
    except ImportError as e:
        out = {"skipped": f"not installed: {e.name}"}
    except MemoryError:
        out = {"skipped": "out of memory"}
    out["peak_extra_mb"] = peak_mib() - base
    print("RESULT " + json.dumps(out))


def run_child(script: str, method: str, path: str, opts: dict[str, Any]) -> dict[str, Any]:
    """``script --child METHOD --store PATH --opts JSON`` in a fresh process (its own peak
    RSS); the dict it printed, or ``{"skipped": why}``."""
    cmd = [sys.executable, script, "--child", method, "--store", path, "--opts",
           json.dumps(opts)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"skipped": f"failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"}
