"""The CPU engine's arithmetic in torch: the f32 products over 128-row slices, the range check, and a tile's sums."""

from __future__ import annotations

from typing import Any

from .. import _native

#: Bytes of f32 slice products held at once by the batched 128-row GEMM (per call).
_SLICE_BYTES = 256 << 20

# ------------------------------------------------------------------------------ arithmetic


def _runs_f32(torch: Any, a: Any, b: Any) -> Any:
    """``aᵀ b`` of f32 ``a`` (rows × p) and ``b`` (rows × q) as f32 sums over slices of at
    most ``F32_SUM_ROWS`` rows, each added into an f64 total (rows zero-padded to whole
    slices: a zero row adds nothing)."""
    rows, p = a.shape
    q = b.shape[1]
    k = int(_native.F32_SUM_ROWS)
    slices = -(-rows // k)
    pad = slices * k - rows
    if pad:
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    a3 = a.reshape(slices, k, p)
    b3 = b.reshape(slices, k, q)
    out = torch.zeros((p, q), dtype=torch.float64, device=a.device)
    step = max(1, _SLICE_BYTES // max(1, p * q * 4))
    for s in range(0, slices, step):
        part = torch.bmm(a3[s:s + step].transpose(1, 2), b3[s:s + step])
        if part.shape[0] == 1:  # added as it is converted: no f64 copy of a large block
            out += part[0]
        else:
            out += part.sum(0, dtype=torch.float64)
    return out


def _f32_ok(torch: Any, u32: Any) -> bool:
    """The core's ``f32_products_ok``: every column's largest ``|u|`` 0 or within
    ``[F32_TINY, F32_SAFE]`` (NaN or ±Inf: no)."""
    m = u32.abs().double().amax(0) if u32.shape[0] else u32.new_zeros(u32.shape[1]).double()
    m = torch.where(torch.isnan(m), torch.full_like(m, float("inf")), m)
    ok = (m == 0) | ((m >= _native.F32_TINY) & (m <= _native.F32_SAFE))
    return bool(ok.all())


class _TileSums:
    """The device-side sums of one tile: ``products`` (see the module docs), ``sums``, rows."""

    def __init__(self, torch: Any, dev: Any, widths: list[int], na: int | None,
                 compute: str) -> None:
        self.torch = torch
        self.widths = widths
        self.na = na
        self.compute = compute
        d = sum(widths)
        lp = len(widths)
        self.d, self.lp = d, lp
        # piece of every u column
        self.owner = torch.repeat_interleave(
            torch.arange(lp, device=dev), torch.tensor(widths, device=dev))
        if na is None:
            self.left_u = self.right_u = None  # all columns
            shape = (d + lp, d + lp)
        else:
            da = sum(widths[:na])
            self.da = da
            shape = (da + na, (d - da) + (lp - na))
        self.products = torch.zeros(shape, dtype=torch.float64, device=dev)
        self.sums = torch.zeros(d + lp, dtype=torch.float64, device=dev)
        self.n = 0

    def add(self, u64: Any) -> None:
        """Add the rows of ``u64`` (f64 shifted and scaled values, rows × D)."""
        torch = self.torch
        f32 = self.compute in ("float32", "tf32")
        u32 = u64.float() if f32 else None
        if f32 and not _f32_ok(torch, u32):
            f32 = False
        u = u32.double() if f32 else u64
        rows = u.shape[0]
        r = torch.zeros((rows, self.lp), dtype=torch.float64, device=u.device)
        r.index_add_(1, self.owner, u * u)
        if self.na is None:
            w = torch.cat([u, r], 1)
            if f32:
                d = self.d
                self.products[:d, :d] += _runs_f32(torch, u32, u32)
                ur = u.T @ r
                self.products[:d, d:] += ur
                self.products[d:, :d] += ur.T
                self.products[d:, d:] += r.T @ r
            else:
                self.products += w.T @ w
            self.sums += w.sum(0)
        else:
            da, na = self.da, self.na
            ua, ub = u[:, :da], u[:, da:]
            ra, rb = r[:, :na], r[:, na:]
            db = self.d - da
            p = self.products
            if f32:
                assert u32 is not None
                p[:da, :db] += _runs_f32(torch, u32[:, :da], u32[:, da:])
            else:
                p[:da, :db] += ua.T @ ub
            p[:da, db:] += ua.T @ rb
            p[da:, :db] += ra.T @ ub
            p[da:, db:] += ra.T @ rb
            self.sums[: self.d] += u.sum(0)
            self.sums[self.d:] += r.sum(0)
        self.n += rows
