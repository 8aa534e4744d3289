//! Calibrated CKA on a sample: a permutation null and bootstrap resamples, from centred
//! Gram matrices held once per layer.
//!
//! For `m` sampled rows and one layer, let `K` be its kernel matrix (linear: `X̄X̄ᵀ` of the
//! column-centred rows; RBF: `exp(−D/(2 bw²))` with `D` the squared distances and `bw` the
//! median rule of [`super::rbf`]). Its *centred* Gram `C` is
//!
//! * biased (Gretton et al. 2005): `C = HKH`, `H = I − 11ᵀ/m`;
//! * debiased (Song et al. 2012): the U-centred `K̃ = K − diag K` (Székely & Rizzo 2014,
//!   "Partial distance correlation with methods for dissimilarities", Ann. Stat. 42(6)):
//!   `C_ij = K̃_ij − r_i/(m−2) − r_j/(m−2) + t/((m−1)(m−2))` off the diagonal, `C_ii = 0`,
//!   with `r` the row sums of `K̃` and `t` their total. Then `⟨C_K, C_L⟩_F / (m(m−3))` is
//!   exactly Song et al.'s `HSIC₁(K, L)` (eq. 5; checked in the tests).
//!
//! In both cases `CKA(K, L) = ⟨C_K, C_L⟩_F / (‖C_K‖_F ‖C_L‖_F)` (the HSIC's normalisation
//! cancels), under the NaN rule of [`cka_ratio`].
//!
//! * **Permutation null.** Pairing row `i` of one layer with row `π(i)` of the other turns
//!   `L` into `PLPᵀ`, and centring commutes with that (`H` and the U-centring are invariant
//!   under a simultaneous permutation of rows and columns), so the permuted statistic is
//!   `⟨C_K, C_L[π, π]⟩` — a re-indexing of a centred Gram held in memory, no new products.
//!   One permutation serves every pair (each pair's null is valid on its own); within one
//!   source the cell `(i, j)`, `i ≤ j`, permutes layer `j` and is mirrored.
//! * **Bootstrap.** A resample `s` (m indices drawn with replacement) re-runs the estimator
//!   on the rows `s`: `K[s, s]` (RBF: the bandwidth re-derived from `D[s, s]` by the same
//!   rule), centred again, the CKA ratio as above, except that **the copies of one row are
//!   not a pair**: every `(i, j)`, `i ≠ j`, with `s_i = s_j` is left out of the inner
//!   products (`C_ij = 0` after centring; debiased, also `K̃_ij = 0` before the U-centring,
//!   as its diagonal). A resample repeats about a third of its rows, and each copy pair
//!   acts like a diagonal term: both estimators' small-sample terms grow with them, so plain
//!   resamples sit above the sample's value when layers are nearly unrelated (HSIC is then a
//!   degenerate U-statistic, where the plain bootstrap is not consistent: Arcones & Giné
//!   1992, Ann. Stat. 20(2)). Without the copy pairs the resamples centre on the sample's
//!   value, unrelated or related (tested).
//!
//! The `m²`-long inner products of all pairs are one matrix product of the stacked Grams
//! (faer, split over blocks of the `m²` index and summed in a fixed order: the same value on
//! every run). Permutations and resamples come from the caller (Python draws them from the
//! seed), each checked.
use crate::engine::neighbors::{sq_distance_matrix, Products, RowMajor};
use crate::error::{Error, Result};
use crate::measures::cka::rbf::median_sym_zero_diag;
use crate::measures::hsic::{cka_ratio, dot, Estimator};
use crate::memory::{try_vec, Budget};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// The kernel of a calibrated CKA.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalKernel {
    /// `K = X̄X̄ᵀ` (column-centred rows).
    Linear,
    /// `K = exp(−D/(2 bw²))`, `bw = sigma · sqrt(median of D)` (diagonal included).
    Rbf { sigma: f64 },
}

/// One layer of the sample, held for calibration: linear, its Gram `X̄X̄ᵀ`; RBF, its squared
/// distance matrix and the sample's bandwidth.
#[derive(Debug)]
pub struct CalLayer {
    base: Vec<f64>,
    m: usize,
    kernel: CalKernel,
    bandwidth: f64,
}

impl CalLayer {
    /// Prepare a layer from its `m × d` row-major sampled rows (`prod` forms the products).
    pub fn prepare_with(
        x: &[f64],
        m: usize,
        d: usize,
        kernel: CalKernel,
        budget: &Budget,
        prod: &dyn Products,
    ) -> Result<CalLayer> {
        if Some(x.len()) != m.checked_mul(d) {
            return Err(Error::Mismatch(format!(
                "{} values are not {m} rows of {d}",
                x.len()
            )));
        }
        if u32::try_from(m).is_err() {
            return Err(Error::invalid(format!(
                "a calibration sample of {m} rows (at most 2^32 − 1)"
            )));
        }
        budget.check(
            (m as u128 * m as u128 + m as u128 * d as u128) * 8 + median_bytes(m, kernel),
            format_args!("the {m} × {m} Gram of one layer"),
            "use a smaller sample (sample=...)",
        )?;
        match kernel {
            CalKernel::Linear => {
                let mut mean = vec![0.0f64; d];
                for row in x.chunks_exact(d.max(1)) {
                    for (s, v) in mean.iter_mut().zip(row) {
                        *s += v;
                    }
                }
                mean.iter_mut().for_each(|s| *s /= m.max(1) as f64);
                let mut xc = try_vec(m * d, 0.0, format_args!("the centred {m} × {d} sample"))?;
                xc.par_chunks_mut(d.max(1))
                    .zip(x.par_chunks(d.max(1)))
                    .for_each(|(o, r)| {
                        for ((o, v), mu) in o.iter_mut().zip(r).zip(&mean) {
                            *o = v - mu;
                        }
                    });
                let base = prod.gram_f64(RowMajor { x: &xc, m, d })?;
                if base.len() != m * m {
                    return Err(Error::Mismatch(format!(
                        "a Gram of {} values for {m} rows",
                        base.len()
                    )));
                }
                Ok(CalLayer {
                    base,
                    m,
                    kernel,
                    bandwidth: f64::NAN,
                })
            }
            CalKernel::Rbf { sigma } => {
                if !(sigma.is_finite() && sigma > 0.0) {
                    return Err(Error::invalid(format!("sigma must be > 0, got {sigma}")));
                }
                let base = sq_distance_matrix(RowMajor { x, m, d }, &Budget::unchecked(), prod)?;
                let bandwidth = sigma * median_sym_zero_diag(&base, m)?.sqrt();
                if !(bandwidth > 0.0 && bandwidth.is_finite()) {
                    return Err(Error::invalid(
                        "the median pairwise distance is 0 (more than half of the sampled rows \
                         coincide): the RBF bandwidth is undefined",
                    ));
                }
                Ok(CalLayer {
                    base,
                    m,
                    kernel,
                    bandwidth,
                })
            }
        }
    }

    /// Rows of the sample.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// The RBF bandwidth on the whole sample (NaN for the linear kernel).
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// Write the centred Gram of rows `idx` (None: all, in order) into `out` (`m²`) and
    /// return `(‖C‖², bandwidth)`; a resample whose RBF bandwidth is undefined (the median
    /// distance is 0) fills `out` with NaN and returns NaN.
    fn centred_into(
        &self,
        out: &mut [f64],
        idx: Option<&[u32]>,
        est: Estimator,
    ) -> Result<(f64, f64)> {
        let m = self.m;
        match idx {
            None => out.copy_from_slice(&self.base),
            Some(s) => out
                .par_chunks_mut(m)
                .zip(s.par_iter())
                .for_each(|(row, &i)| {
                    let src = &self.base[i as usize * m..(i as usize + 1) * m];
                    for (o, &j) in row.iter_mut().zip(s) {
                        *o = src[j as usize];
                    }
                }),
        }
        let mut bw = self.bandwidth;
        if let CalKernel::Rbf { sigma } = self.kernel {
            if idx.is_some() {
                bw = sigma * median_sym_zero_diag(out, m)?.sqrt();
            }
            if !(bw > 0.0 && bw.is_finite()) {
                out.par_iter_mut().for_each(|v| *v = f64::NAN);
                return Ok((f64::NAN, f64::NAN));
            }
            let s = 1.0 / (2.0 * bw * bw);
            out.par_iter_mut().for_each(|v| *v = (-*v * s).exp());
        }
        // a resample: the copies of one row are not a pair (module docs); the diagonal is
        // zeroed for the debiased estimator only
        let ties = |out: &mut [f64], diagonal: bool| {
            if let Some(s) = idx {
                out.par_chunks_mut(m)
                    .zip(s.par_iter())
                    .enumerate()
                    .for_each(|(r, (row, &i))| {
                        for (c, (o, &j)) in row.iter_mut().zip(s).enumerate() {
                            if i == j && (diagonal || r != c) {
                                *o = 0.0;
                            }
                        }
                    });
            }
        };
        let unbiased = est == Estimator::Unbiased;
        if unbiased {
            ties(out, true);
        }
        centre(out, m, est);
        ties(out, unbiased);
        let norms: Vec<f64> = out.par_chunks(m).map(|r| dot(r, r)).collect();
        Ok((norms.iter().sum(), bw))
    }
}

/// Centre the symmetric `m × m` kernel matrix `k` in place for `est` (module docs).
fn centre(k: &mut [f64], m: usize, est: Estimator) {
    let mf = m as f64;
    match est {
        Estimator::Biased => {
            let rm: Vec<f64> = k
                .par_chunks(m)
                .map(|r| r.iter().sum::<f64>() / mf)
                .collect();
            let gm = rm.iter().sum::<f64>() / mf;
            k.par_chunks_mut(m).enumerate().for_each(|(i, r)| {
                for (v, cm) in r.iter_mut().zip(&rm) {
                    *v = *v - rm[i] - cm + gm;
                }
            });
        }
        Estimator::Unbiased => {
            let rs: Vec<f64> = k
                .par_chunks(m)
                .enumerate()
                .map(|(i, r)| r.iter().sum::<f64>() - r[i])
                .collect();
            let t = rs.iter().sum::<f64>();
            let (a, c) = (1.0 / (mf - 2.0), t / ((mf - 1.0) * (mf - 2.0)));
            k.par_chunks_mut(m).enumerate().for_each(|(i, r)| {
                for (j, (v, rj)) in r.iter_mut().zip(&rs).enumerate() {
                    *v = if i == j {
                        0.0
                    } else {
                        *v - (rs[i] + rj) * a + c
                    };
                }
            });
        }
    }
}

/// The median's workspace of one RBF resample (half a Gram), none for the linear kernel.
fn median_bytes(m: usize, kernel: CalKernel) -> u128 {
    match kernel {
        CalKernel::Linear => 0,
        CalKernel::Rbf { .. } => m as u128 * m.saturating_sub(1) as u128 / 2 * 8,
    }
}

/// Elements of the `m²` index per block of [`cross`] (at most 256 blocks).
fn block_len(k: usize) -> usize {
    (1usize << 15).max(k.div_ceil(256))
}

/// `G[i, j] = ⟨a_i, b_j⟩` for the `na` rows of `a` and `nb` rows of `b`, each `k` long
/// (row-major stacks): faer products over blocks of the `k` index, in parallel, summed in
/// block order.
fn cross(a: &[f64], na: usize, b: &[f64], nb: usize, k: usize) -> Vec<f64> {
    if na == 0 || nb == 0 {
        return vec![0.0; na * nb];
    }
    let ma = MatRef::from_row_major_slice(&a[..na * k], na, k);
    let mb = MatRef::from_row_major_slice(&b[..nb * k], nb, k);
    let bl = block_len(k);
    let parts: Vec<Vec<f64>> = (0..k.div_ceil(bl))
        .into_par_iter()
        .map(|t| {
            let (k0, k1) = (t * bl, ((t + 1) * bl).min(k));
            let mut g = vec![0.0; na * nb];
            matmul(
                MatMut::from_row_major_slice_mut(&mut g, na, nb),
                Accum::Replace,
                ma.subcols(k0, k1 - k0),
                mb.subcols(k0, k1 - k0).transpose(),
                1.0,
                Par::Seq,
            );
            g
        })
        .collect();
    let mut out = vec![0.0; na * nb];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Peak bytes of a [`Calibrator`] over `layers` layers (all of both sources) of `m` rows,
/// holding `chunk` permuted Grams at a time — the centred stack, the permuted chunk, the
/// partial sums and (RBF) one median workspace per worker thread. The layers' own
/// [`CalLayer`]s (`m²·8` each) are the caller's.
pub fn calibrator_bytes(layers: usize, m: usize, chunk: usize, kernel: CalKernel) -> u128 {
    let (l, m2) = (layers as u128, m as u128 * m as u128);
    let threads = rayon::current_num_threads() as u128;
    (l + chunk as u128) * m2 * 8 + 256 * l * l * 8 + threads * median_bytes(m, kernel)
}

/// Peak bytes of a whole calibration over `layers` layers of `m` rows, the widest `dmax`
/// wide: every [`CalLayer`] (`m²·8` each), the [`Calibrator`] with one permuted Gram at a
/// time, and one layer's preparation (its sampled rows, their centred copy, and for RBF the
/// median's workspace). What a caller checks before loading anything.
pub fn calibration_bytes(layers: usize, m: usize, dmax: usize, kernel: CalKernel) -> u128 {
    let (l, m2) = (layers as u128, m as u128 * m as u128);
    l * m2 * 8 + calibrator_bytes(layers, m, 1, kernel) + 2 * m as u128 * dmax as u128 * 8
}

/// The centred Grams of the whole sample for every layer, and the statistics from them.
#[derive(Debug)]
pub struct Calibrator {
    /// a's layers, then b's.
    layers: Vec<CalLayer>,
    la: usize,
    within: bool,
    est: Estimator,
    m: usize,
    /// Centred Grams, a's then b's (row-major `m²` each).
    stack: Vec<f64>,
    norms: Vec<f64>,
    /// The stack holds a resample (a bootstrap ran since it was centred on the sample).
    resampled: bool,
    chunk: usize,
}

impl Calibrator {
    /// Centre every layer's Gram on the whole sample: `layers` are a's `la` layers, then
    /// b's (`within`: no b, the pairs within a; then `layers.len() == la`). Checks the
    /// [`calibrator_bytes`] of one permuted Gram at a time against `budget` and holds as
    /// many permuted Grams at once as it allows (at most all of b's).
    pub fn new(
        layers: Vec<CalLayer>,
        la: usize,
        within: bool,
        unbiased: bool,
        budget: &Budget,
    ) -> Result<Calibrator> {
        let est = Estimator::from_unbiased(unbiased);
        let nb = if within {
            la
        } else {
            layers.len().saturating_sub(la)
        };
        if la == 0 || nb == 0 || (within && layers.len() != la) || la > layers.len() {
            return Err(Error::invalid("empty layer selection"));
        }
        let (m, kernel) = (layers[0].m, layers[0].kernel);
        if layers.iter().any(|l| l.m != m || l.kernel != kernel) {
            return Err(Error::Mismatch(
                "calibration layers of different samples or kernels".into(),
            ));
        }
        if m < est.min_rows() {
            return Err(Error::invalid(format!(
                "the {} CKA needs at least {} rows, got {m}",
                if unbiased { "debiased" } else { "biased" },
                est.min_rows()
            )));
        }
        let l = layers.len();
        budget.check(
            calibrator_bytes(l, m, 1, kernel),
            format_args!("the centred {m} × {m} Grams of {l} layers"),
            format_args!("use a smaller sample (sample=...) or fewer layers"),
        )?;
        let chunk = (1..=nb)
            .rev()
            .find(|&c| calibrator_bytes(l, m, c, kernel) <= budget.bytes as u128)
            .unwrap_or(1);
        let m2 = m * m;
        let mut stack = try_vec(l * m2, 0.0, format_args!("{l} centred {m} × {m} Grams"))?;
        let mut norms = Vec::with_capacity(l);
        for (layer, out) in layers.iter().zip(stack.chunks_mut(m2)) {
            norms.push(layer.centred_into(out, None, est)?.0);
        }
        Ok(Calibrator {
            layers,
            la,
            within,
            est,
            m,
            stack,
            norms,
            resampled: false,
            chunk,
        })
    }

    /// Rows of the sample.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Permuted Grams held at once by [`Calibrator::null`].
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// `(la, lb)`: the shape of every table.
    pub fn shape(&self) -> (usize, usize) {
        let lb = if self.within {
            self.la
        } else {
            self.layers.len() - self.la
        };
        (self.la, lb)
    }

    /// The RBF bandwidth of every layer on the whole sample (a's, then b's).
    pub fn bandwidths(&self) -> Vec<f64> {
        self.layers.iter().map(|l| l.bandwidth).collect()
    }

    /// Re-centre on the whole sample after a bootstrap.
    fn restore(&mut self) -> Result<()> {
        if self.resampled {
            let m2 = self.m * self.m;
            for (i, (layer, out)) in self
                .layers
                .iter()
                .zip(self.stack.chunks_mut(m2))
                .enumerate()
            {
                self.norms[i] = layer.centred_into(out, None, self.est)?.0;
            }
            self.resampled = false;
        }
        Ok(())
    }

    /// The CKA table of `G` (raw inner products, `la × lb`) under `norms`; `within`: the
    /// within-source table, its diagonal exactly 1 where defined, `(i, j)` for `i > j`
    /// mirrored from `(j, i)` when `mirror`.
    fn ratios(&self, g: &[f64], norms: &[f64], mirror: bool, same: bool) -> Vec<f64> {
        let (la, lb) = self.shape();
        let within = self.within;
        let off = if within { 0 } else { la };
        let mut out = vec![f64::NAN; la * lb];
        for i in 0..la {
            for j in 0..lb {
                let (p, q) = if within && mirror && i > j {
                    (j, i)
                } else {
                    (i, j)
                };
                out[i * lb + j] = cka_ratio(
                    g[p * lb + q],
                    norms[p],
                    norms[off + q],
                    same && within && p == q,
                );
            }
        }
        out
    }

    /// CKA of every pair on the whole sample (`la × lb`, row-major).
    pub fn observed(&mut self) -> Result<Vec<f64>> {
        self.restore()?;
        let (la, lb) = self.shape();
        let m2 = self.m * self.m;
        let off = if self.within { 0 } else { la };
        let g = cross(&self.stack, la, &self.stack[off * m2..], lb, m2);
        Ok(self.ratios(&g, &self.norms, false, true))
    }

    /// CKA of every pair under each permutation of `perms` (`count × m` row indices, each a
    /// permutation of `0..m`): `count × la × lb`, row-major. Within one source the cell
    /// `(i, j)`, `i ≤ j`, permutes layer `j`, mirrored.
    pub fn null(&mut self, perms: &[u32], monitor: &dyn crate::Monitor) -> Result<Vec<f64>> {
        let m = self.m;
        let count = check_indices(perms, m, true)?;
        self.restore()?;
        let (la, lb) = self.shape();
        let m2 = m * m;
        let off = if self.within { 0 } else { la };
        let chunk = self.chunk.min(lb);
        let mut buf = try_vec(chunk * m2, 0.0, format_args!("{chunk} permuted Grams"))?;
        let mut out = Vec::with_capacity(count * la * lb);
        for (t, pi) in perms.chunks(m).enumerate() {
            let mut g = vec![f64::NAN; la * lb];
            for j0 in (0..lb).step_by(chunk) {
                let j1 = (j0 + chunk).min(lb);
                for (j, dst) in (j0..j1).zip(buf.chunks_mut(m2)) {
                    let src = &self.stack[(off + j) * m2..(off + j + 1) * m2];
                    dst.par_chunks_mut(m)
                        .zip(pi.par_iter())
                        .for_each(|(row, &p)| {
                            let s = &src[p as usize * m..(p as usize + 1) * m];
                            for (o, &q) in row.iter_mut().zip(pi) {
                                *o = s[q as usize];
                            }
                        });
                }
                // within one source only the rows i ≤ j are used
                let rows = if self.within { j1.min(la) } else { la };
                let part = cross(&self.stack, rows, &buf, j1 - j0, m2);
                for i in 0..rows {
                    for j in j0..j1 {
                        g[i * lb + j] = part[i * (j1 - j0) + (j - j0)];
                    }
                }
            }
            out.extend(self.ratios(&g, &self.norms, true, false));
            monitor.progress(t as u64 + 1, count as u64)?;
        }
        Ok(out)
    }

    /// CKA of every pair on each resample of `resamples` (`count × m` row indices drawn with
    /// replacement): `count × la × lb`, and the RBF bandwidths of every resample
    /// (`count × layers`, NaN for the linear kernel or where undefined).
    pub fn bootstrap(
        &mut self,
        resamples: &[u32],
        monitor: &dyn crate::Monitor,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let m = self.m;
        let count = check_indices(resamples, m, false)?;
        let (la, lb) = self.shape();
        let m2 = m * m;
        let off = if self.within { 0 } else { la };
        let est = self.est;
        let mut out = Vec::with_capacity(count * la * lb);
        let mut bws = Vec::with_capacity(count * self.layers.len());
        for (t, s) in resamples.chunks(m).enumerate() {
            self.resampled = true;
            let done: Vec<(f64, f64)> = self
                .layers
                .par_iter()
                .zip(self.stack.par_chunks_mut(m2))
                .map(|(layer, dst)| layer.centred_into(dst, Some(s), est))
                .collect::<Result<_>>()?;
            self.norms = done.iter().map(|v| v.0).collect();
            bws.extend(done.iter().map(|v| v.1));
            let g = cross(&self.stack, la, &self.stack[off * m2..], lb, m2);
            out.extend(self.ratios(&g, &self.norms, false, true));
            monitor.progress(t as u64 + 1, count as u64)?;
        }
        Ok((out, bws))
    }
}

/// The number of `m`-long index rows in `idx`, each value `< m` and (`perm`) each row a
/// permutation of `0..m`.
fn check_indices(idx: &[u32], m: usize, perm: bool) -> Result<usize> {
    if m == 0 || !idx.len().is_multiple_of(m) {
        return Err(Error::Mismatch(format!(
            "{} row indices are not whole rows of {m}",
            idx.len()
        )));
    }
    let mut seen = vec![false; if perm { m } else { 0 }];
    for (t, row) in idx.chunks(m).enumerate() {
        seen.iter_mut().for_each(|v| *v = false);
        for &v in row {
            let v = v as usize;
            if v >= m || (perm && std::mem::replace(&mut seen[v], true)) {
                return Err(Error::invalid(format!(
                    "{} {t} is not {} of 0..{m} (index {v})",
                    if perm { "permutation" } else { "resample" },
                    if perm { "a permutation" } else { "drawn" }
                )));
            }
        }
    }
    Ok(idx.len() / m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::neighbors::Cpu;
    use crate::measures::cka::rbf::rbf_hsic;
    use crate::measures::hsic::{hsic, Gram};
    use crate::monitor::NoMonitor;

    /// Uniform values with per-feature offsets of 3·(feature + 1).
    fn data(m: usize, d: usize, seed: u64) -> Vec<f64> {
        crate::testdata::data(m, d, seed, 3.0)
    }

    /// `X̄X̄ᵀ` (centred first: the HSICs are shift-invariant, and the reference keeps its
    /// digits on data with large column means).
    fn linear_kernel(x: &[f64], m: usize, d: usize) -> Vec<f64> {
        let mu: Vec<f64> = (0..d)
            .map(|f| (0..m).map(|i| x[i * d + f]).sum::<f64>() / m as f64)
            .collect();
        let x: Vec<f64> = x.iter().enumerate().map(|(i, v)| v - mu[i % d]).collect();
        let mut k = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                k[i * m + j] = (0..d).map(|f| x[i * d + f] * x[j * d + f]).sum();
            }
        }
        k
    }

    fn reindex(k: &[f64], m: usize, p: &[u32]) -> Vec<f64> {
        let mut o = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                o[i * m + j] = k[p[i] as usize * m + p[j] as usize];
            }
        }
        o
    }

    /// A resample's CKA straight from its definition. Biased: `HKH` by explicit sums, the
    /// pairs `i ≠ j` with `s_i = s_j` left out. Debiased: `K̃` zero where `s_i = s_j`,
    /// U-centred term by term, the sum over pairs with `s_i ≠ s_j`.
    fn tied_cka(k: &[f64], l: &[f64], m: usize, s: &[u32], unbiased: bool) -> f64 {
        let h = |k: &[f64]| -> Vec<f64> {
            let mf = m as f64;
            let r: Vec<f64> = (0..m)
                .map(|i| (0..m).map(|j| k[i * m + j]).sum::<f64>() / mf)
                .collect();
            let g: f64 = r.iter().sum::<f64>() / mf;
            let mut c = vec![0.0; m * m];
            for i in 0..m {
                for j in 0..m {
                    if i == j || s[i] != s[j] {
                        c[i * m + j] = k[i * m + j] - r[i] - r[j] + g;
                    }
                }
            }
            c
        };
        let u = |k: &[f64]| -> Vec<f64> {
            if !unbiased {
                return h(k);
            }
            let kt = |i: usize, j: usize| if s[i] == s[j] { 0.0 } else { k[i * m + j] };
            let r: Vec<f64> = (0..m).map(|i| (0..m).map(|j| kt(i, j)).sum()).collect();
            let t: f64 = r.iter().sum();
            let mf = m as f64;
            let mut c = vec![0.0; m * m];
            for i in 0..m {
                for j in 0..m {
                    if s[i] != s[j] {
                        c[i * m + j] = kt(i, j) - r[i] / (mf - 2.0) - r[j] / (mf - 2.0)
                            + t / ((mf - 1.0) * (mf - 2.0));
                    }
                }
            }
            c
        };
        let (a, b) = (u(k), u(l));
        let ip = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>();
        ip(&a, &b) / (ip(&a, &a) * ip(&b, &b)).sqrt()
    }

    fn cka_of(k: Vec<f64>, l: Vec<f64>, m: usize, est: Estimator) -> f64 {
        let (k, l) = (
            Gram::prepare(k, m, est).unwrap(),
            Gram::prepare(l, m, est).unwrap(),
        );
        let (kl, kk, ll) = (
            hsic(&k, &l).unwrap(),
            hsic(&k, &k).unwrap(),
            hsic(&l, &l).unwrap(),
        );
        kl / (kk * ll).sqrt()
    }

    #[test]
    fn linear_null_and_bootstrap_match_the_hsic_formulas() {
        let m = 23;
        let (x, y) = (data(m, 3, 1), data(m, 5, 2));
        let b = Budget::unchecked();
        let prep = |x: &[f64], d| CalLayer::prepare_with(x, m, d, CalKernel::Linear, &b, &Cpu);
        let (kx, ky) = (linear_kernel(&x, m, 3), linear_kernel(&y, m, 5));
        let perm: Vec<u32> = (0..m as u32).map(|i| (i * 7 + 3) % m as u32).collect();
        let boot: Vec<u32> = (0..m as u32).map(|i| (i * i + 5) % m as u32).collect();
        for unbiased in [false, true] {
            let est = Estimator::from_unbiased(unbiased);
            let layers = vec![prep(&x, 3).unwrap(), prep(&y, 5).unwrap()];
            let mut c = Calibrator::new(layers, 1, false, unbiased, &b).unwrap();
            let obs = c.observed().unwrap();
            let want = cka_of(kx.clone(), ky.clone(), m, est);
            assert!((obs[0] - want).abs() < 1e-12, "{} {want}", obs[0]);
            let null = c.null(&perm, &NoMonitor).unwrap();
            let want = cka_of(kx.clone(), reindex(&ky, m, &perm), m, est);
            assert!((null[0] - want).abs() < 1e-12, "{} {want}", null[0]);
            let (bs, _) = c.bootstrap(&boot, &NoMonitor).unwrap();
            let (rx, ry) = (reindex(&kx, m, &boot), reindex(&ky, m, &boot));
            let want = tied_cka(&rx, &ry, m, &boot, unbiased);
            assert!((bs[0] - want).abs() < 1e-12, "{} {want}", bs[0]);
            // the null after a bootstrap is on the whole sample again
            assert_eq!(c.null(&perm, &NoMonitor).unwrap(), null);
        }
    }

    #[test]
    fn rbf_observed_is_rbf_cka_and_within_tables_are_symmetric() {
        let m = 31;
        let xs: Vec<Vec<f64>> = (0..3).map(|s| data(m, 4, s + 10)).collect();
        let b = Budget::unchecked();
        let k = CalKernel::Rbf { sigma: 0.8 };
        for unbiased in [false, true] {
            let ls: Vec<CalLayer> = xs
                .iter()
                .map(|x| CalLayer::prepare_with(x, m, 4, k, &b, &Cpu).unwrap())
                .collect();
            let mut c = Calibrator::new(ls, 3, true, unbiased, &b).unwrap();
            let obs = c.observed().unwrap();
            let refs: Vec<(&[f64], usize)> = xs.iter().map(|x| (x.as_slice(), 4)).collect();
            let r = rbf_hsic(&refs, None, m, 0.8, unbiased, &b, &NoMonitor).unwrap();
            for (o, w) in obs.iter().zip(&r.table.cka) {
                assert!((o - w).abs() < 1e-12, "{o} {w}");
            }
            let perm: Vec<u32> = (0..2 * m as u32)
                .map(|i| (i * 5 + i / 31) % m as u32)
                .collect();
            let null = c.null(&perm, &NoMonitor).unwrap();
            assert_eq!(null.len(), 2 * 9);
            for t in 0..2 {
                let g = &null[t * 9..(t + 1) * 9];
                for i in 0..3 {
                    for j in 0..3 {
                        assert_eq!(g[i * 3 + j], g[j * 3 + i]);
                    }
                }
            }
            // the identity permutation and resample give the observed table
            let id: Vec<u32> = (0..m as u32).collect();
            let same = c.bootstrap(&id, &NoMonitor).unwrap().0;
            for (o, w) in same.iter().zip(&obs) {
                assert!((o - w).abs() < 1e-14, "{o} {w}");
            }
        }
    }

    #[test]
    fn indices_are_checked() {
        let m = 5;
        let x = data(m, 2, 3);
        let b = Budget::unchecked();
        let l = || CalLayer::prepare_with(&x, m, 2, CalKernel::Linear, &b, &Cpu).unwrap();
        let mut c = Calibrator::new(vec![l()], 1, true, false, &b).unwrap();
        assert!(c.null(&[0, 1, 2, 3], &NoMonitor).is_err());
        assert!(c.null(&[0, 1, 2, 3, 3], &NoMonitor).is_err());
        assert!(c.bootstrap(&[0, 1, 2, 3, 5], &NoMonitor).is_err());
        assert!(c.bootstrap(&[0, 0, 0, 3, 3], &NoMonitor).is_ok());
        let tiny = Budget::argument(100).unwrap();
        assert!(matches!(
            Calibrator::new(vec![l()], 1, true, false, &tiny),
            Err(Error::Memory(_))
        ));
    }
}
