//! The plan of one pass: the bytes it needs ([`accumulator_bytes`], [`pass_bytes`]), its
//! default block rows, and the memory check that runs before any row is read.
use super::state::{Compute, F32_BLOCK_ROWS};
use crate::error::{Error, Result};
use crate::linalg::packed::PackedElem;
use crate::memory::{fmt_bytes, Budget};

/// What a planner is asked to plan: `n` rows of layers of widths `dims` (`0..num_a` from the
/// first source; `num_a == dims.len()` for one source), `block_rows` rows per block (`None`:
/// the planner's default) and the products' arithmetic. [`PassShape::new`] checks it once
/// for every planner ([`super::plan_tiles`], [`super::PairPlan::choose`],
/// [`super::GramPlan::new`]).
#[derive(Clone, Copy, Debug)]
pub struct PassShape<'a> {
    pub dims: &'a [usize],
    pub num_a: usize,
    pub n: u64,
    pub block_rows: Option<usize>,
    pub compute: Compute,
}

impl<'a> PassShape<'a> {
    /// [`Error::InvalidArgument`] for no layers, a layer of width 0, `num_a` outside
    /// `1..=dims.len()` or `block_rows` 0.
    pub fn new(
        dims: &'a [usize],
        num_a: usize,
        n: u64,
        block_rows: Option<usize>,
        compute: Compute,
    ) -> Result<Self> {
        if dims.is_empty() || dims.contains(&0) || num_a == 0 || num_a > dims.len() {
            return Err(Error::invalid(format!(
                "a pass needs layers of positive width (got {dims:?}, {num_a} in the first source)"
            )));
        }
        if block_rows == Some(0) {
            return Err(Error::invalid("block_rows must be at least 1"));
        }
        Ok(PassShape {
            dims,
            num_a,
            n,
            block_rows,
            compute,
        })
    }

    /// `n` as a row count of this machine (at least 1), the most rows a block can hold.
    pub fn max_block_rows(&self) -> usize {
        usize::try_from(self.n).unwrap_or(usize::MAX).max(1)
    }
}

/// The layer pairs an all-pairs pass reports, as its rows and columns: every layer with every
/// layer for one source (`num_a == l`), else the `num_a` first-source layers with the others.
pub(super) fn pair_sides(num_a: usize, l: usize) -> (Vec<usize>, Vec<usize>) {
    if num_a == l {
        ((0..l).collect(), (0..l).collect())
    } else {
        ((0..num_a).collect(), (num_a..l).collect())
    }
}

/// Bytes of the accumulator for layers of these widths: `(D+L)² × 8` plus vectors.
pub fn accumulator_bytes(dims: &[usize]) -> u128 {
    let dz = dims.iter().map(|&d| d as u128).sum::<u128>() + dims.len() as u128;
    dz * dz * 8 + dz * 16
}

/// Peak bytes of one streaming pass: the accumulator, two blocks of `w` (f64) and the
/// packed SYRK panels (`2 (D+L) × min(KC, block_rows)` values of the compute type).
pub fn pass_bytes(dims: &[usize], block_rows: usize, compute: Compute) -> u128 {
    let d = dims.iter().map(|&d| d as u128).sum::<u128>();
    let dz = d + dims.len() as u128;
    let kc = |kc: usize| kc.min(block_rows) as u128;
    let pack = match compute {
        Compute::F64 => 2 * dz * kc(<f64 as PackedElem>::KC) * 8,
        Compute::F32 => 2 * d * kc(<f32 as PackedElem>::KC) * 4,
    };
    accumulator_bytes(dims) + dz * block_rows as u128 * 8 * 2 + pack
}

/// Fail with [`Error::Memory`] before the pass when its peak ([`pass_bytes`]: the
/// accumulator for `dims`, `block_rows` rows of block buffers and the SYRK panels) exceeds
/// `budget`; the message says how many of these layers fit in one call.
pub fn check_memory(
    dims: &[usize],
    block_rows: usize,
    compute: Compute,
    budget: &Budget,
) -> Result<()> {
    let need = pass_bytes(dims, block_rows, compute);
    if need <= budget.bytes as u128 {
        return Ok(());
    }
    // The most of these layers (in order) whose pass fits; at least one layer.
    let fit = (1..=dims.len())
        .take_while(|&k| pass_bytes(&dims[..k], block_rows, compute) <= budget.bytes as u128)
        .last()
        .unwrap_or(0);
    let widest = dims.iter().copied().max().unwrap_or(0);
    let advice = if fit == 0 {
        format!(
            "not even one layer of width {widest} fits: its accumulator alone needs {}; \
             a budget of at least {} is needed for the widest layer on its own",
            fmt_bytes(accumulator_bytes(&[widest])),
            fmt_bytes(pass_bytes(&[widest], block_rows, compute))
        )
    } else {
        format!(
            "at most {fit} of these {} layers fit in one call (select them with layers=..., \
             and compare groups of layers in several calls)",
            dims.len()
        )
    };
    budget.check(
        need,
        format_args!(
            "the all-pairs moment accumulator for {} layers (D = {}, {} rows per block)",
            dims.len(),
            dims.iter().sum::<usize>(),
            block_rows
        ),
        advice,
    )
}

/// Default rows per block: the `w` buffer (`rows × (D+L)` f64) stays near 128 MiB, between
/// 64 and 8192 rows (SYRK is efficient from a few hundred rows).
pub fn default_block_rows(dims: &[usize]) -> usize {
    let dz: usize = dims.iter().sum::<usize>() + dims.len();
    ((128usize << 20) / (dz.max(1) * 8)).clamp(64, 8192)
}

/// Default rows per block for `compute`: as [`default_block_rows`] for f64; for f32 (whose
/// row buffer is half the size) twice that, at most [`F32_BLOCK_ROWS`].
pub fn default_block_rows_for(dims: &[usize], compute: Compute) -> usize {
    let r = default_block_rows(dims);
    match compute {
        Compute::F64 => r,
        Compute::F32 => (2 * r).min(F32_BLOCK_ROWS),
    }
}

/// Peak bytes of one off-diagonal tile of a tiled pass (sides of widths `a` and `b`): its
/// sums ([`super::cross::cross_accumulator_bytes`]), two blocks of both sides' rows (f64, as
/// [`pass_bytes`] counts them) and the packed GEMM panels (`(D_A + D_B) × min(KC, block_rows)`).
pub fn cross_pass_bytes(a: &[usize], b: &[usize], block_rows: usize, compute: Compute) -> u128 {
    let d = a.iter().chain(b).map(|&d| d as u128).sum::<u128>();
    let dz = d + (a.len() + b.len()) as u128;
    let kc = |kc: usize| kc.min(block_rows) as u128;
    let pack = match compute {
        Compute::F64 => d * kc(<f64 as PackedElem>::KC) * 8,
        Compute::F32 => d * kc(<f32 as PackedElem>::KC) * 4,
    };
    super::cross::cross_accumulator_bytes(a, b) + dz * block_rows as u128 * 8 * 2 + pack
}

/// Multiply-adds per second of the packed product kernel on this machine (every rayon
/// thread), in the arithmetic of `compute`: repeated SYRKs (`C += UᵀU`) of a 512 × 1024 block
/// (the shape of a pass's block products) for at least `seconds` and at least three calls; the
/// best call's rate. It feeds estimated times only (plans are ranked at nominal rates, so a
/// plan does not depend on how busy the machine was when it was made).
pub fn measured_madds_per_s(compute: Compute, seconds: f64) -> Result<f64> {
    use crate::linalg::packed::{syrk_upper_add, Strided};
    use std::time::Instant;
    const K: usize = 512;
    const N: usize = 1024;
    fn run<T: PackedElem + From<f32>>(seconds: f64) -> Result<f64> {
        // Values do not change the time of a multiply-add (no denormals: every value is 0.5).
        let mut u: Vec<T> = crate::linalg::hinted_vec(K * N, "the rate-measuring block")?;
        u.fill(T::from(0.5));
        let mut c: Vec<f64> = crate::linalg::hinted_vec(N * N, "the rate-measuring product")?;
        let mut pack = Vec::new();
        let view = Strided {
            u: &u,
            k: K,
            n: N,
            rs: N,
            cs: 1,
        };
        let madds = (K * N * (N + 1) / 2) as f64;
        let (mut best, mut calls) = (0f64, 0usize);
        let start = Instant::now();
        while calls < 3 || start.elapsed().as_secs_f64() < seconds {
            let t = Instant::now();
            syrk_upper_add(&mut c, N, view, &mut pack)?;
            best = best.max(madds / t.elapsed().as_secs_f64().max(1e-9));
            calls += 1;
        }
        Ok(best)
    }
    match compute {
        Compute::F64 => run::<f64>(seconds),
        Compute::F32 => run::<f32>(seconds),
    }
}
