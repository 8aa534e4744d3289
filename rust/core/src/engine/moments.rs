//! Engine 1: exact streamed moments of concatenated layers (one pass, all pairs at once).
//!
//! # What is accumulated
//! For layers of widths `d_1 … d_L` (possibly from two stores, concatenated), each row is
//! `z = [x_1 … x_L]` (`D = Σ d_l`). The accumulator keeps a reference shift `μ0` (the first
//! block's column means) and, for the shifted row `u = z − μ0` extended with the per-layer
//! squared norms `r_l = ‖u_l‖²`, i.e. `w = [u, r_1 … r_L]` (`D + L` columns):
//!
//! * `S = Σ_a w_a w_aᵀ` (f64, upper triangle only: one packed SYRK per block, parallel,
//!   [`crate::linalg::packed`]),
//! * `s = Σ_a w_a` and the row count `n`.
//!
//! Shifting before any product keeps the products small: LLM activations have per-feature
//! offsets hundreds of times their spread, and uncentred products cancel catastrophically.
//! Every product is computed in f64 (inputs f32/f64 are widened first).
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
use crate::error::{Error, Result};
use crate::linalg::packed::{syrk_upper_add, PackedElem, Strided};
use crate::linalg::symmetrize_from_upper;
use crate::memory::{fmt_bytes, try_vec, Budget};
use crate::monitor::Monitor;
use crate::store::stream::{self, RowSource};
use rayon::prelude::*;

/// Scalar types a block may hold (widened to f64 before any arithmetic).
pub trait Element: Copy + Send + Sync {
    fn to_f64(self) -> f64;
}
impl Element for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
}
impl Element for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

/// Arithmetic of the block products (the accumulation across blocks is always f64).
///
/// * [`Compute::F64`] (default): every product in f64.
/// * [`Compute::F32`]: the `D × D` part of `Σ_a u_a u_aᵀ` (the SYRK, nearly all the work)
///   multiplies the **shifted** values rounded to f32 with f32 sums over at most
///   [`F32_SUM_ROWS`] rows, each partial sum added into the f64 accumulator; everything
///   that involves the squared norms (the debiased estimators' 4th-order sums), the column
///   sums and the shift stay f64. Twice the SIMD width; the error is that of rounding the
///   shifted data to f32 plus `√b·u`-sized sums (measured against f64 in the tests: ≤ 1e-6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

/// Most rows per block in [`Compute::F32`] (the f32 row buffer, `rows × D`, is the block):
/// two packed-SYRK slices of 768 rows.
pub const F32_BLOCK_ROWS: usize = 1536;

const MAGIC: &[u8; 8] = b"LSMOMACC";
const VERSION: u32 = 1;

/// The streaming accumulator (a plain value: `update`, `merge`, `to_bytes`/`from_bytes`).
#[derive(Clone, Debug)]
pub struct MomentAccumulator {
    dims: Vec<usize>,
    offsets: Vec<usize>,
    names: Vec<String>,
    /// Reference shift μ0 (length D), set by the first non-empty block.
    shift: Option<Vec<f64>>,
    /// Column-major (D+L)×(D+L); upper triangle valid.
    s: Vec<f64>,
    /// Column sums of w (length D+L).
    sums: Vec<f64>,
    n: u64,
    /// When false, non-finite values are accumulated (they turn the affected cells NaN).
    check_finite: bool,
    /// First row (in update order) holding a non-finite value, per layer.
    nonfinite: Vec<Option<u64>>,
    /// Arithmetic of the block products (not serialised: it does not change what is stored).
    compute: Compute,
    /// Block buffers kept between updates (contents meaningless between calls): fresh
    /// allocations of this size cost a page fault per 4 KiB and the kernel's zeroing.
    scratch: Scratch,
}

/// Reusable per-update buffers of [`MomentAccumulator`] (never serialised).
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// f64 path: `w` (rows × (D+L)).
    w: Vec<f64>,
    /// f32 path: `u` (rows × D), `r` (rows × L).
    u: Vec<f32>,
    r: Vec<f64>,
    /// Packed panels of the SYRK (f64 and f32 paths).
    pack64: Vec<f64>,
    pack32: Vec<f32>,
}

/// `v` resized to `len` without clearing what it already holds (every element is
/// overwritten by the caller before it is read).
/// A refused allocation is an [`Error::Memory`].
fn sized<T: Copy + Default + Send + Sync>(v: &mut Vec<T>, len: usize) -> Result<&mut [T]> {
    if v.len() < len {
        // Fresh, huge-page-hinted storage (block buffers are tens of MB, read in strides).
        *v = Vec::new();
        *v = crate::linalg::hinted_vec(len, "a block buffer of the moment pass")?;
    }
    Ok(&mut v[..len])
}

fn offsets_of(dims: &[usize]) -> Vec<usize> {
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
fn column_sums<T: Copy + Into<f64> + Sync>(x: &[T], width: usize) -> Vec<f64> {
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

/// Bytes of the accumulator for layers of these widths: `(D+L)² × 8` plus vectors.
pub fn accumulator_bytes(dims: &[usize]) -> u128 {
    let dz = dims.iter().map(|&d| d as u128).sum::<u128>() + dims.len() as u128;
    dz * dz * 8 + dz * 16
}

/// Peak bytes of one streaming pass: the accumulator, two blocks of `w` (f64) and the
/// packed SYRK panels (`2 (D+L) × KC` values of the compute type).
pub fn pass_bytes(dims: &[usize], block_rows: usize, compute: Compute) -> u128 {
    let d = dims.iter().map(|&d| d as u128).sum::<u128>();
    let dz = d + dims.len() as u128;
    let pack = match compute {
        Compute::F64 => 2 * dz * <f64 as PackedElem>::KC as u128 * 8,
        Compute::F32 => 2 * d * <f32 as PackedElem>::KC as u128 * 4,
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

impl MomentAccumulator {
    /// An empty accumulator for layers of widths `dims` (names default to `layer{i}`).
    pub fn new(dims: &[usize]) -> Result<Self> {
        if dims.is_empty() {
            return Err(Error::invalid(
                "the moment accumulator needs at least one layer",
            ));
        }
        if dims.contains(&0) {
            return Err(Error::invalid("a layer of width 0 cannot be accumulated"));
        }
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
            dims: dims.to_vec(),
            offsets: offsets_of(dims),
            names: (0..dims.len()).map(|i| format!("layer{i}")).collect(),
            shift: None,
            s: crate::linalg::hinted_vec(
                cells,
                format_args!(
                    "the all-pairs moment accumulator for {} layers (D = {d})",
                    dims.len()
                ),
            )?,
            sums: crate::memory::try_vec(dz, 0.0, "the column sums of the moment pass")?,
            n: 0,
            check_finite: true,
            nonfinite: vec![None; dims.len()],
            compute: Compute::F64,
            scratch: Scratch::default(),
        })
    }

    /// The arithmetic of the block products (see [`Compute`]).
    pub fn with_compute(mut self, compute: Compute) -> Self {
        self.compute = compute;
        self
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Set the layer names used in error messages (and carried into [`Moments`]).
    pub fn with_names(mut self, names: &[String]) -> Result<Self> {
        if names.len() != self.dims.len() {
            return Err(Error::invalid(format!(
                "{} names for {} layers",
                names.len(),
                self.dims.len()
            )));
        }
        self.names = names.to_vec();
        Ok(self)
    }

    /// `true` (default): a non-finite value is an [`Error::NonFinite`]. `false`: it is
    /// accumulated, and every cell involving its layer becomes NaN (first bad row recorded).
    pub fn with_check_finite(mut self, check: bool) -> Self {
        self.check_finite = check;
        self
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn n(&self) -> u64 {
        self.n
    }
    fn d(&self) -> usize {
        self.offsets[self.dims.len()]
    }
    fn dz(&self) -> usize {
        self.d() + self.dims.len()
    }

    /// Set the reference shift `μ0` (length D, finite) before the first row; otherwise the
    /// first block's column means are used. A shift near the mean of *all* rows keeps the
    /// products small even when the first block is not representative (sorted or
    /// concatenated data); the results do not depend on it beyond rounding.
    pub fn set_shift(&mut self, shift: &[f64]) -> Result<()> {
        if self.n > 0 || self.shift.is_some() {
            return Err(Error::invalid(
                "the shift can only be set before the first row is accumulated",
            ));
        }
        if shift.len() != self.d() {
            return Err(Error::Mismatch(format!(
                "shift has {} values, the layers have {} columns",
                shift.len(),
                self.d()
            )));
        }
        if !shift.iter().all(|v| v.is_finite()) {
            return Err(Error::invalid("the shift must be finite"));
        }
        self.shift = Some(shift.to_vec());
        Ok(())
    }

    /// Add `rows` rows: `block[l]` is the row-major `rows × d_l` data of layer `l`.
    /// Errors leave the accumulator unchanged.
    pub fn update<T: Element>(&mut self, block: &[&[T]], rows: usize) -> Result<()> {
        let l_count = self.dims.len();
        if block.len() != l_count {
            return Err(Error::Mismatch(format!(
                "block has {} layers, accumulator has {l_count}",
                block.len()
            )));
        }
        for (l, (x, &d)) in block.iter().zip(&self.dims).enumerate() {
            if Some(x.len()) != rows.checked_mul(d) {
                return Err(Error::Mismatch(format!(
                    "layer {:?}: block has {} values, expected {rows} rows × {d}",
                    self.names[l],
                    x.len()
                )));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        // Non-finite scan (first bad row per layer).
        let bad: Vec<Option<usize>> = block
            .par_iter()
            .zip(self.dims.par_iter())
            .map(|(x, &d)| {
                x.chunks(d)
                    .position(|r| r.iter().any(|v| !v.to_f64().is_finite()))
            })
            .collect();
        if self.check_finite {
            if let Some((l, a)) = bad.iter().enumerate().find_map(|(l, b)| b.map(|a| (l, a))) {
                return Err(Error::NonFinite(format!(
                    "layer {:?}: non-finite value (NaN/Inf) in row {}",
                    self.names[l],
                    self.n + a as u64
                )));
            }
        }
        for (l, b) in bad.iter().enumerate() {
            if let (Some(a), None) = (b, self.nonfinite[l]) {
                self.nonfinite[l] = Some(self.n + *a as u64);
            }
        }
        let d = self.d();
        let dz = self.dz();
        if self.shift.is_none() {
            let mut mu = vec![0.0; d];
            for (l, x) in block.iter().enumerate() {
                let dl = self.dims[l];
                let o = self.offsets[l];
                let m = &mut mu[o..o + dl];
                for r in x.chunks(dl) {
                    for (mi, v) in m.iter_mut().zip(r) {
                        *mi += v.to_f64();
                    }
                }
                for mi in m.iter_mut() {
                    *mi /= rows as f64;
                }
            }
            self.shift = Some(mu);
        }
        if self.compute == Compute::F32 {
            return self.update_f32(block, rows);
        }
        let mu = self.shift.as_deref().unwrap_or(&[]);
        // w rows (row-major rows × dz) = column-major dz × rows.
        let mut wbuf = std::mem::take(&mut self.scratch.w);
        let w = sized(&mut wbuf, rows * dz)?;
        let dims = &self.dims;
        let offsets = &self.offsets;
        w.par_chunks_mut(dz).enumerate().for_each(|(a, wr)| {
            for (l, x) in block.iter().enumerate() {
                let dl = dims[l];
                let o = offsets[l];
                let src = &x[a * dl..(a + 1) * dl];
                let mut r = 0.0;
                for ((dst, v), m) in wr[o..o + dl].iter_mut().zip(src).zip(&mu[o..o + dl]) {
                    let u = v.to_f64() - m;
                    *dst = u;
                    r += u * u;
                }
                wr[d + l] = r;
            }
        });
        let view = Strided {
            u: w,
            k: rows,
            n: dz,
            rs: dz,
            cs: 1,
        };
        syrk_upper_add(&mut self.s, dz, view, &mut self.scratch.pack64)?;
        let colsum = column_sums(w, dz);
        for (s, c) in self.sums.iter_mut().zip(&colsum) {
            *s += c;
        }
        self.scratch.w = wbuf;
        self.n += rows as u64;
        Ok(())
    }

    /// [`Compute::F32`] update (shapes and finiteness already checked, shift set): the
    /// `D × D` SYRK in f32 (sums over at most [`F32_SUM_ROWS`] rows, each added into the f64
    /// upper triangle); the squared-norm columns, their products with `u` and the
    /// column sums in f64 from the same f32-rounded `u`.
    fn update_f32<T: Element>(&mut self, block: &[&[T]], rows: usize) -> Result<()> {
        let d = self.d();
        let dz = self.dz();
        let lc = self.dims.len();
        let mu = self.shift.as_deref().unwrap_or(&[]);
        let dims = &self.dims;
        let offsets = &self.offsets;
        // u (row-major rows × D, f32) and r (row-major rows × L, f64, from the rounded u).
        let mut scratch = std::mem::take(&mut self.scratch);
        let u = sized(&mut scratch.u, rows * d)?;
        let r = sized(&mut scratch.r, rows * lc)?;
        u.par_chunks_mut(d)
            .zip(r.par_chunks_mut(lc))
            .enumerate()
            .for_each(|(a, (ur, rr))| {
                for (l, x) in block.iter().enumerate() {
                    let (dl, o) = (dims[l], offsets[l]);
                    let src = &x[a * dl..(a + 1) * dl];
                    let mut acc = 0.0f64;
                    for ((dst, v), m) in ur[o..o + dl].iter_mut().zip(src).zip(&mu[o..o + dl]) {
                        let q = (v.to_f64() - m) as f32;
                        *dst = q;
                        acc += f64::from(q) * f64::from(q);
                    }
                    rr[l] = acc;
                }
            });
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
                let w = i1 - i0;
                let mut acc = vec![0.0f64; lc * w];
                for (ur, rr) in u.chunks_exact(d).zip(r.chunks_exact(lc)) {
                    let ui = &ur[i0..i1];
                    for (l, &rl) in rr.iter().enumerate() {
                        for (s, &q) in acc[l * w..(l + 1) * w].iter_mut().zip(ui) {
                            *s += f64::from(q) * rl;
                        }
                    }
                }
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
        self.scratch = scratch;
        self.n += rows as u64;
        Ok(())
    }

    /// Re-express the sums under the shift `new_shift` (exact algebra; `S` becomes full).
    fn reshift(&mut self, new_shift: &[f64]) {
        let Some(old) = self.shift.as_ref() else {
            self.shift = Some(new_shift.to_vec());
            return;
        };
        let d = self.d();
        let dz = self.dz();
        let lc = self.dims.len();
        let n = self.n as f64;
        let delta: Vec<f64> = old.iter().zip(new_shift).map(|(a, b)| a - b).collect();
        let layer_of: Vec<usize> = (0..lc)
            .flat_map(|l| std::iter::repeat_n(l, self.dims[l]))
            .collect();
        let e: Vec<f64> = (0..lc)
            .map(|l| {
                delta[self.offsets[l]..self.offsets[l + 1]]
                    .iter()
                    .map(|x| x * x)
                    .sum()
            })
            .collect();
        symmetrize_from_upper(&mut self.s, dz);
        let s = &self.s;
        let sums = &self.sums;
        let offsets = &self.offsets;
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
        // δ_kᵀ s_uk
        let ds: Vec<f64> = (0..lc)
            .map(|k| {
                (offsets[k]..offsets[k + 1])
                    .map(|j| delta[j] * sums[j])
                    .sum()
            })
            .collect();
        // δ_kᵀ S[U_k, R_l]
        let dsr: Vec<f64> = (0..lc * lc)
            .map(|kl| {
                let (k, l) = (kl / lc, kl % lc);
                (offsets[k]..offsets[k + 1])
                    .map(|i| delta[i] * s[(d + l) * dz + i])
                    .sum()
            })
            .collect();
        // δ_kᵀ S[U_k,U_l] δ_l = Σ_{i∈k} δ_i P[i][l]
        let dsd: Vec<f64> = (0..lc * lc)
            .map(|kl| {
                let (k, l) = (kl / lc, kl % lc);
                (offsets[k]..offsets[k + 1])
                    .map(|i| delta[i] * p[i * lc + l])
                    .sum()
            })
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
        let _ = layer_of;
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
        self.shift = Some(new_shift.to_vec());
    }

    /// Add the rows of `other` (same layer widths). Exact whatever the two shifts are.
    pub fn merge(&mut self, other: &MomentAccumulator) -> Result<()> {
        if other.dims != self.dims {
            return Err(Error::Mismatch(format!(
                "cannot merge accumulators of layer widths {:?} and {:?}",
                self.dims, other.dims
            )));
        }
        if other.n == 0 {
            return Ok(());
        }
        let base = self.n;
        for (mine, theirs) in self.nonfinite.iter_mut().zip(&other.nonfinite) {
            if mine.is_none() {
                *mine = theirs.map(|r| r + base);
            }
        }
        if self.n == 0 {
            let names = std::mem::take(&mut self.names);
            let nf = std::mem::take(&mut self.nonfinite);
            *self = other.clone();
            self.names = names;
            self.nonfinite = nf;
            return Ok(());
        }
        let mut o = other.clone();
        if let Some(sh) = self.shift.clone() {
            o.reshift(&sh);
        }
        let dz = self.dz();
        // o.s is full now; add its upper triangle.
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
        self.n += o.n;
        Ok(())
    }

    /// Centre the sums at the exact mean and return the [`Moments`].
    pub fn finalize(mut self) -> Result<Moments> {
        if self.n == 0 {
            return Err(Error::invalid("no rows were accumulated"));
        }
        let d = self.d();
        let dz = self.dz();
        let lc = self.dims.len();
        let n = self.n as f64;
        let shift = self.shift.clone().unwrap_or_else(|| vec![0.0; d]);
        let mean: Vec<f64> = shift
            .iter()
            .zip(&self.sums)
            .map(|(m, s)| m + s / n)
            .collect();
        self.reshift(&mean);
        let shift_offset = (0..d)
            .map(|f| {
                let var = self.s[f * dz + f] / n;
                if var > 0.0 {
                    (mean[f] - shift[f]).abs() / var.sqrt()
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
            n: self.n,
            dims: self.dims,
            offsets: self.offsets,
            names: self.names,
            mean,
            cov: s,
            rr,
            nonfinite: self.nonfinite,
            shift_offset,
        })
    }

    /// Versioned little-endian serialisation (upper triangle of `S` only).
    /// A refused allocation of the blob is an [`Error::Memory`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let dz = self.dz();
        let d = self.d();
        let names: usize = self.names.iter().map(|n| n.len() + 8).sum();
        let mut out = crate::memory::try_with_capacity(
            64 + names + self.dims.len() * 16 + dz * (dz + 1) * 4 + dz * 16,
            "the serialised moment accumulator",
        )?;
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.dims.len() as u64).to_le_bytes());
        for &dl in &self.dims {
            out.extend_from_slice(&(dl as u64).to_le_bytes());
        }
        for name in &self.names {
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.n.to_le_bytes());
        out.push(self.check_finite as u8);
        for nf in &self.nonfinite {
            out.extend_from_slice(&nf.unwrap_or(u64::MAX).to_le_bytes());
        }
        out.push(self.shift.is_some() as u8);
        if let Some(sh) = &self.shift {
            for v in sh {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        debug_assert_eq!(self.sums.len(), dz);
        let _ = d;
        for v in &self.sums {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for j in 0..dz {
            for v in &self.s[j * dz..j * dz + j + 1] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(fmt_err("not a layerscope moment accumulator (bad magic)"));
        }
        let version = u32::from_le_bytes(r.arr::<4>()?);
        if version != VERSION {
            return Err(fmt_err(format!(
                "unsupported accumulator version {version} (this build reads {VERSION})"
            )));
        }
        let lc = r.u64()? as usize;
        if lc == 0 || lc > r.remaining() / 8 {
            return Err(fmt_err(format!("bad layer count {lc}")));
        }
        let mut dims = Vec::with_capacity(lc);
        for _ in 0..lc {
            let dl = r.u64()?;
            if dl == 0 || dl > (r.remaining() as u64) {
                return Err(fmt_err(format!("bad layer width {dl}")));
            }
            dims.push(dl as usize);
        }
        let mut names = Vec::with_capacity(lc);
        for _ in 0..lc {
            let len = r.u64()? as usize;
            let s = r.take(len)?;
            names.push(
                String::from_utf8(s.to_vec()).map_err(|_| fmt_err("layer name is not UTF-8"))?,
            );
        }
        let n = r.u64()?;
        let check_finite = match r.take(1)?[0] {
            0 => false,
            1 => true,
            v => return Err(fmt_err(format!("bad flag byte {v}"))),
        };
        let mut nonfinite = Vec::with_capacity(lc);
        for _ in 0..lc {
            let v = r.u64()?;
            nonfinite.push(if v == u64::MAX { None } else { Some(v) });
        }
        let has_shift = match r.take(1)?[0] {
            0 => false,
            1 => true,
            v => return Err(fmt_err(format!("bad flag byte {v}"))),
        };
        let d = dims
            .iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .ok_or_else(|| fmt_err("widths overflow"))?;
        let dz = d + lc;
        // Exact remaining length check before allocating anything large.
        let tri = (dz as u128) * (dz as u128 + 1) / 2;
        let need = (if has_shift { d as u128 } else { 0 } + dz as u128 + tri) * 8;
        if need != r.remaining() as u128 {
            return Err(fmt_err(format!(
                "accumulator payload has {} bytes, expected {need} for widths {dims:?}",
                r.remaining()
            )));
        }
        if (n == 0) == has_shift {
            return Err(fmt_err("row count and shift disagree"));
        }
        let shift = if has_shift { Some(r.f64s(d)?) } else { None };
        let sums = r.f64s(dz)?;
        let mut s = crate::linalg::hinted_vec(dz * dz, "the deserialised moment accumulator")?;
        for j in 0..dz {
            let col = r.f64s(j + 1)?;
            s[j * dz..j * dz + j + 1].copy_from_slice(&col);
        }
        Ok(MomentAccumulator {
            offsets: offsets_of(&dims),
            dims,
            names,
            shift,
            s,
            sums,
            n,
            check_finite,
            nonfinite,
            compute: Compute::F64,
            scratch: Scratch::default(),
        })
    }
}

fn fmt_err(msg: impl Into<String>) -> Error {
    Error::format("<moment accumulator bytes>", msg)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}
impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, k: usize) -> Result<&'a [u8]> {
        if k > self.remaining() {
            return Err(fmt_err("truncated accumulator bytes"));
        }
        let s = &self.b[self.pos..self.pos + k];
        self.pos += k;
        Ok(s)
    }
    fn arr<const K: usize>(&mut self) -> Result<[u8; K]> {
        let s = self.take(K)?;
        let mut a = [0u8; K];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr::<8>()?))
    }
    fn f64s(&mut self, k: usize) -> Result<Vec<f64>> {
        let s = self.take(k.checked_mul(8).ok_or_else(|| fmt_err("size overflow"))?)?;
        Ok(s.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
}

/// Finalised moments (see the module docs). `cov` is the full symmetric `D × D` centred
/// cross-product matrix `C = Σ (z − z̄)(z − z̄)ᵀ` (symmetric, so row- and column-major agree).
#[derive(Clone, Debug)]
pub struct Moments {
    pub n: u64,
    pub dims: Vec<usize>,
    /// Column ranges: layer `l` is `offsets[l]..offsets[l+1]`.
    pub offsets: Vec<usize>,
    pub names: Vec<String>,
    /// Column means `z̄` (length D).
    pub mean: Vec<f64>,
    /// `C` (D × D).
    pub cov: Vec<f64>,
    /// `rr[k*L + l] = Σ_a r̄_{k,a} r̄_{l,a}`, `r̄_{l,a} = ‖x_{l,a} − x̄_l‖²`.
    pub rr: Vec<f64>,
    /// First row with a non-finite value per layer (only when finiteness was not enforced).
    pub nonfinite: Vec<Option<u64>>,
    /// `max_f |z̄_f − μ0_f| / σ_f` over features with variance (0 when none): how far the
    /// reference shift was from the mean, in standard deviations. The f32 products'
    /// rounding error grows with `(1 + this)²`; tests cover values up to about 1.
    pub shift_offset: f64,
}

impl Moments {
    pub fn num_layers(&self) -> usize {
        self.dims.len()
    }
    /// Total width D.
    pub fn width(&self) -> usize {
        self.offsets[self.dims.len()]
    }
    fn check(&self, i: usize, j: usize) -> Result<()> {
        let l = self.dims.len();
        if i >= l || j >= l {
            return Err(Error::invalid(format!(
                "layer index ({i}, {j}) out of range for {l} layers"
            )));
        }
        Ok(())
    }
    /// `C_ij = Σ_a (x_{i,a} − x̄_i)(x_{j,a} − x̄_j)ᵀ` as a row-major `d_i × d_j` buffer.
    pub fn block(&self, i: usize, j: usize) -> Result<Vec<f64>> {
        self.check(i, j)?;
        let d = self.width();
        let (ri, rj) = (
            self.offsets[i]..self.offsets[i + 1],
            self.offsets[j]..self.offsets[j + 1],
        );
        let mut out = Vec::with_capacity(ri.len() * rj.len());
        // C symmetric: row r of C is column r of the column-major buffer.
        for r in ri {
            out.extend_from_slice(&self.cov[r * d + rj.start..r * d + rj.end]);
        }
        Ok(out)
    }
    /// `C_ij` as a faer matrix.
    pub fn block_mat(&self, i: usize, j: usize) -> Result<faer::Mat<f64>> {
        self.check(i, j)?;
        let d = self.width();
        let (oi, oj) = (self.offsets[i], self.offsets[j]);
        Ok(faer::Mat::from_fn(self.dims[i], self.dims[j], |r, c| {
            self.cov[(oj + c) * d + oi + r]
        }))
    }
    /// Column means of layer `i`.
    pub fn layer_mean(&self, i: usize) -> Result<&[f64]> {
        self.check(i, i)?;
        Ok(&self.mean[self.offsets[i]..self.offsets[i + 1]])
    }
    /// `Σ_a r̄_{k,a} r̄_{l,a}`.
    pub fn rr(&self, k: usize, l: usize) -> Result<f64> {
        self.check(k, l)?;
        Ok(self.rr[k * self.dims.len() + l])
    }
    /// `tr C_kk = Σ_a ‖x_{k,a} − x̄_k‖²`.
    pub fn trace(&self, k: usize) -> Result<f64> {
        self.check(k, k)?;
        let d = self.width();
        Ok((self.offsets[k]..self.offsets[k + 1])
            .map(|i| self.cov[i * d + i])
            .sum())
    }
    /// `‖C_ij‖_F²`.
    pub fn block_sq_norm(&self, i: usize, j: usize) -> Result<f64> {
        self.check(i, j)?;
        Ok(crate::linalg::block_sq_norm(
            &self.cov,
            self.width(),
            self.offsets[i]..self.offsets[i + 1],
            self.offsets[j]..self.offsets[j + 1],
        ))
    }
}

/// What [`Moments::cka_matrix`] computes per pair.
impl Moments {
    /// Linear CKA of layers `i` and `j` from the moments (exact, no second pass).
    ///
    /// With centred data `X̄_i` (rows = samples) and `C_ij = X̄_iᵀX̄_j`:
    /// * biased (Kornblith et al. 2019, HSIC of Gretton et al. 2005 with `K = X̄X̄ᵀ`):
    ///   `CKA = ‖C_ij‖_F² / (‖C_ii‖_F ‖C_jj‖_F)`;
    /// * debiased (unbiased HSIC of Song et al. 2012, eq. 5). With `K̃`, `L̃` the linear
    ///   kernels with zeroed diagonals and `r_a = ‖x̄_{i,a}‖²`, `s_a = ‖x̄_{j,a}‖²` (the
    ///   unbiased HSIC is translation invariant for the linear kernel, so centred data may be
    ///   used): `tr K̃L̃ = ‖C_ij‖² − Σ r_a s_a`, `1ᵀK̃1 = −tr C_ii`, `1ᵀK̃L̃1 = Σ r_a s_a`, so
    ///   `n(n−3)·HSIC₁ = ‖C_ij‖² − Σ r s + tr C_ii tr C_jj / ((n−1)(n−2)) − 2 Σ r s / (n−2)`
    ///   and `CKA = HSIC₁(i,j) / sqrt(HSIC₁(i,i) HSIC₁(j,j))` (may be negative; never clamped).
    ///
    /// NaN (never a made-up number) when a layer has zero variance (the denominator is 0),
    /// when the debiased self-HSIC is not positive (possible only for tiny `n`), or when the
    /// debiased estimator gets `n < 4` rows (its normalisation divides by `n − 3`).
    pub fn cka(&self, i: usize, j: usize, debiased: bool) -> Result<f64> {
        self.check(i, j)?;
        let cij = self.block_sq_norm(i, j)?;
        if i == j {
            let cii = cij;
            if debiased {
                let h = self.hsic1_scaled(i, i, cii)?;
                return Ok(if h > 0.0 { 1.0 } else { f64::NAN });
            }
            return Ok(if cii > 0.0 { 1.0 } else { f64::NAN });
        }
        let cii = self.block_sq_norm(i, i)?;
        let cjj = self.block_sq_norm(j, j)?;
        if !debiased {
            let den = cii.sqrt() * cjj.sqrt();
            return Ok(if den > 0.0 { cij / den } else { f64::NAN });
        }
        let hij = self.hsic1_scaled(i, j, cij)?;
        let hii = self.hsic1_scaled(i, i, cii)?;
        let hjj = self.hsic1_scaled(j, j, cjj)?;
        if hii > 0.0 && hjj > 0.0 {
            Ok(hij / (hii.sqrt() * hjj.sqrt()))
        } else {
            Ok(f64::NAN)
        }
    }

    /// `n(n−3)·HSIC₁` (Song et al. 2012) of the linear kernels of layers `i`, `j`, given
    /// `‖C_ij‖²`. NaN when `n < 4`.
    fn hsic1_scaled(&self, i: usize, j: usize, cij_sq: f64) -> Result<f64> {
        let n = self.n as f64;
        if self.n < 4 {
            return Ok(f64::NAN);
        }
        let rs = self.rr(i, j)?;
        let ti = self.trace(i)?;
        let tj = self.trace(j)?;
        Ok(cij_sq - rs + ti * tj / ((n - 1.0) * (n - 2.0)) - 2.0 * rs / (n - 2.0))
    }

    /// Linear CKA of every `(rows[a], cols[b])` pair, row-major `rows.len() × cols.len()`.
    /// Each distinct unordered pair is computed once (the value is symmetric); parallel.
    pub fn cka_matrix(&self, rows: &[usize], cols: &[usize], debiased: bool) -> Result<Vec<f64>> {
        for &i in rows.iter().chain(cols) {
            self.check(i, i)?;
        }
        let l = self.dims.len();
        // Squared block norms, each unordered pair once.
        let mut need = vec![false; l * l];
        for &i in rows.iter().chain(cols) {
            need[i * l + i] = true;
        }
        for &i in rows {
            for &j in cols {
                let (a, b) = if i <= j { (i, j) } else { (j, i) };
                need[a * l + b] = true;
            }
        }
        let pairs: Vec<(usize, usize)> = (0..l * l)
            .filter(|&k| need[k])
            .map(|k| (k / l, k % l))
            .collect();
        let norms: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| self.block_sq_norm(i, j))
            .collect::<Result<_>>()?;
        let mut sq = vec![f64::NAN; l * l];
        for (&(i, j), v) in pairs.iter().zip(norms) {
            sq[i * l + j] = v;
            sq[j * l + i] = v;
        }
        let value = |i: usize, j: usize| -> Result<f64> {
            let cij = sq[i * l + j];
            let (cii, cjj) = (sq[i * l + i], sq[j * l + j]);
            if debiased {
                let hij = self.hsic1_scaled(i, j, cij)?;
                let hii = self.hsic1_scaled(i, i, cii)?;
                let hjj = self.hsic1_scaled(j, j, cjj)?;
                if !(hii > 0.0 && hjj > 0.0) {
                    return Ok(f64::NAN);
                }
                if i == j {
                    return Ok(1.0);
                }
                Ok(hij / (hii.sqrt() * hjj.sqrt()))
            } else {
                if !(cii > 0.0 && cjj > 0.0) {
                    return Ok(f64::NAN);
                }
                if i == j {
                    return Ok(1.0);
                }
                Ok(cij / (cii.sqrt() * cjj.sqrt()))
            }
        };
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for &i in rows {
            for &j in cols {
                out.push(value(i, j)?);
            }
        }
        Ok(out)
    }
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

/// One streaming pass over every row of `src` (the selected layers of one store, of two
/// row-aligned stores side by side — the caller has checked that their row ids agree — or of
/// in-memory arrays) into a [`MomentAccumulator`] named `names`, shifted by
/// [`sample_shift`].
///
/// Blocks come from the one block reader ([`crate::store::stream::run`]: converted to f32 —
/// or f64 when a layer holds f64 — by a reader thread one block ahead of the SYRK). Fails
/// with [`Error::Memory`] before reading a row when the pass does not fit `budget`
/// ([`check_memory`]).
pub fn accumulate(
    src: &dyn RowSource,
    names: &[String],
    block_rows: Option<usize>,
    check_finite: bool,
    budget: &Budget,
    compute: Compute,
    monitor: &dyn Monitor,
) -> Result<MomentAccumulator> {
    let dims = src.dims();
    let block_rows = block_rows.unwrap_or_else(|| default_block_rows_for(&dims, compute));
    if block_rows == 0 {
        return Err(Error::invalid("block_rows must be at least 1"));
    }
    check_memory(&dims, block_rows, compute, budget)?;
    let mut acc = MomentAccumulator::new(&dims)?
        .with_names(names)?
        .with_check_finite(check_finite)
        .with_compute(compute);
    if let Some(shift) = sample_shift(src)? {
        acc.set_shift(&shift)?;
    }
    if src.has_f64() {
        stream::run::<f64>(src, block_rows, monitor, |b, rows| acc.update(b, rows))?;
    } else {
        stream::run::<f32>(src, block_rows, monitor, |b, rows| acc.update(b, rows))?;
    }
    Ok(acc)
}

/// Rows used by [`sample_shift`].
pub const SHIFT_SAMPLE_ROWS: u64 = 1024;

/// The column means of up to [`SHIFT_SAMPLE_ROWS`] rows spread evenly over all of `src`
/// (row `⌊(2i+1)·n / 2m⌋`, `i < m`): the reference shift of a pass, so that a first block
/// unlike the rest (sorted, concatenated or drifting data) does not leave the shifted values
/// large. `None` when a sampled value is not finite (the pass then reports the first bad row
/// itself) or there are no rows.
pub fn sample_shift(src: &dyn RowSource) -> Result<Option<Vec<f64>>> {
    let n = src.num_rows();
    if n == 0 {
        return Ok(None);
    }
    let m = n.min(SHIFT_SAMPLE_ROWS);
    let rows: Vec<u64> = (0..m).map(|i| ((2 * i + 1) * n) / (2 * m)).collect();
    let mut shift = Vec::new();
    for (l, dim) in src.dims().into_iter().enumerate() {
        let mut x = try_vec(
            rows.len() * dim,
            0.0,
            format_args!("{m} sampled rows of width {dim}"),
        )?;
        src.take_f64(l, &rows, &mut x)?;
        let mut mean = column_sums(&x, dim);
        for mu in mean.iter_mut() {
            *mu /= m as f64;
        }
        if !mean.iter().all(|v| v.is_finite()) {
            return Ok(None);
        }
        shift.extend(mean);
    }
    Ok(Some(shift))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, d: usize, seed: u64, offset: f64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n * d)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) + offset * ((i % d) as f64 + 1.0)
            })
            .collect()
    }

    fn naive(xs: &[Vec<f64>], dims: &[usize], n: usize) -> (Vec<f64>, Vec<f64>) {
        // centred C and rr, in f64 two-pass.
        let d: usize = dims.iter().sum();
        let mut z = vec![0.0; n * d];
        let offs = offsets_of(dims);
        for (l, x) in xs.iter().enumerate() {
            for a in 0..n {
                for c in 0..dims[l] {
                    z[a * d + offs[l] + c] = x[a * dims[l] + c];
                }
            }
        }
        let mean: Vec<f64> = (0..d)
            .map(|c| (0..n).map(|a| z[a * d + c]).sum::<f64>() / n as f64)
            .collect();
        for a in 0..n {
            for c in 0..d {
                z[a * d + c] -= mean[c];
            }
        }
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                cov[j * d + i] = (0..n).map(|a| z[a * d + i] * z[a * d + j]).sum();
            }
        }
        let lc = dims.len();
        let r: Vec<Vec<f64>> = (0..lc)
            .map(|l| {
                (0..n)
                    .map(|a| (offs[l]..offs[l + 1]).map(|c| z[a * d + c].powi(2)).sum())
                    .collect()
            })
            .collect();
        let mut rr = vec![0.0; lc * lc];
        for k in 0..lc {
            for l in 0..lc {
                rr[k * lc + l] = (0..n).map(|a| r[k][a] * r[l][a]).sum();
            }
        }
        (cov, rr)
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        num / den
    }

    #[test]
    fn streamed_merged_serialised_equal_naive() {
        let dims = [3usize, 5, 2];
        let n = 50;
        let xs: Vec<Vec<f64>> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| data(n, d, l as u64, 100.0))
            .collect();
        let (cov, rr) = naive(&xs, &dims, n);
        let slice = |a: usize, b: usize| -> Vec<&[f64]> {
            xs.iter()
                .zip(&dims)
                .map(|(x, &d)| &x[a * d..b * d])
                .collect()
        };
        // one shot
        let mut acc = MomentAccumulator::new(&dims).unwrap();
        acc.update(&slice(0, n), n).unwrap();
        let m = acc.clone().finalize().unwrap();
        assert!(rel(&m.cov, &cov) < 1e-12, "{}", rel(&m.cov, &cov));
        assert!(rel(&m.rr, &rr) < 1e-12);
        // blocks of uneven sizes
        let mut acc2 = MomentAccumulator::new(&dims).unwrap();
        for (a, b) in [(0, 1), (1, 7), (7, 30), (30, 50)] {
            acc2.update(&slice(a, b), b - a).unwrap();
        }
        let m2 = acc2.finalize().unwrap();
        assert!(rel(&m2.cov, &cov) < 1e-12);
        assert!(rel(&m2.rr, &rr) < 1e-12);
        // merge of two with different shifts, through bytes
        let mut a1 = MomentAccumulator::new(&dims).unwrap();
        a1.update(&slice(0, 20), 20).unwrap();
        let mut a2 = MomentAccumulator::new(&dims).unwrap();
        a2.update(&slice(20, 21), 1).unwrap();
        a2.update(&slice(21, 50), 29).unwrap();
        let a2 = MomentAccumulator::from_bytes(&a2.to_bytes().unwrap()).unwrap();
        a1.merge(&a2).unwrap();
        let m3 = a1.finalize().unwrap();
        assert!(rel(&m3.cov, &cov) < 1e-12, "{}", rel(&m3.cov, &cov));
        assert!(rel(&m3.rr, &rr) < 1e-12, "{}", rel(&m3.rr, &rr));
        // merge into empty
        let mut e = MomentAccumulator::new(&dims).unwrap();
        e.merge(&acc).unwrap();
        assert!(rel(&e.finalize().unwrap().cov, &cov) < 1e-12);
    }

    #[test]
    fn bad_bytes_are_format_errors() {
        let dims = [2usize, 3];
        let mut acc = MomentAccumulator::new(&dims).unwrap();
        let x = data(4, 2, 1, 0.0);
        let y = data(4, 3, 2, 0.0);
        acc.update(&[&x[..], &y[..]], 4).unwrap();
        let b = acc.to_bytes().unwrap();
        for cut in [0, 5, 8, 12, 20, b.len() - 1] {
            assert!(matches!(
                MomentAccumulator::from_bytes(&b[..cut]),
                Err(Error::Format { .. })
            ));
        }
        let mut bad = b.clone();
        bad[12] = 0xff; // layer count
        assert!(matches!(
            MomentAccumulator::from_bytes(&bad),
            Err(Error::Format { .. })
        ));
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            MomentAccumulator::from_bytes(&long),
            Err(Error::Format { .. })
        ));
        // flip every byte: never panics
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xa5;
            let _ = MomentAccumulator::from_bytes(&c);
        }
    }

    #[test]
    fn nonfinite_and_shape_errors() {
        let dims = [2usize];
        let mut acc = MomentAccumulator::new(&dims).unwrap();
        let x = [1.0f32, 2.0, 3.0, f32::NAN];
        match acc.update(&[&x[..]], 2) {
            Err(Error::NonFinite(m)) => assert!(m.contains("row 1"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(acc.n(), 0);
        assert!(matches!(acc.update(&[&x[..3]], 2), Err(Error::Mismatch(_))));
        assert!(MomentAccumulator::new(&[]).is_err());
        assert!(MomentAccumulator::new(&[0]).is_err());
        let b = |x: u64| Budget::argument(x).unwrap();
        assert!(check_memory(&[768; 13], 1024, Compute::F64, &b(1 << 20)).is_err());
        assert!(check_memory(&[768; 13], 1024, Compute::F64, &b(8 << 30)).is_ok());
        // 33 × 4096 (a 7–8B model's residual stream) in a 20 GiB budget: 12 layers fit.
        match check_memory(&[4096; 33], 1024, Compute::F32, &b(20 << 30)) {
            Err(Error::Memory(m)) => {
                assert!(m.contains("33 layers (D = 135168"), "{m}");
                assert!(m.contains("at most 12 of these 33 layers"), "{m}");
                assert!(m.contains("max_memory argument"), "{m}");
            }
            r => panic!("{r:?}"),
        }
        match check_memory(&[1 << 20], 1024, Compute::F32, &b(1 << 30)) {
            Err(Error::Memory(m)) => assert!(m.contains("not even one layer"), "{m}"),
            r => panic!("{r:?}"),
        }
    }

    /// Reference linear CKA from explicit Gram matrices (Song et al. 2012 eq. 5 for the
    /// unbiased HSIC; Kornblith et al. 2019 for the biased one), on raw (uncentred) data.
    fn naive_cka(x: &[f64], y: &[f64], n: usize, dx: usize, dy: usize, debiased: bool) -> f64 {
        let gram = |z: &[f64], d: usize| -> Vec<f64> {
            let mut g = vec![0.0; n * n];
            for a in 0..n {
                for b in 0..n {
                    g[a * n + b] = (0..d).map(|c| z[a * d + c] * z[b * d + c]).sum();
                }
            }
            g
        };
        let hsic = |k: &[f64], l: &[f64]| -> f64 {
            let nf = n as f64;
            if debiased {
                let mut kt = k.to_vec();
                let mut lt = l.to_vec();
                for a in 0..n {
                    kt[a * n + a] = 0.0;
                    lt[a * n + a] = 0.0;
                }
                let tr: f64 = (0..n * n).map(|i| kt[i] * lt[i]).sum();
                let sk: f64 = kt.iter().sum();
                let sl: f64 = lt.iter().sum();
                let k1: Vec<f64> = (0..n)
                    .map(|a| kt[a * n..(a + 1) * n].iter().sum())
                    .collect();
                let l1: Vec<f64> = (0..n)
                    .map(|a| lt[a * n..(a + 1) * n].iter().sum())
                    .collect();
                let kl: f64 = k1.iter().zip(&l1).map(|(p, q)| p * q).sum();
                (tr + sk * sl / ((nf - 1.0) * (nf - 2.0)) - 2.0 * kl / (nf - 2.0))
                    / (nf * (nf - 3.0))
            } else {
                // tr(KHLH)/(n-1)^2
                let h = |m: &[f64]| -> Vec<f64> {
                    let rm: Vec<f64> = (0..n)
                        .map(|a| m[a * n..(a + 1) * n].iter().sum::<f64>() / nf)
                        .collect();
                    let tot: f64 = rm.iter().sum::<f64>() / nf;
                    (0..n * n)
                        .map(|i| m[i] - rm[i / n] - rm[i % n] + tot)
                        .collect()
                };
                let (kc, lc) = (h(k), h(l));
                (0..n * n).map(|i| kc[i] * lc[i]).sum::<f64>() / ((nf - 1.0) * (nf - 1.0))
            }
        };
        let (k, l) = (gram(x, dx), gram(y, dy));
        hsic(&k, &l) / (hsic(&k, &k) * hsic(&l, &l)).sqrt()
    }

    #[test]
    fn cka_matches_gram_reference() {
        let (n, dx, dy) = (23usize, 5usize, 9usize);
        let x = data(n, dx, 3, 0.0);
        let mut y = data(n, dy, 4, 0.0);
        for a in 0..n {
            for c in 0..dx {
                y[a * dy + c] += 2.0 * x[a * dx + c];
            }
        }
        let mut acc = MomentAccumulator::new(&[dx, dy]).unwrap();
        acc.update(&[&x[..], &y[..]], n).unwrap();
        let m = acc.finalize().unwrap();
        for deb in [false, true] {
            let want = naive_cka(&x, &y, n, dx, dy, deb);
            let got = m.cka(0, 1, deb).unwrap();
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "{deb}: {got} vs {want}"
            );
            let mat = m.cka_matrix(&[0, 1], &[0, 1], deb).unwrap();
            assert_eq!(mat[0], 1.0);
            assert_eq!(mat[3], 1.0);
            assert!((mat[1] - got).abs() < 1e-15 && (mat[2] - got).abs() < 1e-15);
        }
        // n < 4: debiased is NaN, biased defined.
        let mut tiny = MomentAccumulator::new(&[dx, dy]).unwrap();
        tiny.update(&[&x[..3 * dx], &y[..3 * dy]], 3).unwrap();
        let t = tiny.finalize().unwrap();
        assert!(t.cka(0, 1, true).unwrap().is_nan());
        assert!(t.cka(0, 1, false).unwrap().is_finite());
        // constant layer: NaN (zero variance), not 0.
        let c = vec![7.0; n * 2];
        let mut acc = MomentAccumulator::new(&[dx, 2]).unwrap();
        acc.update(&[&x[..], &c[..]], n).unwrap();
        let m = acc.finalize().unwrap();
        assert!(m.cka(0, 1, false).unwrap().is_nan());
        assert!(m.cka_matrix(&[0], &[1], true).unwrap()[0].is_nan());
        assert!(m.cka(0, 2, false).is_err());
        assert!(m.cka_matrix(&[0], &[5], false).is_err());
    }

    #[test]
    fn stream_from_stores_equals_in_memory() {
        use crate::monitor::NoMonitor;
        use crate::store::{ArrayData, Rows, Store, StoreRows, StoreWriter, Values, WriterOptions};
        let dir = tempfile::tempdir().unwrap();
        let (n, dims) = (301usize, [4usize, 7]);
        let xs: Vec<Vec<f64>> = dims
            .iter()
            .enumerate()
            .map(|(i, &d)| data(n, d, 10 + i as u64, 300.0))
            .collect();
        let x32: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| x.iter().map(|&v| v as f32).collect())
            .collect();
        let mk = |name: &str| {
            let p = dir.path().join(name);
            let opts = WriterOptions {
                shard_bytes: 4096,
                ..Default::default()
            };
            let mut w = StoreWriter::create(&p, opts).unwrap();
            for start in (0..n).step_by(50) {
                let stop = (start + 50).min(n);
                let layers: Vec<(String, ArrayData)> = (0..2)
                    .map(|l| {
                        let d = dims[l];
                        (
                            format!("l{l}"),
                            ArrayData::new(
                                Values::F32(&x32[l][start * d..stop * d]),
                                stop - start,
                                d,
                            ),
                        )
                    })
                    .collect();
                let refs: Vec<(&str, ArrayData)> =
                    layers.iter().map(|(a, b)| (a.as_str(), *b)).collect();
                w.append(&refs, None, &[]).unwrap();
            }
            w.finish().unwrap();
            Store::open(&p).unwrap()
        };
        let a = mk("a");
        let b = mk("b");
        let sa = StoreRows::new(&a, vec![0, 1]).unwrap();
        let sb = StoreRows::new(&b, vec![1]).unwrap();
        let sels = Rows::new(vec![&sa, &sb]).unwrap();
        let names: Vec<String> = ["a0", "a1", "b1"].iter().map(|s| s.to_string()).collect();
        let pass = |block_rows, budget: &Budget| {
            accumulate(
                &sels,
                &names,
                block_rows,
                true,
                budget,
                Compute::F64,
                &NoMonitor,
            )
        };
        let m = pass(Some(37), &Budget::unchecked())
            .unwrap()
            .finalize()
            .unwrap();
        let mut mem = MomentAccumulator::new(&[4, 7, 7]).unwrap();
        mem.update(&[&x32[0][..], &x32[1][..], &x32[1][..]], n)
            .unwrap();
        let r = mem.finalize().unwrap();
        assert_eq!(m.n, n as u64);
        assert!(rel(&m.cov, &r.cov) < 1e-12, "{}", rel(&m.cov, &r.cov));
        assert!((m.cka(1, 2, false).unwrap() - 1.0).abs() < 1e-12);
        assert!(pass(Some(0), &Budget::unchecked()).is_err());
        assert!(matches!(
            pass(None, &Budget::argument(1000).unwrap()),
            Err(Error::Memory(_))
        ));
        // names must match the selected layers
        assert!(accumulate(
            &sels,
            &names[..1],
            None,
            true,
            &Budget::unchecked(),
            Compute::F64,
            &NoMonitor
        )
        .is_err());
    }

    #[test]
    fn set_shift_changes_nothing_but_rounding_and_is_checked() {
        let (n, dims) = (700, [5usize, 3]);
        let xs: Vec<Vec<f64>> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| data(n, d, 21 + l as u64, 400.0))
            .collect();
        let blk: Vec<&[f64]> = xs.iter().map(|x| x.as_slice()).collect();
        let mut a = MomentAccumulator::new(&dims).unwrap();
        a.update(&blk, n).unwrap();
        // Wrong length, non-finite, after rows: typed errors.
        assert!(matches!(
            a.set_shift(&[0.0; 8]),
            Err(Error::InvalidArgument(_))
        ));
        let mut b = MomentAccumulator::new(&dims).unwrap();
        assert!(matches!(b.set_shift(&[0.0; 7]), Err(Error::Mismatch(_))));
        assert!(b.set_shift(&[f64::NAN; 8]).is_err());
        // 3 + 0.5·i away from each column's mean (10–22 spreads of 0.29).
        let far: Vec<f64> = xs
            .iter()
            .zip(&dims)
            .flat_map(|(x, &d)| {
                (0..d).map(move |c| x.iter().skip(c).step_by(d).sum::<f64>() / n as f64)
            })
            .enumerate()
            .map(|(i, m)| m + 3.0 + 0.5 * i as f64)
            .collect();
        b.set_shift(&far).unwrap();
        assert!(b.set_shift(&far).is_err()); // only once
        b.update(&blk, n).unwrap();
        let (ma, mb) = (a.finalize().unwrap(), b.finalize().unwrap());
        assert!(rel(&ma.cov, &mb.cov) < 1e-12, "{}", rel(&ma.cov, &mb.cov));
        // The first block's own mean: offset 0; the far shift: many standard deviations.
        assert!(ma.shift_offset < 1e-6, "{}", ma.shift_offset);
        assert!(mb.shift_offset > 10.0, "{}", mb.shift_offset);
    }

    #[test]
    fn f32_products_match_f64() {
        // Offsets of 1000× the spread, widths that differ, a block longer than the f32
        // sub-block (sums split), a second update, and scales 1e-4 / 1e4.
        for &(scale, offset) in &[(1.0, 1000.0), (1e-4, 50.0), (1e4, 300.0)] {
            let (n, dims) = (2 * F32_BLOCK_ROWS + 300, [24usize, 9, 17]);
            let xs: Vec<Vec<f32>> = dims
                .iter()
                .enumerate()
                .map(|(l, &d)| {
                    data(n, d, 11 + l as u64, offset)
                        .iter()
                        .map(|v| (v * scale) as f32)
                        .collect()
                })
                .collect();
            let run = |compute: Compute| {
                let mut acc = MomentAccumulator::new(&dims).unwrap().with_compute(compute);
                let cut = n - 500;
                for (a, b) in [(0, cut), (cut, n)] {
                    let blk: Vec<&[f32]> = xs
                        .iter()
                        .zip(&dims)
                        .map(|(x, &d)| &x[a * d..b * d])
                        .collect();
                    acc.update(&blk, b - a).unwrap();
                }
                acc.finalize().unwrap()
            };
            let (m64, m32) = (run(Compute::F64), run(Compute::F32));
            assert!(
                rel(&m32.cov, &m64.cov) < 1e-6,
                "cov {}",
                rel(&m32.cov, &m64.cov)
            );
            for i in 0..3 {
                for j in 0..3 {
                    for deb in [false, true] {
                        let (a, b) = (m32.cka(i, j, deb).unwrap(), m64.cka(i, j, deb).unwrap());
                        assert!((a - b).abs() < 1e-6, "cka({i},{j},{deb}) {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn f32_accumulators_merge_and_serialise() {
        let dims = [6usize, 5];
        let n = 400;
        let xs: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| {
                data(n, d, 3 + l as u64, 200.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect()
            })
            .collect();
        let blk = |a: usize, b: usize| -> Vec<&[f32]> {
            xs.iter()
                .zip(&dims)
                .map(|(x, &d)| &x[a * d..b * d])
                .collect()
        };
        let mut whole = MomentAccumulator::new(&dims).unwrap();
        whole.update(&blk(0, n), n).unwrap();
        let mut p = MomentAccumulator::new(&dims)
            .unwrap()
            .with_compute(Compute::F32);
        p.update(&blk(0, 150), 150).unwrap();
        let mut q = MomentAccumulator::new(&dims)
            .unwrap()
            .with_compute(Compute::F32);
        q.update(&blk(150, n), n - 150).unwrap();
        let q = MomentAccumulator::from_bytes(&q.to_bytes().unwrap()).unwrap();
        p.merge(&q).unwrap();
        let (a, b) = (p.finalize().unwrap(), whole.finalize().unwrap());
        assert!(rel(&a.cov, &b.cov) < 1e-6, "{}", rel(&a.cov, &b.cov));
        assert!(Compute::parse("float32").is_ok() && Compute::parse("half").is_err());
    }
}
