"""One streaming pass of moments over a source (and optionally a second, row-aligned one).

Engine 1 of ``ARCHITECTURE.md``: every row is read once; the Rust accumulator
(``layerscope_core::engine::moments``) keeps, in f64 and on data shifted by a reference
mean, the upper triangle of ``Σ w wᵀ`` for ``w = [x_1 − μ0, …, x_L − μ0, ‖x_1 − μ0‖², …]``
over the concatenated layers. Finalised, it gives the centred cross-product matrix
``C = Σ_a (z_a − z̄)(z_a − z̄)ᵀ`` of all layers together (every ``C_ij`` at once) and the
squared-norm products the debiased CKA needs. Linear CKA, spectra, subspace alignment, CCA
and Procrustes are all functions of these moments, so one pass serves them all.

Memory: ``(D + L)² × 8`` bytes for the accumulator (``D`` = sum of the widths) plus a few
row blocks, independent of the number of rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _native
from ._progress import Progress
from ._source import Source, check_comparable, resolve
from .errors import InvalidArgumentError, MemoryBudgetError


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


COMPUTE = ("float64", "float32")


def check_compute(compute: str) -> str:
    """Validate the ``compute=`` option (arithmetic of the block products)."""
    if compute not in COMPUTE:
        raise InvalidArgumentError(f"compute must be 'float64' or 'float32', got {compute!r}")
    return compute


def plan(
    dims: Sequence[int], max_memory: int | None, compute: str = "float64"
) -> dict[str, Any]:
    """The memory plan of a moment pass over layers of widths ``dims``: accumulator bytes
    (``(D+L)² · 8``), default block rows, and whether it fits ``max_memory`` (with
    ``compute="float32"`` the pass also holds one ``D × D`` float32 partial product)."""
    acc = int(_native.accumulator_bytes(list(dims)))
    br = int(_native.default_block_rows(list(dims), check_compute(compute)))
    dz = sum(dims) + len(dims)
    need = acc + 2 * br * dz * 8
    if compute == "float32":
        need += sum(dims) ** 2 * 4
    out = {"accumulator_bytes": acc, "block_rows": br, "peak_bytes_estimate": need}
    if max_memory is not None and need > max_memory:
        raise MemoryBudgetError(
            f"the moment accumulator for {len(dims)} layers (D = {sum(dims)}) needs about "
            f"{_fmt_bytes(need)}, above max_memory = {_fmt_bytes(max_memory)}; options: "
            "select fewer layers per call (layers=..., and compare groups of layers in "
            "several calls), or raise max_memory"
        )
    return out


def compute_moments(
    source: Any,
    layers: Sequence[str] | str | None = None,
    other: Any = None,
    other_layers: Sequence[str] | str | None = None,
    *,
    progress: Any = True,
    max_memory: int | None = None,
    check_finite: bool = True,
    block_rows: int | None = None,
    compute: str = "float64",
) -> tuple[Any, dict[str, Any]]:
    """Stream every row of the selected layers once; return ``(Moments, meta)``.

    ``source``/``other``: an ActivationStore, a store path or a dict of 2-D arrays; with
    ``other``, its row ids must equal ``source``'s in order (``MismatchError`` otherwise) and
    its layers come after ``source``'s (``Moments.num_a`` / ``num_b``). ``check_finite``: a
    NaN/Inf raises ``NonFiniteError`` naming the layer and first bad row; ``False`` lets them
    through (every cell of an affected layer becomes NaN; ``meta["nonfinite_rows"]``).
    Two stores are streamed entirely in Rust (GIL released, reader thread one block ahead);
    in-memory arrays are fed block by block to the same accumulator.

    ``compute``: ``"float64"`` (default) multiplies in f64; ``"float32"`` computes the
    ``D × D`` block products (the SYRK, nearly all the work) from the mean-shifted values
    rounded to f32, with f32 sums over at most 2048 rows added into the f64 accumulator (the
    squared-norm terms of the debiased estimator, the sums and the shift stay f64): about
    twice as fast; measured against f64 on offset/bf16/scaled data in
    ``tests/test_cka.py`` (agreement to 1e-6)."""
    t0 = time.perf_counter()
    a = resolve(source)
    la = a.select(layers)
    parts: list[tuple[Source, list[str]]] = [(a, la)]
    if other is not None:
        b = resolve(other)
        lb = b.select(other_layers)
        check_comparable(a, b)
        parts.append((b, lb))
    names = [n for _, ls in parts for n in ls]
    dims = [src.dims[n] for src, ls in parts for n in ls]
    pl = plan(dims, max_memory, compute)
    br = int(block_rows) if block_rows is not None else pl["block_rows"]
    n = a.num_rows
    num_a = len(la)
    with Progress(progress, "moments") as prog:
        if all(src.is_store for src, _ in parts):
            sels = [
                (src.store._native, [int(src.store._native.layer_index(x)) for x in ls])
                for src, ls in parts
            ]
            m = _native.moments_from_stores(
                sels, names, block_rows=br, check_finite=check_finite,
                max_memory=max_memory, num_a=num_a, progress=prog.cb, compute=compute,
            )
            how = "rust-stream"
        else:
            wide = any(_is_f64(src, x) for src, ls in parts for x in ls)
            dt = np.float64 if wide else np.float32
            acc = _native.MomentAccumulator(dims, names, check_finite, compute)
            for start in range(0, n, br):
                stop = min(n, start + br)
                acc.update([src.read(x, start, stop, dtype=dt) for src, ls in parts for x in ls])
                if prog.cb is not None:
                    prog.cb(stop, n)
            m = acc.finalize(num_a)
            how = "blocks"
    meta: dict[str, Any] = {
        "n": int(m.n), "passes": 1, "block_rows": br, "engine": how, "compute": compute,
        "accumulator_bytes": pl["accumulator_bytes"],
        "seconds_pass": time.perf_counter() - t0,
    }
    bad = {nm: int(r) for nm, r in zip(names, m.nonfinite) if r is not None}
    if bad:
        meta["nonfinite_rows"] = bad
    return m, meta


def _is_f64(src: Source, layer: str) -> bool:
    if src.is_store:
        return str(src.store.dtypes[layer]) in ("float64", "F64", "f64")
    assert src.arrays is not None
    return src.arrays[layer].dtype == np.float64
