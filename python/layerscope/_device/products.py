"""Statistics while capturing (the moments of captured rows on the model's device) and the neighbour measures' products on a device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _native
from .._sample import exponent_of
from ..errors import InvalidArgumentError
from .arith import _TileSums
from .devices import (
    device_budget,
    precision,
    primary,
    torch_module,
)
from .passes import (
    screen,
)


class DeviceMoments:
    """The moment accumulator of a capture (``capture(..., accumulate=True)``): every batch of
    the selected layers, on the device the model ran on, added to ``Σ w wᵀ`` and ``Σ w``
    (:class:`_TileSums`) under the CPU engine's rules. The shift and the scale are the first
    batch's (its column means and, per layer, :func:`layerscope._sample.exponent_of` of its
    largest deviation: the rows that come later are not known yet — an accumulator fed by
    hand in the core does the same; ``Moments.shift_offset`` says how far that shift was
    from the mean of all rows, and a float32 pass warns as the CPU pass does). The sums go
    to the core as one tile's serialised partial (:meth:`to_bytes`: it merges with other
    partials of the same layers) and finalise into its ``Moments`` (:meth:`moments`).

    The accumulator's ``(D + L)² · 8`` bytes are checked against the device's budget
    (:func:`device_budget`) at the first batch, before anything is added: above it a
    :class:`MemoryBudgetError` names what would work instead — writing the store and letting
    the planner tile the passes."""

    def __init__(self, names: list[str], *, compute: str = "float32",
                 check_finite: bool = True, max_memory: Any = None) -> None:
        self.names = list(names)
        self.compute = compute
        self.check_finite = check_finite
        self.max_memory = max_memory
        self.dims: list[int] | None = None
        self.acc: _TileSums | None = None
        self.shift: Any = None
        self.fac: Any = None
        self.exps: list[int] = []
        self.nonfinite: list[int | None] = [None] * len(self.names)
        self.device: Any = None

    @property
    def n(self) -> int:
        return 0 if self.acc is None else int(self.acc.n)

    def _start(self, xs: list[Any]) -> None:
        from ..errors import MemoryBudgetError

        torch = torch_module()
        dev = xs[0].device
        dims = [int(x.shape[1]) for x in xs]
        need = int(_native.accumulator_bytes(dims))
        # the block's f64 copies (z, u and r) beside the sums
        need += 3 * int(xs[0].shape[0]) * (sum(dims) + len(dims)) * 8
        budget, source = device_budget(dev, self.max_memory)
        if need > budget:
            from ..store import _human as human

            try:  # what the planner would do with the same memory, over a store
                pl = _native.pair_plan(dims, len(dims), max(int(xs[0].shape[0]), 1), None,
                                       "float32", budget, "tiled")
                plan = (f"with this memory the planner runs {pl['passes']} tiled passes over "
                        "the store")
            except Exception:  # noqa: BLE001 - advice only
                plan = "the planner then sizes tiled passes to the machine's memory"
            raise MemoryBudgetError(
                f"the capture's moment accumulator for {len(dims)} layers (D = {sum(dims)}) "
                f"needs {human(need)} on {dev}, above its budget of {human(budget)} "
                f"({source}); write the store (out=...) and compute from it ({plan}; see "
                "`layerscope plan STORE`), or accumulate fewer layers")
        self.dims, self.device = dims, dev
        z = torch.cat([x.double() for x in xs], 1)
        finite = torch.isfinite(z)
        mean = torch.where(finite, z, torch.zeros_like(z)).sum(0) / finite.sum(0).clamp(min=1)
        self.shift = mean
        off = np.cumsum([0, *dims])
        dev_abs = torch.where(finite, (z - mean).abs(), torch.zeros_like(z))
        self.exps = [exponent_of(float(dev_abs[:, off[i]:off[i + 1]].max()) if len(z) else 0.0)
                     for i in range(len(dims))]
        self.fac = torch.tensor(np.repeat([np.ldexp(1.0, -e) for e in self.exps], dims),
                                dtype=torch.float64, device=dev)
        self.acc = _TileSums(torch, dev, dims, None, self.compute)

    def add(self, xs: list[Any]) -> None:
        """Add one batch: ``xs[l]`` the ``rows × d_l`` values of layer ``l`` (any float dtype,
        on one device; rows row-aligned across layers)."""
        torch = torch_module()
        if not xs or int(xs[0].shape[0]) == 0:
            return
        with precision(torch, self.compute), torch.no_grad():
            if self.acc is None:
                self._start(xs)
            assert self.acc is not None and self.dims is not None
            if [int(x.shape[1]) for x in xs] != self.dims:
                raise InvalidArgumentError(
                    f"a batch of widths {[int(x.shape[1]) for x in xs]}, the accumulator's "
                    f"are {self.dims}")
            z = torch.cat([x.to(self.device).double() for x in xs], 1)
            screen(torch, z, self.dims, self.names, self.acc.n, self.check_finite,
                   self.nonfinite)
            self.acc.add((z - self.shift) * self.fac)

    def to_bytes(self) -> bytes:
        """The sums as the core's serialised moment accumulator (one diagonal tile)."""
        if self.acc is None or self.dims is None:
            raise InvalidArgumentError("no rows were accumulated")
        plan = _native.TilePlan.single(self.dims, len(self.dims), self.n, None,
                                       "float32" if self.compute == "tf32" else self.compute)
        return plan.partial_from_sums(
            self.names, 0, self.n, self.shift.cpu().numpy(), self.exps,
            self.acc.products.cpu().numpy(), self.acc.sums.cpu().numpy(), self.nonfinite,
            self.check_finite)

    def moments(self) -> Any:
        """The core's ``Moments`` of every row added."""
        return _native.MomentAccumulator.from_bytes(self.to_bytes()).finalize(len(self.names))


# ------------------------------------------------------------------- neighbour products


class DeviceProducts:
    """The products behind the neighbour measures on a torch device — what the core's
    ``engine::neighbors::Products`` asks for (``_native.prepare_layer`` / ``knn_graph``
    ``products=``): ``X Xᵀ`` in f64 (RBF distances), ``X Xᵀ`` in IEEE f32 by blocks of rows
    (the kNN candidates: the core's lower bounds assume no more error than f32 products, so
    TF32 is off whatever ``compute`` says) and exact condensed squared distances from the
    differences (RSA). The bounds, the exact f64 recheck of near neighbours, the bandwidth,
    the kernel and the RDM are the core's."""

    #: Bytes of one block handed back at a time (rows × m f32 / the difference buffer).
    BLOCK_BYTES = 64 << 20

    def __init__(self, torch: Any, dev: Any) -> None:
        self.torch = torch
        self.dev = dev

    def _to(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)

    def gram_f64(self, x: np.ndarray) -> np.ndarray:
        with precision(self.torch, "float64"), self.torch.no_grad():
            t = self._to(x)
            return (t @ t.T).cpu().numpy()

    def f32_gram_blocks(self, x: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray]]:
        torch = self.torch
        with precision(torch, "float32"), torch.no_grad():
            t = self._to(np.asarray(x, dtype=np.float32))
            m = int(t.shape[0])
            per = max(1, self.BLOCK_BYTES // max(1, block * m * 4)) * block
            for r0 in range(0, m, per):
                yield r0, (t[r0:r0 + per] @ t.T).cpu().numpy()

    def exact_condensed_sq(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            t = self._to(np.asarray(x, dtype=np.float64))
            m, d = int(t.shape[0]), int(t.shape[1])
            rows = max(1, self.BLOCK_BYTES // max(1, m * d * 8))
            out = []
            for i0 in range(0, m, rows):
                i1 = min(m, i0 + rows)
                sq = ((t[i0:i1, None, :] - t[None, :, :]) ** 2).sum(-1)
                for i in range(i0, i1):
                    out.append(sq[i - i0, i + 1:])
            if not out:
                return np.zeros(0)
            return torch.cat(out).cpu().numpy()


def products(device: Any) -> Any:
    """The ``products=`` of the core's neighbour functions for a resolved device (None: the
    core's own CPU products)."""
    return None if device is None else DeviceProducts(torch_module(), primary(device))
