"""The moment passes behind spectra, alignment and linear CKA tables: one pass when every
selected layer fits the memory budget, else layer tiles (:func:`layerscope._moments.measure_tiles`),
each tile's moments serving every measure asked of the layers and pairs it holds."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._validate import RunOptions
from ..errors import InvalidArgumentError


def moment_measures(
    moments: Any,
    spectrum_layers: list[int],
    align: dict[str, Any] | None,
    max_memory: int | None = None,
    pca_threshold: float | None = None,
) -> dict[str, Any]:
    """Spectra of ``spectrum_layers`` (with ``pca_id`` at ``pca_threshold`` when given) and,
    when ``align`` (rows, cols and the options of ``Moments.alignment``) is given, the
    alignment: both computed in Rust on the moments (``{"spectra": [...], "alignment": dict
    | None}``)."""
    if align is None:
        return {"spectra": moments.spectrum(spectrum_layers, max_memory=max_memory,
                                            pca_threshold=pca_threshold),
                "alignment": None}
    return dict(moments.alignment(spectrum_layers=spectrum_layers, max_memory=max_memory,
                                  **align))


class Tiles:
    """Moment measures over the passes of :func:`layerscope._moments.measure_tiles`: one
    pass when every selected layer fits at once, else tiles of layers (spectra: groups;
    alignment and linear CKA: unions of two groups, so every pair meets in some tile). Each
    tile's moments serve every measure asked of the layers and pairs it holds; the tables
    are assembled from the tiles (each layer and pair taken from the first tile that has
    it: the same sums, so the same numbers as one pass, to rounding)."""

    def __init__(
        self, source: Any, layers: Any, other: Any, other_layers: Any, *, pairs: bool,
        compute: str, run: RunOptions,
    ) -> None:
        from .._moments import _itemsize, measure_tiles, resolve_compute
        from .._source import check_comparable, resolve

        self.a = resolve(source)
        self.la = self.a.select(layers)
        self.b = None
        self.lb: list[str] = []
        if other is not None:
            self.b = resolve(other)
            self.lb = self.b.select(other_layers)
            check_comparable(self.a, self.b)
        parts = [(self.a, self.la)] + ([(self.b, self.lb)] if self.b is not None else [])
        self.num_a = len(self.la)
        self.names = self.la + self.lb
        self.dims = [src.dims[x] for src, ls in parts for x in ls]
        self.item = [_itemsize(src, x) for src, ls in parts for x in ls]
        self.n = int(self.a.num_rows)
        self.compute = resolve_compute(compute, parts)
        self.budget = budget = run.get("max_memory")
        self.progress = run.get("progress", False)
        self.backend = run.get("backend", "local")
        self.ray_address = run.get("ray_address")
        from .._moments import _device_for

        self.device = _device_for(run.get("device"), self.backend, compute, ray_ok=True)
        if self.n == 0:
            raise InvalidArgumentError("the source has no rows")
        self.strategy, self.tiles, self.peak = measure_tiles(
            self.dims, self.num_a, self.n, self.compute, budget,
            "alignment" if pairs else "spectrum")

    def run(self, each: Any) -> dict[str, Any]:
        """``each(tile, moments, local)`` for every tile (``local``: global layer index →
        index inside the tile's moments); returns the meta of all passes."""
        from .._moments import compute_moments
        from .._progress import PassProgress

        t0 = time.perf_counter()
        metas: list[dict[str, Any]] = []
        parts = []
        for tile in self.tiles:
            ta = [self.names[i] for i in tile if i < self.num_a]
            tb = [self.names[i] for i in tile if i >= self.num_a]
            # a tile of second-source layers only (their spectra) reads that source
            parts.append(([(self.a, ta)] + ([(self.b, tb)] if tb else []), len(ta))
                         if ta else ([(self.b, tb)], len(tb)))
        if self.backend == "ray":
            from .._ray import moment_passes

            passes = moment_passes(parts, compute=self.compute, check_finite=True,
                                   max_memory=self.budget, progress=self.progress,
                                   address=self.ray_address, device=self.device)
            for tile, (m, meta) in zip(self.tiles, passes):
                each(tile, m, {g: k for k, g in enumerate(tile)})
                metas.append(meta)
        else:
            with PassProgress(self.progress, "moments", len(self.tiles)) as prog:
                for p, (tile, (pp, _)) in enumerate(zip(self.tiles, parts)):
                    first, fl = pp[0]
                    second, sl = pp[1] if len(pp) > 1 else (None, None)
                    m, meta = compute_moments(
                        first, fl, second, sl, progress=prog.pass_cb(p) or False,
                        max_memory=self.budget, compute=self.compute, device=self.device)
                    each(tile, m, {g: k for k, g in enumerate(tile)})
                    metas.append(meta)
        meta = dict(metas[0])
        meta["backend"] = self.backend
        if self.backend == "ray":  # one run of every tile's tasks
            meta["tasks"] = metas[0]["tasks"]
        meta["shift_offset"] = max(float(x["shift_offset"]) for x in metas)
        bad: dict[str, int] = {}
        for x in metas:
            bad.update(x.get("nonfinite_rows", {}))
        if bad:
            meta["nonfinite_rows"] = bad
        selected = sum(self.n * d * s for d, s in zip(self.dims, self.item))
        meta.update(passes=len(self.tiles), seconds_pass=time.perf_counter() - t0)
        meta["plan"] = {
            "strategy": self.strategy, "passes": len(self.tiles), "peak_bytes": self.peak,
            "bytes_read": sum(int(x["plan"]["bytes_read"]) for x in metas),
            "bytes_selected": selected,
            "flops": sum(int(x["plan"]["flops"]) for x in metas),
            "block_rows": max(int(x["block_rows"]) for x in metas),
        }
        if self.strategy != "single-pass":
            meta["plan"]["tiles"] = [[self.names[i] for i in t] for t in self.tiles]
        return meta

    # Index helpers: rows are the first source's layers; cols the second's (or the same).
    @property
    def rows(self) -> list[int]:
        return list(range(self.num_a))

    @property
    def cols(self) -> list[int]:
        return list(range(self.num_a, len(self.names))) if self.b is not None else self.rows


def is_capture(source: Any) -> bool:
    """Whether ``source`` is a capture that accumulated statistics
    (``layerscope.capture(..., accumulate=True)``)."""
    from ..capture import Capture

    return isinstance(source, Capture)


class Captured:
    """The moment measures of a capture's statistics (``accumulate=True``): one "tile" of
    every selected layer, whose moments the capture already holds (no pass, no reads) —
    the same interface as :class:`Tiles` for :func:`run_measures`."""

    def __init__(self, cap: Any, layers: Any, other: Any) -> None:
        from .._layers import match_layers
        from ..errors import MissingLayerError

        if other is not None:
            raise InvalidArgumentError(
                "a capture's statistics hold the pairs of its own layers: compare two models "
                "with their stores (out=...), or capture both models' layers in one capture")
        self.m = cap.moments
        all_names = list(self.m.names)
        if layers is None:
            names = all_names
        else:
            pats = [layers] if isinstance(layers, str) else list(layers)
            names = match_layers(pats, all_names, error=MissingLayerError,
                                 where="the capture's layers")
        self.names = names
        self.pos = [all_names.index(x) for x in names]
        self.num_a = len(names)
        self.b = None
        self.a = None
        self.n = int(self.m.n)
        self.device = str(cap._acc.device)
        self.compute = cap._acc.compute

    @property
    def rows(self) -> list[int]:
        return list(range(self.num_a))

    @property
    def cols(self) -> list[int]:
        return self.rows

    def run(self, each: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        tile = list(range(len(self.names)))
        each(tile, self.m, {g: self.pos[g] for g in tile})
        meta: dict[str, Any] = {
            "n": self.n, "engine": "capture (moments accumulated on the device while the "
            "model ran)", "compute": self.compute, "shift_offset": float(self.m.shift_offset),
            "device": self.device, "backend": "local", "passes": 0,
            "seconds_pass": time.perf_counter() - t0,
            "plan": {"strategy": "captured", "passes": 0, "peak_bytes": 0, "bytes_read": 0,
                     "bytes_selected": 0, "flops": 0, "block_rows": 0},
        }
        bad = {x: int(r) for x, r in zip(self.m.names, self.m.nonfinite) if r is not None}
        if bad:
            meta["nonfinite_rows"] = bad
        return meta


class _Table:
    """A rows × cols table filled from tiles (first tile to hold a pair wins)."""

    def __init__(self, rows: list[int], cols: list[int]) -> None:
        self.rows, self.cols = rows, cols
        self.ri = {g: r for r, g in enumerate(rows)}
        self.ci = {g: c for c, g in enumerate(cols)}
        self.done = np.zeros((len(rows), len(cols)), dtype=bool)

    def local(self, tile: list[int], local: dict[int, int]) -> tuple[list[int], list[int]]:
        """The tile's row and col layers (tile-local indices)."""
        return ([local[g] for g in tile if g in self.ri],
                [local[g] for g in tile if g in self.ci])

    def cells(self, tile: list[int]) -> list[tuple[int, int, int, int]]:
        """``(r, c, i, j)``: new table cells of this tile, with their positions inside the
        tile's rows × cols block; marks them done."""
        tr = [g for g in tile if g in self.ri]
        tc = [g for g in tile if g in self.ci]
        out = []
        for i, gr in enumerate(tr):
            for j, gc in enumerate(tc):
                r, c = self.ri[gr], self.ci[gc]
                if not self.done[r, c]:
                    self.done[r, c] = True
                    out.append((r, c, i, j))
        return out


def _assemble_alignment(nr: int, nc: int) -> dict[str, Any]:
    return {"nrows": nr, "ncols": nc, "values": np.full(nr * nc, np.nan),
            "cosines": [np.empty(0)] * (nr * nc), "extras": {}, "row_k": [0] * nr,
            "col_k": [0] * nc, "row_ridge": [0.0] * nr, "col_ridge": [0.0] * nc,
            "row_rank": [0] * nr, "col_rank": [0] * nc}


def _put_alignment(
    dst: dict[str, Any], src: dict[str, Any], cells: list[tuple[int, int, int, int]],
) -> None:
    """Copy a tile's alignment cells (tile-local ``i, j``) into the assembled table."""
    nc, tnc = dst["ncols"], int(src["ncols"])
    vals = np.asarray(src["values"])
    cos = list(src["cosines"])
    ex = {name: np.asarray(v) for name, v in dict(src["extras"]).items()}
    for name in ex:
        dst["extras"].setdefault(name, np.full(dst["nrows"] * nc, np.nan))
    for r, c, i, j in cells:
        dst["values"][r * nc + c] = vals[i * tnc + j]
        dst["cosines"][r * nc + c] = cos[i * tnc + j]
        for name, v in ex.items():
            dst["extras"][name][r * nc + c] = v[i * tnc + j]
        dst["row_k"][r] = int(src["row_k"][i])
        dst["col_k"][c] = int(src["col_k"][j])
        dst["row_ridge"][r] = float(src["row_ridge"][i])
        dst["col_ridge"][c] = float(src["col_ridge"][j])
        dst["row_rank"][r] = int(src["row_rank"][i])
        dst["col_rank"][c] = int(src["col_rank"][j])


def run_measures(
    source: Any, layers: Any, other: Any, other_layers: Any, *, spectrum: bool,
    aligns: dict[str, dict[str, Any]], ckas: list[bool], compute: str, run: RunOptions,
    pca_threshold: float | None = None,
) -> tuple[Tiles, dict[str, Any], dict[str, Any]]:
    """Spectra (of every selected layer when ``spectrum``), the alignments ``aligns``
    (key → options of ``Moments.alignment``, without rows/cols) and linear CKA (``ckas``: the
    ``debiased`` flags) from the passes of one plan (``run``: where and within what budget,
    :class:`layerscope.RunOptions`); returns ``(tiles, raw results, meta)``
    with ``raw["spectra"]`` (per layer, in order), ``raw[key]`` (alignment dicts as
    ``Moments.alignment`` returns them) and ``raw[("cka", debiased)]`` (rows × cols arrays)."""
    pairs = bool(aligns or ckas)
    t: Any
    if is_capture(source):
        t = Captured(source, layers, other)
    else:
        t = Tiles(source, layers, other, other_layers, pairs=pairs, compute=compute, run=run)
    rows, cols = t.rows, t.cols
    nr, nc = len(rows), len(cols)
    raw: dict[str, Any] = {}
    spectra: list[Any] = [None] * len(t.names)
    tables = {key: _Table(rows, cols) for key in aligns}
    for key in aligns:
        raw[key] = _assemble_alignment(nr, nc)
    cka_tab = _Table(rows, cols)
    for deb in ckas:
        raw[("cka", deb)] = np.full((nr, nc), np.nan)
    seconds = {"measures": 0.0}

    def each(tile: list[int], m: Any, local: dict[int, int]) -> None:
        t2 = time.perf_counter()
        spec = [g for g in tile if spectrum and spectra[g] is None]
        jobs: list[tuple[str | None, dict[str, Any] | None]] = list(aligns.items()) or [
            (None, None)]
        for key, opts in jobs:
            align = None
            if key is not None and opts is not None:
                lr, lc = tables[key].local(tile, local)
                if not lr or not lc:
                    continue
                align = {"rows": lr, "cols": lc, **opts,
                         "symmetric": other is None}
            if align is None and not spec:
                continue
            res = moment_measures(m, [local[g] for g in spec], align, run.get("max_memory"),
                                  pca_threshold if align is None else None)
            for g, sp in zip(spec, list(res["spectra"])):
                spectra[g] = sp
            spec = []
            if key is not None:
                _put_alignment(raw[key], res["alignment"], tables[key].cells(tile))
        if ckas:
            lr, lc = cka_tab.local(tile, local)
            cells = cka_tab.cells(tile) if lr and lc else []
            for deb in ckas:
                if cells:
                    v = np.asarray(m.cka(lr, lc, debiased=deb), dtype=np.float64)
                    v = v.reshape(len(lr), len(lc))
                    for r, c, i, j in cells:
                        raw[("cka", deb)][r, c] = v[i, j]
        seconds["measures"] += time.perf_counter() - t2

    meta = t.run(each)
    meta["seconds_pass"] -= seconds["measures"]
    meta["seconds_measures"] = seconds["measures"]
    if t.b is not None:  # the two sides' short names, for legends and captions
        meta["sides"] = [t.a.short_name("A"), t.b.short_name("B")]
    raw["spectra"] = spectra
    return t, raw, meta
