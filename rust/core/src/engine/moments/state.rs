//! What every accumulator of a pass shares ([`PassState`]: layers, shift, rows, finite-value
//! policy, block buffers) and the arithmetic rules of its block products ([`Compute`], the
//! scale exponents, the f32 safety checks), used by [`super::MomentAccumulator`] and
//! [`super::CrossAccumulator`].
use crate::error::{Error, Result};
use crate::linalg::packed::PackedElem;
use crate::store::Element;
use rayon::prelude::*;

/// Arithmetic of the block products (the accumulation across blocks is always f64).
///
/// * [`Compute::F64`] (default): every product in f64.
/// * [`Compute::F32`]: the `D × D` part of `Σ_a u_a u_aᵀ` (the SYRK, nearly all the work)
///   multiplies the **shifted** values rounded to f32 with f32 sums over at most
///   [`F32_SUM_ROWS`] rows, each partial sum added into the f64 accumulator; everything
///   that involves the squared norms (the debiased estimators' 4th-order sums), the column
///   sums and the shift stay f64. Twice the SIMD width; the error is that of rounding the
///   shifted data to f32 plus `√b·u`-sized sums (measured against f64 in the tests: ≤ 1e-6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compute {
    #[default]
    F64,
    F32,
}

impl Compute {
    /// `"float64"`/`"f64"` or `"float32"`/`"f32"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float64" | "f64" => Ok(Compute::F64),
            "float32" | "f32" => Ok(Compute::F32),
            other => Err(Error::invalid(format!(
                "compute must be \"float64\" or \"float32\", got {other:?}"
            ))),
        }
    }
}

/// Longest f32 sum in [`Compute::F32`]: the packed SYRK's micro-kernel adds its f32 register
/// sums into the f64 accumulator every this many rows.
pub const F32_SUM_ROWS: usize = <f32 as PackedElem>::CHAIN;

/// Layer scaling (numbers at any scale): a layer whose shifted values in the first block
/// reach at most `2^e` in magnitude with `|e| > SCALE_BAND` is multiplied by `2^-e` (exact in
/// binary floating point) before any product, so its squares and fourth powers stay far
/// inside the f32 and f64 ranges; every finalised quantity of it is then in units of
/// `2^-e` per factor ([`super::Moments::scale_exp`]). Layers within the band (every ordinary
/// activation: up to about 1e12 and down to 1e-12) are not touched: their results are the
/// same bits as without scaling.
pub const SCALE_BAND: i32 = 40;

/// Largest shifted (and scaled) magnitude an f32 block product takes: above it a block of
/// [`Compute::F32`] is done in f64 instead (its products, up to 2^100 summed over
/// [`F32_SUM_ROWS`] rows, stay below f32's 2^128), e.g. a lone finite outlier near 1e38 in an
/// f32 store. The other side: [`F32_TINY`].
pub const F32_SAFE: f64 = (1u64 << 50) as f64;

/// `x · 2^e`, exact unless the result over- or underflows (steps of at most 2^1000, so any
/// `e` works).
pub fn ldexp(mut x: f64, mut e: i32) -> f64 {
    while e > 1000 {
        x *= pow2(1000);
        e -= 1000;
    }
    while e < -1000 {
        x *= pow2(-1000);
        e += 1000;
    }
    x * pow2(e)
}

/// `2^e` for `|e| ≤ 1022` (a normal f64).
pub(super) fn pow2(e: i32) -> f64 {
    debug_assert!(e.abs() <= 1022);
    f64::from_bits(((1023 + e.clamp(-1022, 1023)) as u64) << 52)
}

/// The scale exponent of a layer whose largest shifted magnitude is `max`: 0 within
/// [`SCALE_BAND`] (and for 0, NaN or ±Inf: nothing to scale, or the pass reports it), else
/// `⌊log2 max⌋` (clamped to ±1000, so that `2^-e` is one normal f64).
pub fn scale_exponent(max: f64) -> i32 {
    if !(max.is_finite() && max > 0.0) {
        return 0;
    }
    // the exponent of max (subnormals: scaled into the normal range first)
    let (m, bias) = if max < f64::MIN_POSITIVE {
        (max * pow2(64), 64)
    } else {
        (max, 0)
    };
    let e = ((m.to_bits() >> 52) & 0x7ff) as i32 - 1023 - bias;
    if e.abs() <= SCALE_BAND {
        0
    } else {
        e.clamp(-1000, 1000)
    }
}

/// Smallest non-zero column magnitude f32 products take: a column of a block whose
/// largest `|u|` is below it (a column far smaller than the layer's unit, e.g. a layer whose
/// unit was set by an outlier in another column) would have subnormal or zero f32 products,
/// and the block is done in f64.
pub const F32_TINY: f64 = 1.0 / (1u64 << 50) as f64;

/// Whether the f32 products of a row-major `rows × width` block `u` (shifted and scaled
/// values, `u(i)` for element `i`) are as accurate as usual: every column's largest `|u|`
/// is 0 or within `[F32_TINY, F32_SAFE]` (no underflow, no overflow). NaN or ±Inf: false.
pub fn f32_products_ok(u: impl Fn(usize) -> f64 + Sync, rows: usize, width: usize) -> bool {
    if width == 0 || rows == 0 {
        return true;
    }
    const CH: usize = 64;
    let maxima = (0..rows.div_ceil(CH))
        .into_par_iter()
        .map(|c| {
            let mut m = vec![0.0f64; width];
            for a in c * CH..((c + 1) * CH).min(rows) {
                for (j, mj) in m.iter_mut().enumerate() {
                    let v = u(a * width + j).abs();
                    // NaN must not be lost by max: make it infinite
                    *mj = if v.is_nan() { f64::INFINITY } else { mj.max(v) };
                }
            }
            m
        })
        .reduce(
            || vec![0.0f64; width],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x = x.max(y);
                }
                a
            },
        );
    maxima
        .iter()
        .all(|&m| m == 0.0 || (F32_TINY..=F32_SAFE).contains(&m))
}

/// The largest finite `|x − mean|` of the row-major block `x` (width `mean.len()`; NaN and
/// ±Inf skipped: the pass reports them), in parallel over rows: what every route chooses a
/// layer's [`scale_exponent`] from.
pub fn max_deviation<T: Element>(x: &[T], mean: &[f64]) -> f64 {
    x.par_chunks(mean.len().max(1))
        .map(|r| {
            r.iter()
                .zip(mean)
                .map(|(v, m)| (v.to_f64() - m).abs())
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max)
        })
        .reduce(|| 0.0, f64::max)
}

/// Per layer, [`scale_exponent`] of the largest deviation `|x − μ0|` of a block.
pub(super) fn block_exps<T: Element>(
    dims: &[usize],
    offsets: &[usize],
    block: &[&[T]],
    shift: &[f64],
) -> Vec<i32> {
    block
        .par_iter()
        .enumerate()
        .map(|(l, x)| {
            let (dl, o) = (dims[l], offsets[l]);
            scale_exponent(max_deviation(x, &shift[o..o + dl]))
        })
        .collect()
}

/// Most rows per block in [`Compute::F32`] (the f32 row buffer, `rows × D`, is the block):
/// two packed-SYRK slices of 768 rows.
pub const F32_BLOCK_ROWS: usize = 1536;

/// What every accumulator of a pass holds besides its sums ([`MomentAccumulator`], the
/// diagonal tiles, and [`super::cross::CrossAccumulator`], the off-diagonal ones): the
/// layers, the reference shift, the rows seen, the policy for non-finite values and the
/// block buffers.
#[derive(Clone, Debug)]
pub(super) struct PassState {
    pub(super) dims: Vec<usize>,
    pub(super) offsets: Vec<usize>,
    pub(super) names: Vec<String>,
    /// Reference shift μ0 (length D), set by the first non-empty block.
    pub(super) shift: Option<Vec<f64>>,
    pub(super) n: u64,
    /// When false, non-finite values are accumulated (they turn the affected cells NaN).
    pub(super) check_finite: bool,
    /// The source row of this accumulator's first row (named in non-finite errors only: a
    /// task over rows `[base, …)` of a distributed pass).
    pub(super) row_base: u64,
    /// First row (in update order) holding a non-finite value, per layer.
    pub(super) nonfinite: Vec<Option<u64>>,
    /// Arithmetic of the block products (not serialised: it does not change what is stored).
    pub(super) compute: Compute,
    /// Block buffers kept between updates (contents meaningless between calls): fresh
    /// allocations of this size cost a page fault per 4 KiB and the kernel's zeroing.
    pub(super) scratch: Scratch,
}

impl PassState {
    /// The state of an empty accumulator over layers of widths `dims` (none of them 0;
    /// names `layer{i}`, f64 products, non-finite values refused).
    pub(super) fn new(dims: Vec<usize>) -> Result<Self> {
        if dims.contains(&0) {
            return Err(Error::invalid("a layer of width 0 cannot be accumulated"));
        }
        Ok(PassState {
            offsets: offsets_of(&dims),
            names: (0..dims.len()).map(|i| format!("layer{i}")).collect(),
            nonfinite: vec![None; dims.len()],
            dims,
            shift: None,
            n: 0,
            check_finite: true,
            row_base: 0,
            compute: Compute::F64,
            scratch: Scratch::default(),
        })
    }

    /// Total width `D`.
    pub(super) fn d(&self) -> usize {
        self.offsets[self.dims.len()]
    }

    /// Row `a` of `block` shifted and scaled, `ur[i] = round((x_i − μ0_i) · f_l)` over the
    /// `D` columns (`f_l = fac[l]`, 1 where `fac` has none), and `rr[l] = ‖ur_l‖²` in f64 of
    /// the rounded values: what every accumulator multiplies (`round` is the identity for
    /// f64 products, the rounding to f32 for f32 ones).
    #[inline]
    pub(super) fn shift_row<T: Element, C: Copy + Into<f64>>(
        &self,
        block: &[&[T]],
        a: usize,
        fac: &[f64],
        ur: &mut [C],
        rr: &mut [f64],
        round: impl Fn(f64) -> C,
    ) {
        let mu = self.shift.as_deref().unwrap_or(&[]);
        for (l, x) in block.iter().enumerate() {
            let (dl, o) = (self.dims[l], self.offsets[l]);
            let src = &x[a * dl..(a + 1) * dl];
            let f = fac.get(l).copied().unwrap_or(1.0);
            let mut acc = 0.0f64;
            for ((dst, v), m) in ur[o..o + dl].iter_mut().zip(src).zip(&mu[o..o + dl]) {
                let q = round((v.to_f64() - m) * f);
                *dst = q;
                let w: f64 = q.into();
                acc += w * w;
            }
            rr[l] = acc;
        }
    }

    /// Per layer `‖v_l‖²` of a vector `v` over all `D` columns.
    pub(super) fn layer_sq_norms(&self, v: &[f64]) -> Vec<f64> {
        self.offsets
            .windows(2)
            .map(|w| v[w[0]..w[1]].iter().map(|x| x * x).sum())
            .collect()
    }

    /// Set the reference shift (length D, finite) before the first row.
    pub(super) fn set_shift(&mut self, shift: &[f64]) -> Result<()> {
        let started = self.n > 0 || self.shift.is_some();
        self.shift = Some(checked_shift(shift, self.d(), started)?);
        Ok(())
    }

    /// The checks every accumulator runs on a block before it changes anything: `block[l]`
    /// is `rows × dims[l]`; a non-finite value is an [`Error::NonFinite`] naming the layer
    /// and row when `check_finite`, else its first row is recorded in `nonfinite`. Then, for
    /// the first block of an accumulator fed without a shift, the block's column means
    /// become the shift. `Ok(false)` for an empty block.
    pub(super) fn screen<T: Element>(&mut self, block: &[&[T]], rows: usize) -> Result<bool> {
        let (dims, names) = (&self.dims, &self.names);
        if block.len() != dims.len() {
            return Err(Error::Mismatch(format!(
                "block has {} layers, accumulator has {}",
                block.len(),
                dims.len()
            )));
        }
        for (l, (x, &d)) in block.iter().zip(dims).enumerate() {
            if Some(x.len()) != rows.checked_mul(d) {
                return Err(Error::Mismatch(format!(
                    "layer {:?}: block has {} values, expected {rows} rows × {d}",
                    names[l],
                    x.len()
                )));
            }
        }
        if rows == 0 {
            return Ok(false);
        }
        // Non-finite scan (first bad row per layer).
        let bad: Vec<Option<usize>> = block
            .par_iter()
            .zip(dims.par_iter())
            .map(|(x, &d)| {
                x.chunks(d)
                    .position(|r| r.iter().any(|v| !v.to_f64().is_finite()))
            })
            .collect();
        if self.check_finite {
            if let Some((l, a)) = bad.iter().enumerate().find_map(|(l, b)| b.map(|a| (l, a))) {
                return Err(Error::NonFinite(format!(
                    "layer {:?}: non-finite value (NaN/Inf) in row {}",
                    names[l],
                    self.row_base + self.n + a as u64
                )));
            }
        }
        for (l, b) in bad.iter().enumerate() {
            if let (Some(a), None) = (b, self.nonfinite[l]) {
                self.nonfinite[l] = Some(self.n + *a as u64);
            }
        }
        if self.shift.is_none() {
            self.shift = Some(block_means(&self.dims, block, rows));
        }
        Ok(true)
    }
}

/// The builder options every accumulator of a pass takes (they set its [`PassState`]).
macro_rules! pass_options {
    () => {
        /// The arithmetic of the block products (see [`Compute`]).
        pub fn with_compute(mut self, compute: Compute) -> Self {
            self.st.compute = compute;
            self
        }

        /// Set the layer names used in error messages (and carried into the results).
        pub fn with_names(mut self, names: &[String]) -> Result<Self> {
            self.st.names = super::state::checked_names(names, self.st.dims.len())?;
            Ok(self)
        }

        /// `true` (default): a non-finite value is an [`Error::NonFinite`]. `false`: it is
        /// accumulated, and every cell involving its layer becomes NaN (first bad row
        /// recorded).
        pub fn with_check_finite(mut self, check: bool) -> Self {
            self.st.check_finite = check;
            self
        }

        /// The source row of the first row fed (default 0): a non-finite error names
        /// `row_base + row`. Recorded first bad rows stay relative (a merge offsets them).
        pub fn with_row_base(mut self, base: u64) -> Self {
            self.st.row_base = base;
            self
        }

        /// Rows accumulated so far.
        pub fn n(&self) -> u64 {
            self.st.n
        }
    };
}
pub(super) use pass_options;

/// Reusable per-update buffers of [`MomentAccumulator`] and of
/// [`super::cross::CrossAccumulator`] (never serialised).
#[derive(Clone, Debug, Default)]
pub(super) struct Scratch {
    /// f64 rows: `w` (rows × (D+L)) of a moment accumulator, `u` (rows × D) of a cross tile.
    pub(super) w: Vec<f64>,
    /// f32 path: `u` (rows × D), `r` (rows × L).
    pub(super) u: Vec<f32>,
    pub(super) r: Vec<f64>,
    /// Packed panels of the products (f64 and f32 paths).
    pub(super) pack64: Vec<f64>,
    pub(super) pack32: Vec<f32>,
}

/// `v` resized to `len` without clearing what it already holds (every element is
/// overwritten by the caller before it is read).
/// A refused allocation is an [`Error::Memory`].
pub(super) fn sized<T: Copy + Default + Send + Sync>(
    v: &mut Vec<T>,
    len: usize,
) -> Result<&mut [T]> {
    if v.len() < len {
        // Fresh, huge-page-hinted storage (block buffers are tens of MB, read in strides).
        *v = Vec::new();
        *v = crate::linalg::hinted_vec(len, "a block buffer of the moment pass")?;
    }
    Ok(&mut v[..len])
}

pub(super) fn offsets_of(dims: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(dims.len() + 1);
    let mut acc = 0usize;
    o.push(0);
    for d in dims {
        acc += d;
        o.push(acc);
    }
    o
}

/// f64 column sums of the row-major `rows × width` matrix `x`: parallel over chunks of 256
/// rows, the chunk sums then added in chunk order (the same bits on every run, which a
/// parallel float reduction does not give).
pub(super) fn column_sums<T: Copy + Into<f64> + Sync>(x: &[T], width: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = x
        .par_chunks(width * 256)
        .map(|chunk| {
            let mut s = vec![0.0; width];
            for row in chunk.chunks_exact(width) {
                for (si, &v) in s.iter_mut().zip(row) {
                    *si += v.into();
                }
            }
            s
        })
        .collect();
    let mut total = vec![0.0; width];
    for p in &parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `names` as the names of `count` layers (one each).
pub(super) fn checked_names(names: &[String], count: usize) -> Result<Vec<String>> {
    if names.len() != count {
        return Err(Error::invalid(format!(
            "{} names for {count} layers",
            names.len()
        )));
    }
    Ok(names.to_vec())
}

/// `shift` as the reference shift of `d` columns: `d` finite values, set before the first
/// row (`started`: rows were accumulated or a shift was set).
pub(super) fn checked_shift(shift: &[f64], d: usize, started: bool) -> Result<Vec<f64>> {
    if started {
        return Err(Error::invalid(
            "the shift can only be set before the first row is accumulated",
        ));
    }
    if shift.len() != d {
        return Err(Error::Mismatch(format!(
            "shift has {} values, the layers have {d} columns",
            shift.len()
        )));
    }
    if !shift.iter().all(|v| v.is_finite()) {
        return Err(Error::invalid("the shift must be finite"));
    }
    Ok(shift.to_vec())
}

/// Column means of a block (the concatenated layers): the shift of an accumulator fed by
/// hand without one.
pub(super) fn block_means<T: Element>(dims: &[usize], block: &[&[T]], rows: usize) -> Vec<f64> {
    let mut mu = Vec::with_capacity(dims.iter().sum());
    for (x, &dl) in block.iter().zip(dims) {
        let mut m = vec![0.0; dl];
        for r in x.chunks(dl) {
            for (mi, v) in m.iter_mut().zip(r) {
                *mi += v.to_f64();
            }
        }
        for mi in m.iter_mut() {
            *mi /= rows as f64;
        }
        mu.extend(m);
    }
    mu
}
