//! Engine 1: exact streamed moments of concatenated layers (one pass, all pairs at once).
//!
//! # What is accumulated
//! For layers of widths `d_1 … d_L` (possibly from two stores, concatenated), each row is
//! `z = [x_1 … x_L]` (`D = Σ d_l`). The accumulator keeps a reference shift `μ0` (set before
//! the first row: the pass uses the column means of 1024 rows spread evenly over the whole
//! source, [`sample_shift`]; an accumulator fed by hand without one takes its first block's
//! column means) and, for the shifted row `u = z − μ0` extended with the per-layer squared
//! norms `r_l = ‖u_l‖²`, i.e. `w = [u, r_1 … r_L]` (`D + L` columns):
//!
//! * `S = Σ_a w_a w_aᵀ` (f64 accumulation, upper triangle only: one packed SYRK per block,
//!   parallel, [`crate::linalg::packed`]),
//! * `s = Σ_a w_a` and the row count `n`.
//!
//! Shifting before any product keeps the products small: LLM activations have per-feature
//! offsets hundreds of times their spread, and uncentred products cancel catastrophically.
//! The block products are f64 ([`Compute::F64`]) or, for the `D × D` part, f32 on the shifted
//! values with short f32 sums added into the f64 accumulator ([`Compute::F32`]); everything
//! else (squared norms, sums, shift) is f64.
//! Two accumulators with different shifts merge exactly: `w` under a new shift is an affine
//! function of `w` under the old one (`u' = u + δ`, `r'_l = r_l + 2δ_lᵀu_l + ‖δ_l‖²`), so
//! `S' = A S Aᵀ + …` is obtained algebraically ([`MomentAccumulator::merge`]).
//!
//! # What [`Moments`] gives (after [`MomentAccumulator::finalize`])
//! The data re-shifted to its exact mean `z̄`:
//! * `n`, `dims`, `offsets` (column ranges of each layer), `names`, `mean = z̄`;
//! * the centred cross-product matrix `C = Σ_a (z_a − z̄)(z_a − z̄)ᵀ` (full symmetric
//!   `D × D`, f64): [`Moments::block`]`(i, j)` is `C_ij = X̄_iᵀ X̄_j` (`d_i × d_j`, row-major);
//!   the covariance is `C / (n − 1)`;
//! * for the debiased (unbiased-HSIC) estimators, with `r̄_{l,a} = ‖x_{l,a} − x̄_l‖²`:
//!   `rr[k][l] = Σ_a r̄_{k,a} r̄_{l,a}` ([`Moments::rr`]) and `Σ_a r̄_{l,a} = tr C_ll`.
//!
//! # One idea a file
//! * `accumulator.rs`: [`MomentAccumulator`] (`update`, `merge`, `finalize`);
//! * `state.rs`: what both accumulators of a pass hold (`PassState`: layers, shift, rows,
//!   finite-value policy, block buffers) and the arithmetic of the block products
//!   ([`Compute`], scale exponents, the f32 checks);
//! * `codec.rs`: its versioned byte serialisation (`to_bytes` / `from_bytes`);
//! * `plan.rs`: bytes of a pass, default block rows, the memory check before a pass;
//! * `pass.rs`: the driver — one pass over any [`crate::store::RowSource`] (stores, arrays,
//!   both side by side) through the one block reader, with the sampled shift;
//! * `finalised.rs`: [`Moments`] and what is derived from them alone (blocks of `C`);
//! * `pairs.rs`: [`PairStats`] (what linear CKA needs of each pair) and the linear CKA
//!   formula, biased and debiased;
//! * `gram.rs`: the Gram route (per-layer centred `n × n` Grams, [`GramPlan`]) for few rows;
//! * `external.rs`: sums computed by another engine (the torch device engine) made into a
//!   tile's accumulators ([`ExternalSums`]);
//! * `partial.rs`: one tile over one range of rows ([`TilePartial`], serialisable and
//!   mergeable) and [`PairStatsBuilder`]: the units of a distributed pass, and of the local
//!   tiled pass;
//! * `cross.rs`, `tiled.rs`: tiled passes for layers whose single-pass accumulator does not
//!   fit the budget ([`plan_tiles`], [`run_tiled`], the off-diagonal [`CrossAccumulator`]).
mod accumulator;
mod codec;
mod cross;
mod external;
mod finalised;
mod gram;
mod pairs;
mod partial;
mod pass;
mod plan;
mod state;
#[cfg(test)]
mod tests;
mod tiled;

pub use accumulator::MomentAccumulator;
pub use cross::{cross_accumulator_bytes, CrossAccumulator, CrossStats};
pub use external::{ExternalSums, TileLayout};
pub use finalised::Moments;
pub use gram::{gram_bytes, GramPlan};
pub use pairs::PairStats;
pub use partial::{merge_partial_bytes, PairStatsBuilder, TilePartial};
pub use pass::{accumulate, accumulate_into, sample_scale, sample_shift, SHIFT_SAMPLE_ROWS};
pub use plan::{
    accumulator_bytes, check_memory, cross_pass_bytes, default_block_rows, default_block_rows_for,
    measured_madds_per_s, pass_bytes, PassShape,
};
pub use state::{
    ldexp, max_deviation, scale_exponent, Compute, F32_BLOCK_ROWS, F32_SAFE, F32_SUM_ROWS,
    F32_TINY, SCALE_BAND,
};
pub use tiled::{
    plan_tiles, run_tiled, PairPlan, Piece, Tile, TilePlan, MIN_PIECE_COLUMNS, PAIR_STRATEGIES,
};
