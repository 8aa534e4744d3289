//! [`MomentAccumulator`]: the streaming value of engine 1 (`update` a block, `merge` another,
//! `finalize` into [`Moments`]), and the arithmetic of its block products ([`Compute`]).
use super::finalised::Moments;
use crate::error::{Error, Result};
use crate::linalg::packed::{syrk_upper_add, PackedElem, Strided};
use crate::linalg::symmetrize_from_upper;
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
/// `2^-e` per factor ([`Moments::scale_exp`]). Layers within the band (every ordinary
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
fn pow2(e: i32) -> f64 {
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
            self.st.names = checked_names(names, self.st.dims.len())?;
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

/// The streaming accumulator (a plain value: `update`, `merge`, `to_bytes`/`from_bytes`).
#[derive(Clone, Debug)]
pub struct MomentAccumulator {
    /// The layers, shift, rows, finite-value policy and buffers.
    pub(super) st: PassState,
    /// Per layer: the scale exponent `e` ([`SCALE_BAND`]); the accumulated values are
    /// `(x − μ0) · 2^-e`. Set with the shift by the first non-empty block (or [`Self::set_scale`]).
    pub(super) exps: Option<Vec<i32>>,
    /// Column-major (D+L)×(D+L); upper triangle valid.
    pub(super) s: Vec<f64>,
    /// Column sums of w (length D+L).
    pub(super) sums: Vec<f64>,
}

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
/// `acc[l·w + (i − i0)] += Σ_a u[a·d + i] · r[a·lc + l]` for `i` in `cols` (`w` of them):
/// one column chunk of the f64 products of `u` (f32, widened exactly) with the squared
/// norms `r`, rows in order (the f32 pass's columns `D..D+L`). Each element is a multiply
/// and an add, rounded separately, whatever the vector width (Rust never contracts them to
/// an FMA), so the AVX-512 / AVX2 copies give the same bits as the baseline one — 2.2×
/// faster on the default CKA bench's blocks (24 → 11 ms per 1536 × 9984 block).
fn norm_products(acc: &mut [f64], u: &[f32], r: &[f64], d: usize, cols: std::ops::Range<usize>) {
    #[inline(always)]
    fn body(acc: &mut [f64], u: &[f32], r: &[f64], d: usize, cols: std::ops::Range<usize>) {
        let w = cols.len();
        let lc = acc.len() / w.max(1);
        for (ur, rr) in u.chunks_exact(d).zip(r.chunks_exact(lc)) {
            let ui = &ur[cols.clone()];
            for (l, &rl) in rr.iter().enumerate() {
                for (s, &q) in acc[l * w..(l + 1) * w].iter_mut().zip(ui) {
                    *s += f64::from(q) * rl;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide(acc: &mut [f64], u: &[f32], r: &[f64], d: usize, cols: std::ops::Range<usize>) {
            body(acc, u, r, d, cols)
        }
        #[target_feature(enable = "avx2")]
        fn mid(acc: &mut [f64], u: &[f32], r: &[f64], d: usize, cols: std::ops::Range<usize>) {
            body(acc, u, r, d, cols)
        }
        match crate::linalg::packed::simd_level() {
            // SAFETY: simd_level 2 means the CPU has AVX-512F.
            2 => return unsafe { wide(acc, u, r, d, cols) },
            // SAFETY: simd_level 1 means the CPU has AVX2.
            1 => return unsafe { mid(acc, u, r, d, cols) },
            _ => {}
        }
    }
    body(acc, u, r, d, cols)
}

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

impl MomentAccumulator {
    /// An empty accumulator for layers of widths `dims` (names default to `layer{i}`).
    pub fn new(dims: &[usize]) -> Result<Self> {
        if dims.is_empty() {
            return Err(Error::invalid(
                "the moment accumulator needs at least one layer",
            ));
        }
        let st = PassState::new(dims.to_vec())?;
        let d: usize = dims.iter().sum();
        let dz = d + dims.len();
        let cells = dz
            .checked_mul(dz)
            .ok_or_else(|| Error::Memory("accumulator size overflows".into()))?;
        if cells > (isize::MAX as usize) / 16 {
            return Err(Error::Memory(format!(
                "accumulator of {dz}² cells cannot be allocated"
            )));
        }
        Ok(MomentAccumulator {
            st,
            exps: None,
            s: crate::linalg::hinted_vec(
                cells,
                format_args!(
                    "the all-pairs moment accumulator for {} layers (D = {d})",
                    dims.len()
                ),
            )?,
            sums: crate::memory::try_vec(dz, 0.0, "the column sums of the moment pass")?,
        })
    }

    pass_options!();

    pub fn compute(&self) -> Compute {
        self.st.compute
    }

    pub fn dims(&self) -> &[usize] {
        &self.st.dims
    }
    pub fn names(&self) -> &[String] {
        &self.st.names
    }
    pub(super) fn d(&self) -> usize {
        self.st.d()
    }
    pub(super) fn dz(&self) -> usize {
        self.d() + self.st.dims.len()
    }

    /// Set the reference shift `μ0` (length D, finite) before the first row; otherwise the
    /// first block's column means are used. A shift near the mean of *all* rows keeps the
    /// products small even when the first block is not representative (sorted or
    /// concatenated data); the results do not depend on it beyond rounding.
    pub fn set_shift(&mut self, shift: &[f64]) -> Result<()> {
        self.st.set_shift(shift)
    }

    /// Set the per-layer scale exponents before the first row (see [`SCALE_BAND`]; each in
    /// ±1000); otherwise the first block chooses them.
    pub fn set_scale(&mut self, exps: &[i32]) -> Result<()> {
        if self.st.n > 0 || self.exps.is_some() {
            return Err(Error::invalid(
                "the scale can only be set before the first row is accumulated",
            ));
        }
        if exps.len() != self.st.dims.len() || exps.iter().any(|e| e.abs() > 1000) {
            return Err(Error::invalid(format!(
                "the scale needs one exponent in ±1000 per layer ({} layers), got {exps:?}",
                self.st.dims.len()
            )));
        }
        self.exps = Some(exps.to_vec());
        Ok(())
    }

    /// The per-layer scale exponents in force (all 0 before the first block).
    pub fn scale_exps(&self) -> Vec<i32> {
        self.exps
            .clone()
            .unwrap_or_else(|| vec![0; self.st.dims.len()])
    }

    /// Per layer `2^-e`.
    fn factors(&self) -> Vec<f64> {
        self.scale_exps().iter().map(|&e| pow2(-e)).collect()
    }

    /// Per column of `w = [u, r]` (D + L): the exponent its values carry relative to
    /// `to` when they are in units of `from` (`u`: e_from − e_to; `r = ‖u‖²`: twice).
    fn column_shift(&self, from: &[i32], to: &[i32]) -> Vec<i32> {
        let mut k = Vec::with_capacity(self.dz());
        for (l, &dl) in self.st.dims.iter().enumerate() {
            k.extend(std::iter::repeat_n(from[l] - to[l], dl));
        }
        for l in 0..self.st.dims.len() {
            k.push(2 * (from[l] - to[l]));
        }
        k
    }

    /// Re-express the sums in the units of the exponents `to` (exact: powers of two).
    fn rescale(&mut self, to: &[i32]) {
        let from = self.scale_exps();
        if from == to {
            return;
        }
        let k = self.column_shift(&from, to);
        let dz = self.dz();
        let kk = &k;
        self.s.par_chunks_mut(dz).enumerate().for_each(|(j, col)| {
            for (i, v) in col.iter_mut().enumerate() {
                *v = ldexp(*v, kk[i] + kk[j]);
            }
        });
        for (v, &e) in self.sums.iter_mut().zip(&k) {
            *v = ldexp(*v, e);
        }
        self.exps = Some(to.to_vec());
    }

    /// Add `rows` rows: `block[l]` is the row-major `rows × d_l` data of layer `l`.
    /// Errors leave the accumulator unchanged.
    pub fn update<T: Element>(&mut self, block: &[&[T]], rows: usize) -> Result<()> {
        if !self.st.screen(block, rows)? {
            return Ok(());
        }
        let d = self.d();
        let dz = self.dz();
        if self.exps.is_none() {
            let mu = self.st.shift.as_deref().unwrap_or(&[]);
            self.exps = Some(block_exps(&self.st.dims, &self.st.offsets, block, mu));
        }
        let fac = self.factors();
        if self.st.compute == Compute::F32 && self.update_f32(block, rows, &fac)? {
            return Ok(());
        }
        // w rows (row-major rows × dz) = column-major dz × rows.
        let mut wbuf = std::mem::take(&mut self.st.scratch.w);
        let w = sized(&mut wbuf, rows * dz)?;
        let st = &self.st;
        w.par_chunks_mut(dz).enumerate().for_each(|(a, wr)| {
            let (ur, rr) = wr.split_at_mut(d);
            st.shift_row(block, a, &fac, ur, rr, |u| u);
        });
        let view = Strided {
            u: w,
            k: rows,
            n: dz,
            rs: dz,
            cs: 1,
        };
        syrk_upper_add(&mut self.s, dz, view, &mut self.st.scratch.pack64)?;
        let colsum = column_sums(w, dz);
        for (s, c) in self.sums.iter_mut().zip(&colsum) {
            *s += c;
        }
        self.st.scratch.w = wbuf;
        self.st.n += rows as u64;
        Ok(())
    }

    /// [`Compute::F32`] update (shapes and finiteness already checked, shift set): the
    /// `D × D` SYRK in f32 (sums over at most [`F32_SUM_ROWS`] rows, each added into the f64
    /// upper triangle); the squared-norm columns, their products with `u` and the
    /// column sums in f64 from the same f32-rounded `u`. `Ok(false)`, with nothing
    /// changed, when a shifted value exceeds [`F32_SAFE`]: the caller does the block in f64.
    fn update_f32<T: Element>(&mut self, block: &[&[T]], rows: usize, fac: &[f64]) -> Result<bool> {
        let d = self.d();
        let dz = self.dz();
        let lc = self.st.dims.len();
        // u (row-major rows × D, f32) and r (row-major rows × L, f64, from the rounded u).
        let mut scratch = std::mem::take(&mut self.st.scratch);
        let u = sized(&mut scratch.u, rows * d)?;
        let r = sized(&mut scratch.r, rows * lc)?;
        let st = &self.st;
        u.par_chunks_mut(d)
            .zip(r.par_chunks_mut(lc))
            .enumerate()
            .for_each(|(a, (ur, rr))| st.shift_row(block, a, fac, ur, rr, |u| u as f32));
        let uu: &[f32] = u;
        if !f32_products_ok(|i| f64::from(uu[i]), rows, d) {
            self.st.scratch = scratch;
            return Ok(false);
        }
        // D × D part: the f32 SYRK, its partial sums added into the f64 upper triangle.
        let view = Strided {
            u: &*u,
            k: rows,
            n: d,
            rs: d,
            cs: 1,
        };
        syrk_upper_add(&mut self.s, dz, view, &mut scratch.pack32)?;
        // Columns D..D+L of S (upper triangle: rows 0..D+l of column D+l) in f64:
        // S[i, D+l] = Σ_a u_ai r_al (i < D), S[D+k, D+l] = Σ_a r_ak r_al (k ≤ l).
        const CH: usize = 256;
        let cross: Vec<Vec<f64>> = (0..d.div_ceil(CH))
            .into_par_iter()
            .map(|c| {
                let (i0, i1) = (c * CH, ((c + 1) * CH).min(d));
                let mut acc = vec![0.0f64; lc * (i1 - i0)];
                norm_products(&mut acc, u, r, d, i0..i1);
                acc
            })
            .collect();
        for l in 0..lc {
            let col = &mut self.s[(d + l) * dz..(d + l + 1) * dz];
            for (c, acc) in cross.iter().enumerate() {
                let i0 = c * CH;
                let w = acc.len() / lc;
                for (x, y) in col[i0..i0 + w].iter_mut().zip(&acc[l * w..(l + 1) * w]) {
                    *x += y;
                }
            }
            for rr in r.chunks_exact(lc) {
                for k in 0..=l {
                    col[d + k] += rr[k] * rr[l];
                }
            }
        }
        // Column sums of w = [u, r] (f64).
        let mut colsum = column_sums(u, d);
        colsum.extend(column_sums(r, lc));
        for (s, c) in self.sums.iter_mut().zip(&colsum) {
            *s += c;
        }
        self.st.scratch = scratch;
        self.st.n += rows as u64;
        Ok(true)
    }

    /// Re-express the sums under the shift `new_shift` (exact algebra; `S` becomes full).
    fn reshift(&mut self, new_shift: &[f64]) {
        let Some(old) = self.st.shift.as_ref() else {
            self.st.shift = Some(new_shift.to_vec());
            return;
        };
        let d = self.d();
        let dz = self.dz();
        let lc = self.st.dims.len();
        let n = self.st.n as f64;
        // in the accumulated units: (μ_old − μ_new) · 2^-e of its layer
        let fac = self.factors();
        let mut delta: Vec<f64> = old.iter().zip(new_shift).map(|(a, b)| a - b).collect();
        for (l, f) in fac.iter().enumerate() {
            for v in &mut delta[self.st.offsets[l]..self.st.offsets[l + 1]] {
                *v *= f;
            }
        }
        let e = self.st.layer_sq_norms(&delta);
        symmetrize_from_upper(&mut self.s, dz);
        let s = &self.s;
        let sums = &self.sums;
        let offsets = &self.st.offsets;
        let delta = &delta;
        // P[i][k] = Σ_{j∈k} S[i,j] δ_j   (D × L, row-major)
        let p: Vec<f64> = (0..d)
            .into_par_iter()
            .flat_map_iter(|i| {
                (0..lc).map(move |k| {
                    (offsets[k]..offsets[k + 1])
                        .map(|j| s[j * dz + i] * delta[j])
                        .sum::<f64>()
                })
            })
            .collect();
        // δ_kᵀ v over layer k's columns, for v = s_u, S[U, R_l] and P[·][l].
        let dot = |k: usize, v: &dyn Fn(usize) -> f64| -> f64 {
            (offsets[k]..offsets[k + 1]).map(|i| delta[i] * v(i)).sum()
        };
        let ds: Vec<f64> = (0..lc).map(|k| dot(k, &|j| sums[j])).collect();
        // δ_kᵀ S[U_k, R_l]
        let dsr: Vec<f64> = (0..lc * lc)
            .map(|kl| dot(kl / lc, &|i| s[(d + kl % lc) * dz + i]))
            .collect();
        // δ_kᵀ S[U_k,U_l] δ_l = Σ_{i∈k} δ_i P[i][l]
        let dsd: Vec<f64> = (0..lc * lc)
            .map(|kl| dot(kl / lc, &|i| p[i * lc + kl % lc]))
            .collect();
        let new_sr: Vec<f64> = (0..lc)
            .map(|k| sums[d + k] + 2.0 * ds[k] + n * e[k])
            .collect();
        // New S[U_i, R_k].
        let new_ur: Vec<f64> = (0..d)
            .flat_map(|i| {
                let p = &p;
                let new_sr = &new_sr;
                let delta = &delta;
                let e = &e;
                (0..lc).map(move |k| {
                    s[(d + k) * dz + i]
                        + 2.0 * p[i * lc + k]
                        + e[k] * sums[i]
                        + delta[i] * new_sr[k]
                })
            })
            .collect();
        // New S[R_k, R_l].
        let mut new_rr = vec![0.0; lc * lc];
        for k in 0..lc {
            for l in 0..lc {
                let srr = s[(d + l) * dz + d + k];
                new_rr[k * lc + l] = srr
                    + 2.0 * dsr[l * lc + k]
                    + e[l] * sums[d + k]
                    + 2.0 * dsr[k * lc + l]
                    + 4.0 * dsd[k * lc + l]
                    + 2.0 * e[l] * ds[k]
                    + e[k] * sums[d + l]
                    + 2.0 * e[k] * ds[l]
                    + n * e[k] * e[l];
            }
        }
        // UU block in place: S + δ s_uᵀ + s_u δᵀ + n δ δᵀ (old s_u).
        let su: Vec<f64> = sums[..d].to_vec();
        self.s.par_chunks_mut(dz).enumerate().for_each(|(j, col)| {
            if j < d {
                for i in 0..d {
                    col[i] += delta[i] * su[j] + su[i] * delta[j] + n * delta[i] * delta[j];
                }
                // Row R_k of column j (lower part): S[R_k, U_j]
                for k in 0..lc {
                    col[d + k] = new_ur[j * lc + k];
                }
            } else {
                let k = j - d;
                for i in 0..d {
                    col[i] = new_ur[i * lc + k];
                }
                for l in 0..lc {
                    col[d + l] = new_rr[l * lc + k];
                }
            }
        });
        for (si, di) in self.sums[..d].iter_mut().zip(delta.iter()) {
            *si += n * di;
        }
        self.sums[d..d + lc].copy_from_slice(&new_sr[..lc]);
        self.st.shift = Some(new_shift.to_vec());
    }

    /// Add the rows of `other` (same layer widths). Exact whatever the two shifts are.
    pub fn merge(&mut self, other: &MomentAccumulator) -> Result<()> {
        if other.st.dims != self.st.dims {
            return Err(Error::Mismatch(format!(
                "cannot merge accumulators of layer widths {:?} and {:?}",
                self.st.dims, other.st.dims
            )));
        }
        if other.st.n == 0 {
            return Ok(());
        }
        let base = self.st.n;
        for (mine, theirs) in self.st.nonfinite.iter_mut().zip(&other.st.nonfinite) {
            if mine.is_none() {
                *mine = theirs.map(|r| r + base);
            }
        }
        if self.st.n == 0 {
            let names = std::mem::take(&mut self.st.names);
            let nf = std::mem::take(&mut self.st.nonfinite);
            *self = other.clone();
            self.st.names = names;
            self.st.nonfinite = nf;
            return Ok(());
        }
        // Under one shift and scale (every task of a distributed tile) the sums simply add;
        // else `other` is rescaled to this one's units and re-shifted to its shift first (a
        // copy: its full matrix).
        let reshifted;
        let o = if self.st.shift == other.st.shift && self.scale_exps() == other.scale_exps() {
            other
        } else {
            let mut c = other.clone();
            c.rescale(&self.scale_exps());
            if let Some(sh) = self.st.shift.clone() {
                if c.st.shift.as_ref() != Some(&sh) {
                    c.reshift(&sh);
                }
            }
            reshifted = c;
            &reshifted
        };
        let dz = self.dz();
        // Add o's upper triangle (valid in both cases).
        self.s
            .par_chunks_mut(dz)
            .zip(o.s.par_chunks(dz))
            .enumerate()
            .for_each(|(j, (a, b))| {
                for i in 0..=j {
                    a[i] += b[i];
                }
            });
        for (a, b) in self.sums.iter_mut().zip(&o.sums) {
            *a += b;
        }
        self.st.n += o.st.n;
        Ok(())
    }

    /// Centre the sums at the exact mean and return the [`Moments`].
    pub fn finalize(mut self) -> Result<Moments> {
        if self.st.n == 0 {
            return Err(Error::invalid("no rows were accumulated"));
        }
        let d = self.d();
        let dz = self.dz();
        let lc = self.st.dims.len();
        let n = self.st.n as f64;
        self.check_products()?;
        let shift = self.st.shift.clone().unwrap_or_else(|| vec![0.0; d]);
        let exps = self.scale_exps();
        let fac = self.factors();
        // per column: the layer's 2^e (the sums are in units of 2^-e)
        let mut col_exp = Vec::with_capacity(d);
        for (l, &dl) in self.st.dims.iter().enumerate() {
            col_exp.extend(std::iter::repeat_n(l, dl));
        }
        let mean: Vec<f64> = shift
            .iter()
            .zip(&self.sums)
            .zip(&col_exp)
            .map(|((m, s), &l)| m + ldexp(s / n, exps[l]))
            .collect();
        self.reshift(&mean);
        let shift_offset = (0..d)
            .map(|f| {
                let var = self.s[f * dz + f] / n;
                if var > 0.0 {
                    ((mean[f] - shift[f]) * fac[col_exp[f]]).abs() / var.sqrt()
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max);
        let mut rr = vec![0.0; lc * lc];
        for k in 0..lc {
            for l in 0..lc {
                rr[k * lc + l] = self.s[(d + l) * dz + d + k];
            }
        }
        // Compact the D×D part (column-major, symmetric) out of the (D+L)² buffer in place.
        let mut s = std::mem::take(&mut self.s);
        for j in 0..d {
            s.copy_within(j * dz..j * dz + d, j * d);
        }
        s.truncate(d * d);
        s.shrink_to_fit();
        Ok(Moments {
            n: self.st.n,
            dims: self.st.dims,
            offsets: self.st.offsets,
            names: self.st.names,
            mean,
            cov: s,
            rr,
            nonfinite: self.st.nonfinite,
            shift_offset,
            scale_exp: exps,
        })
    }

    /// With finiteness enforced (no NaN or Inf came in), every sum must be finite: one that
    /// is not overflowed — a value too large for f64 products relative to its layer's unit
    /// (its first block's spread, see [`SCALE_BAND`]): an [`Error::NonFinite`] naming the
    /// layers, never a NaN or 0 passed on as a result.
    fn check_products(&self) -> Result<()> {
        if !self.st.check_finite {
            return Ok(());
        }
        let dz = self.dz();
        let d = self.d();
        let layer_of = |i: usize| {
            if i >= d {
                i - d
            } else {
                self.st.offsets.partition_point(|&o| o <= i) - 1
            }
        };
        let bad_sum = self.sums.iter().position(|v| !v.is_finite());
        let bad_cell = (0..dz).into_par_iter().find_map_first(|j| {
            (0..=j)
                .find(|&i| !self.s[j * dz + i].is_finite())
                .map(|i| (i, j))
        });
        let (a, b) = match (bad_sum, bad_cell) {
            (Some(i), _) => (i, i),
            (None, Some(c)) => c,
            (None, None) => return Ok(()),
        };
        let (la, lb) = (layer_of(a), layer_of(b));
        let which = if la == lb {
            format!("layer {:?}", self.st.names[la])
        } else {
            format!("layers {:?} and {:?}", self.st.names[la], self.st.names[lb])
        };
        Err(Error::NonFinite(format!(
            "{which}: the sums of products overflowed the f64 range (values more than about \
             1e150 times the spread of the layer's first rows: an outlier, or rows of very \
             different scales); no result is given rather than a wrong one"
        )))
    }
}
