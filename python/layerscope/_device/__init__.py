"""The torch engine: the block products of the moment passes on a torch device.

One more back-end that runs a plan's tiles (``ARCHITECTURE.md``, "Plans and back-ends"):
the plan, the reference shift and the scale of every tile come from the core
(``TilePlan.tile_layout`` / ``tile_shift`` / ``tile_scale``); the rows are read and decoded by
the Rust reader; only the products are formed on the device, under the CPU engine's rules,
and they go back to the core as the tile's serialised partial sums
(``TilePlan.partial_from_sums``, layerscope-core ``engine::moments::external``), which
finalise, merge and serialise exactly as the CPU engine's and Ray's partials of the same tile.

The arithmetic, as the CPU engine's (``engine::moments::accumulator``):

* ``u = (x − μ0) · 2^-e`` in f64 (``μ0`` the tile's sampled shift, ``e`` the piece's scale
  exponent, 0 for every ordinary layer) and ``r_p = ‖u_p‖²`` per piece; ``w = [u, r]``.
* ``compute="float64"``: ``Σ w wᵀ`` in f64 on the device.
* ``compute="float32"``: the ``u uᵀ`` part from ``u`` rounded to f32, as f32 sums over at most
  ``F32_SUM_ROWS`` (128) rows each added into an f64 total (a batched GEMM over 128-row
  slices, summed in f64); the parts with ``r``, the column sums and ``r`` itself in f64 from the
  rounded ``u``; a block whose column maxima leave ``[F32_TINY, F32_SAFE]`` is done in f64.
  TF32 is switched off for the call (``torch.backends.cuda.matmul`` and ``cudnn``'s
  ``fp32_precision = "ieee"``, or ``allow_tf32 = False`` on torch < 2.9; the user's settings
  are restored afterwards).
* ``compute="tf32"`` (CUDA only): the same with TF32 tensor-core products — an approximation
  (10-bit mantissas, about 1e-3 relative per product), stated in ``meta``.

Modules (imported by name, so that a call on the CPU loads only :mod:`.devices`):
:mod:`.devices` (which devices, their budget, their failures), :mod:`.arith` (the arithmetic
above), :mod:`.feed` (the rows, one block ahead), :mod:`.passes` (tiles, blocks and the Gram
route), :mod:`.products` (statistics while capturing, the neighbour products).

The Gram route (``strategy="gram"``) on the device: per layer the centred ``n × n`` Gram from
the exact column means (f64), scaled as the core does, in f64 or f32 products (f32 sums of at
most 128 columns, added in f64), and the pair sums ``⟨K̄_x, K̄_y⟩``, ``Σ diag K̄_x diag K̄_y``,
``tr K̄_x`` in f64 — assembled by the core (``PairStats.from_sums``).
"""
