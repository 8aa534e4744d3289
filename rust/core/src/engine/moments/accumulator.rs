//! [`MomentAccumulator`]: the streaming value of engine 1 (`update` a block, `merge` another,
//! `finalize` into [`Moments`]); its state and arithmetic rules are in `state.rs`.
use super::finalised::Moments;
use super::state::{
    block_exps, column_sums, f32_products_ok, ldexp, pass_options, pow2, sized, Compute, PassState,
};
use crate::error::{Error, Result};
use crate::linalg::packed::{syrk_upper_add, Strided};
use crate::linalg::symmetrize_from_upper;
use crate::store::Element;
use rayon::prelude::*;

/// The streaming accumulator (a plain value: `update`, `merge`, `to_bytes`/`from_bytes`).
#[derive(Clone, Debug)]
pub struct MomentAccumulator {
    /// The layers, shift, rows, finite-value policy and buffers.
    pub(super) st: PassState,
    /// Per layer: the scale exponent `e` ([`SCALE_BAND`](super::SCALE_BAND)); the accumulated values are
    /// `(x − μ0) · 2^-e`. Set with the shift by the first non-empty block (or [`Self::set_scale`]).
    pub(super) exps: Option<Vec<i32>>,
    /// Column-major (D+L)×(D+L); upper triangle valid.
    pub(super) s: Vec<f64>,
    /// Column sums of w (length D+L).
    pub(super) sums: Vec<f64>,
}

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

    /// Set the per-layer scale exponents before the first row (see [`SCALE_BAND`](super::SCALE_BAND); each in
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
    /// `D × D` SYRK in f32 (sums over at most [`F32_SUM_ROWS`](super::F32_SUM_ROWS) rows, each added into the f64
    /// upper triangle); the squared-norm columns, their products with `u` and the
    /// column sums in f64 from the same f32-rounded `u`. `Ok(false)`, with nothing
    /// changed, when a shifted value exceeds [`F32_SAFE`](super::F32_SAFE): the caller does the block in f64.
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
    /// (its first block's spread, see [`SCALE_BAND`](super::SCALE_BAND)): an [`Error::NonFinite`] naming the
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
