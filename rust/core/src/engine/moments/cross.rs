//! [`CrossAccumulator`]: the off-diagonal tile of a tiled pass. For two disjoint groups of
//! layers (or column pieces of layers) `A` and `B` read side by side, it accumulates only
//! what the pairs `(p ∈ A, q ∈ B)` need — the cross block `Σ_a u_{A,a} u_{B,a}ᵀ` (one GEMM
//! per block, [`crate::linalg::packed::gemm_tn_add`]), the products of each side's shifted
//! values with the other side's squared norms, the squared norms' products and the column
//! sums — so that a tiled pass does the multiply-adds of the single pass once, and no more:
//! the diagonal blocks of `A` and `B` belong to their own tiles
//! ([`super::MomentAccumulator`]).
//!
//! With `u = z − μ0` (the shifted row, `μ0` the tile's reference shift) and
//! `r_p = ‖u_p‖²`, [`CrossAccumulator::finalize`] centres exactly at the mean
//! `ū = Σ u / n` (`e_p = ‖ū_p‖²`):
//!
//! ```text
//! C_pq   = Σ_a u_p u_qᵀ − n ū_p ū_qᵀ
//! Σ_a r̄_p r̄_q = Σ r_p r_q − 2 ū_qᵀ Σ r_p u_q − 2 ū_pᵀ Σ u_p r_q + 4 ū_pᵀ (Σ u_p u_qᵀ) ū_q
//!              + e_q Σ r_p + e_p Σ r_q − 3 n e_p e_q
//! ```
//!
//! (`r̄_{p,a} = ‖u_{p,a} − ū_p‖² = r_{p,a} − 2 ū_pᵀ u_{p,a} + e_p`, expanded), and returns
//! `‖C_pq‖_F²` and `Σ_a r̄_p r̄_q` for every pair: what linear CKA needs of them.
use super::state::{column_sums, f32_products_ok, pass_options, sized, Compute, PassState};
use crate::error::{Error, Result};
use crate::linalg::packed::{gemm_tn_add, PackedElem, Strided};
use crate::store::Element;
use rayon::prelude::*;

/// The streaming value of an off-diagonal tile (see the module docs).
pub struct CrossAccumulator {
    /// The layers of both sides, shift, rows, finite-value policy and buffers.
    pub(super) st: PassState,
    /// Layers `0..na` are side A, `na..` side B.
    pub(super) na: usize,
    /// `Σ u_A u_Bᵀ`: column-major `D_A × D_B`.
    pub(super) uu: Vec<f64>,
    /// `Σ u_A r_B`: column-major `D_A × L_B`.
    pub(super) ur: Vec<f64>,
    /// `Σ r_A u_B`: row-major `L_A × D_B`.
    pub(super) ru: Vec<f64>,
    /// `Σ r_A r_B`: row-major `L_A × L_B`.
    pub(super) rr: Vec<f64>,
    /// Column sums of `u` (length D) and of `r` (length L).
    pub(super) su: Vec<f64>,
    pub(super) sr: Vec<f64>,
    /// Per piece `2^-e` ([`CrossAccumulator::set_scale`]; empty: 1).
    pub(super) fac: Vec<f64>,
}

/// What a finished [`CrossAccumulator`] gives: for `p < L_A`, `q < L_B` (row-major
/// `L_A × L_B`), `sq = ‖C_pq‖_F²` and `rr = Σ_a r̄_p r̄_q`; `n` rows.
pub struct CrossStats {
    pub n: u64,
    pub sq: Vec<f64>,
    pub rr: Vec<f64>,
    pub nonfinite: Vec<Option<u64>>,
}

/// Bytes of a cross tile's sums for sides of widths `a` and `b`.
pub fn cross_accumulator_bytes(a: &[usize], b: &[usize]) -> u128 {
    let (da, la) = (a.iter().sum::<usize>() as u128, a.len() as u128);
    let (db, lb) = (b.iter().sum::<usize>() as u128, b.len() as u128);
    (da * db + da * lb + la * db + la * lb + da + db + la + lb) * 8
}

impl CrossAccumulator {
    /// Side A has widths `a`, side B widths `b` (both non-empty, no zero width).
    pub fn new(a: &[usize], b: &[usize]) -> Result<Self> {
        if a.is_empty() || b.is_empty() {
            return Err(Error::invalid("a cross tile needs layers on both sides"));
        }
        let st = PassState::new(a.iter().chain(b).copied().collect())?;
        let (da, db) = (a.iter().sum::<usize>(), b.iter().sum::<usize>());
        let (la, lb) = (a.len(), b.len());
        let cells = da
            .checked_mul(db)
            .ok_or_else(|| Error::Memory("cross tile size overflows".into()))?;
        let what = format_args!("the cross block of a tiled pass ({da} × {db} columns)");
        Ok(CrossAccumulator {
            st,
            na: la,
            uu: crate::linalg::hinted_vec(cells, what)?,
            ur: crate::memory::try_vec(da * lb, 0.0, "the cross tile's norm products")?,
            ru: crate::memory::try_vec(la * db, 0.0, "the cross tile's norm products")?,
            rr: vec![0.0; la * lb],
            su: vec![0.0; da + db],
            sr: vec![0.0; la + lb],
            fac: Vec::new(),
        })
    }

    pass_options!();

    /// Set the per-piece scale exponents before the first row: the shifted values are
    /// multiplied by `2^-e` (see [`super::state::SCALE_BAND`]); every sum is then in
    /// those units, as the diagonal tiles' of the same pass.
    pub fn set_scale(&mut self, exps: &[i32]) -> Result<()> {
        if self.st.n > 0 || exps.len() != self.st.dims.len() || exps.iter().any(|e| e.abs() > 1000)
        {
            return Err(Error::invalid(format!(
                "the scale of a cross tile needs one exponent in ±1000 per piece ({}), set \
                 before the first row; got {exps:?}",
                self.st.dims.len()
            )));
        }
        self.fac = exps.iter().map(|&e| super::state::ldexp(1.0, -e)).collect();
        Ok(())
    }

    /// Set the reference shift (length `D_A + D_B`, finite) before the first row.
    pub fn set_shift(&mut self, shift: &[f64]) -> Result<()> {
        self.st.set_shift(shift)
    }

    /// Add `rows` rows: `block[l]` is the row-major `rows × d_l` data of layer `l` (side A's
    /// layers, then side B's). Errors leave the accumulator unchanged.
    pub fn update<T: Element>(&mut self, block: &[&[T]], rows: usize) -> Result<()> {
        if !self.st.screen(block, rows)? {
            return Ok(());
        }
        // f32 products only when every shifted (scaled) value is at most F32_SAFE: a block
        // with a larger one (a lone outlier near f32's limit) is done in f64
        let compute = match self.st.compute {
            Compute::F32 if !self.f32_safe(block) => Compute::F64,
            c => c,
        };
        match compute {
            Compute::F64 => {
                let mut u = std::mem::take(&mut self.st.scratch.w);
                let mut pack = std::mem::take(&mut self.st.scratch.pack64);
                let res = self.products(block, rows, &mut u, &mut pack, |x| x);
                self.st.scratch.w = u;
                self.st.scratch.pack64 = pack;
                res
            }
            Compute::F32 => {
                let mut u = std::mem::take(&mut self.st.scratch.u);
                let mut pack = std::mem::take(&mut self.st.scratch.pack32);
                let res = self.products(block, rows, &mut u, &mut pack, |x| x as f32);
                self.st.scratch.u = u;
                self.st.scratch.pack32 = pack;
                res
            }
        }
    }

    /// Whether the f32 products of the block's `(x − μ0) · 2^-e` are as accurate as usual,
    /// per piece ([`f32_products_ok`]).
    fn f32_safe<T: Element>(&self, block: &[&[T]]) -> bool {
        let mu = self.st.shift.as_deref().unwrap_or(&[]);
        block.iter().enumerate().all(|(l, x)| {
            let (dl, o) = (self.st.dims[l], self.st.offsets[l]);
            let f = self.fac.get(l).copied().unwrap_or(1.0);
            f32_products_ok(|i| (x[i].to_f64() - mu[o + i % dl]) * f, x.len() / dl, dl)
        })
    }

    /// One block's products with the shifted values `u` in `C` (f32 or f64): the cross block
    /// by the packed GEMM (sums of at most `C::CHAIN` rows in `C`, added into f64); the
    /// squared norms (from the rounded `u`), their products and the sums in f64.
    fn products<T: Element, C: PackedElem + Into<f64>>(
        &mut self,
        block: &[&[T]],
        rows: usize,
        ubuf: &mut Vec<C>,
        pack: &mut Vec<C>,
        round: fn(f64) -> C,
    ) -> Result<()> {
        let lc = self.st.dims.len();
        let d = self.st.offsets[lc];
        let (na, da) = (self.na, self.st.offsets[self.na]);
        let (lb, db) = (lc - na, d - da);
        let u = sized(ubuf, rows * d)?;
        let mut rbuf = std::mem::take(&mut self.st.scratch.r);
        let r = sized(&mut rbuf, rows * lc)?;
        let (st, fac) = (&self.st, &self.fac);
        u.par_chunks_mut(d)
            .zip(r.par_chunks_mut(lc))
            .enumerate()
            .for_each(|(a, (ur, rr))| st.shift_row(block, a, fac, ur, rr, round));
        let (u, r) = (&*u, &*r);
        let side = |c0: usize, w: usize| Strided {
            u: &u[c0..],
            k: rows,
            n: w,
            rs: d,
            cs: 1,
        };
        gemm_tn_add(&mut self.uu, da, side(0, da), side(da, db), pack)?;
        // Σ u_i r_l over the rows, for columns `cols` of u and norm columns `ls` of r:
        // out[l·w + i] (parallel over column chunks, each summed in row order).
        let with_norms = |cols: std::ops::Range<usize>, ls: std::ops::Range<usize>| {
            const CH: usize = 256;
            let (c0, w, nl) = (cols.start, cols.len(), ls.len());
            let parts: Vec<Vec<f64>> = (0..w.div_ceil(CH))
                .into_par_iter()
                .map(|c| {
                    let (i0, i1) = (c0 + c * CH, (c0 + (c + 1) * CH).min(cols.end));
                    let mut acc = vec![0.0f64; nl * (i1 - i0)];
                    for (urow, rrow) in u.chunks_exact(d).zip(r.chunks_exact(lc)) {
                        for (l, &rl) in rrow[ls.clone()].iter().enumerate() {
                            let dst = &mut acc[l * (i1 - i0)..(l + 1) * (i1 - i0)];
                            for (s, &q) in dst.iter_mut().zip(&urow[i0..i1]) {
                                *s += Into::<f64>::into(q) * rl;
                            }
                        }
                    }
                    acc
                })
                .collect();
            let mut out = vec![0.0f64; nl * w];
            for (c, part) in parts.iter().enumerate() {
                let cw = part.len() / nl.max(1);
                for l in 0..nl {
                    let dst = &mut out[l * w + c * CH..l * w + c * CH + cw];
                    for (x, y) in dst.iter_mut().zip(&part[l * cw..(l + 1) * cw]) {
                        *x += y;
                    }
                }
            }
            out
        };
        // ur (column-major D_A × L_B) = out[l·D_A + i]; ru (row-major L_A × D_B) likewise.
        for (x, y) in self.ur.iter_mut().zip(with_norms(0..da, na..lc)) {
            *x += y;
        }
        for (x, y) in self.ru.iter_mut().zip(with_norms(da..d, 0..na)) {
            *x += y;
        }
        for rrow in r.chunks_exact(lc) {
            for k in 0..na {
                for l in 0..lb {
                    self.rr[k * lb + l] += rrow[k] * rrow[na + l];
                }
            }
        }
        let su = column_sums(u, d);
        for (s, c) in self.su.iter_mut().zip(&su) {
            *s += c;
        }
        for (s, c) in self.sr.iter_mut().zip(&column_sums(r, lc)) {
            *s += c;
        }
        self.st.scratch.r = rbuf;
        self.st.n += rows as u64;
        Ok(())
    }

    /// Add the rows of `other` (the same layer widths and sides), accumulated **under the same
    /// reference shift** (every task of a distributed tile is given the tile's shift): the
    /// sums then simply add. A different shift is a [`Error::Mismatch`] (the cross sums
    /// cannot be re-shifted without the diagonal blocks, which belong to other tiles).
    /// `other`'s rows follow this one's (its first non-finite rows are offset by `n`).
    pub fn merge(&mut self, other: &CrossAccumulator) -> Result<()> {
        if other.st.dims != self.st.dims || other.na != self.na {
            return Err(Error::Mismatch(format!(
                "cannot merge cross tiles of widths {:?} ({} on side A) and {:?} ({} on side A)",
                self.st.dims, self.na, other.st.dims, other.na
            )));
        }
        if other.st.n == 0 {
            return Ok(());
        }
        if self.st.n == 0 && self.st.shift.is_none() {
            self.st.shift = other.st.shift.clone();
        }
        if self.st.shift != other.st.shift {
            return Err(Error::Mismatch(
                "cannot merge cross tiles accumulated under different reference shifts".into(),
            ));
        }
        let base = self.st.n;
        for (mine, theirs) in self.st.nonfinite.iter_mut().zip(&other.st.nonfinite) {
            if mine.is_none() {
                *mine = theirs.map(|r| r + base);
            }
        }
        let add = |a: &mut Vec<f64>, b: &[f64]| {
            a.par_iter_mut().zip(b).for_each(|(x, y)| *x += y);
        };
        add(&mut self.uu, &other.uu);
        add(&mut self.ur, &other.ur);
        add(&mut self.ru, &other.ru);
        add(&mut self.rr, &other.rr);
        add(&mut self.su, &other.su);
        add(&mut self.sr, &other.sr);
        self.st.n += other.st.n;
        Ok(())
    }

    /// Centre at the exact mean (see the module docs) and return each pair's statistics.
    pub fn finalize(self) -> Result<CrossStats> {
        if self.st.n == 0 {
            return Err(Error::invalid("no rows were accumulated"));
        }
        let lc = self.st.dims.len();
        let (na, da) = (self.na, self.st.offsets[self.na]);
        let lb = lc - na;
        let n = self.st.n as f64;
        let ubar: Vec<f64> = self.su.iter().map(|s| s / n).collect();
        let e = self.st.layer_sq_norms(&ubar);
        let ca = |k: usize| self.st.offsets[k]..self.st.offsets[k + 1];
        let cb = |l: usize| self.st.offsets[na + l] - da..self.st.offsets[na + l + 1] - da;
        let pairs: Vec<(f64, f64)> = (0..na * lb)
            .into_par_iter()
            .map(|kl| {
                let (k, l) = (kl / lb, kl % lb);
                let mut sq = 0.0;
                let mut quad = 0.0; // ū_pᵀ (Σ u_p u_qᵀ) ū_q
                for j in cb(l) {
                    let col = &self.uu[j * da..(j + 1) * da];
                    let vj = ubar[da + j];
                    let mut t = 0.0;
                    for i in ca(k) {
                        let c = col[i] - n * ubar[i] * vj;
                        sq += c * c;
                        t += ubar[i] * col[i];
                    }
                    quad += t * vj;
                }
                let db = self.st.offsets[lc] - da;
                let ru: f64 = cb(l).map(|j| ubar[da + j] * self.ru[k * db + j]).sum();
                let ur: f64 = ca(k).map(|i| ubar[i] * self.ur[l * da + i]).sum();
                let (ep, eq) = (e[k], e[na + l]);
                let rr = self.rr[k * lb + l] - 2.0 * ru - 2.0 * ur
                    + 4.0 * quad
                    + eq * self.sr[k]
                    + ep * self.sr[na + l]
                    - 3.0 * n * ep * eq;
                (sq, rr)
            })
            .collect();
        // finiteness enforced (no NaN/Inf came in): a non-finite pair overflowed the f64 (or
        // f32) products — an error naming it, never a NaN passed on as a CKA value
        if self.st.check_finite {
            if let Some(kl) = pairs
                .iter()
                .position(|p| !(p.0.is_finite() && p.1.is_finite()))
            {
                let (k, l) = (kl / lb, kl % lb);
                return Err(Error::NonFinite(format!(
                    "layers {:?} and {:?}: their cross products overflowed (values too large \
                     for the products of a tiled pass, e.g. beyond about 1e19 in float32 or \
                     1e150 in float64); no result is given rather than a wrong one",
                    self.st.names[k],
                    self.st.names[na + l]
                )));
            }
        }
        Ok(CrossStats {
            n: self.st.n,
            sq: pairs.iter().map(|p| p.0).collect(),
            rr: pairs.iter().map(|p| p.1).collect(),
            nonfinite: self.st.nonfinite,
        })
    }
}
