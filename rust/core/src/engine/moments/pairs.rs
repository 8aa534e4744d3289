//! [`PairStats`]: what linear CKA needs of every layer pair — `‖C_ij‖_F²`, `Σ_a r̄_i r̄_j`,
//! `tr C_ii` and `n` — whether they come from one pass's [`Moments`] or are summed over the
//! tiles of a tiled pass; and the one home of the linear CKA formula
//! ([`PairStats::cka_matrix`]).
use super::finalised::Moments;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Per-pair sums of the centred data of `L` layers (row-major `L × L` where a pair).
#[derive(Clone, Debug)]
pub struct PairStats {
    pub n: u64,
    pub dims: Vec<usize>,
    pub names: Vec<String>,
    /// `‖C_ij‖_F²`.
    pub sq: Vec<f64>,
    /// `Σ_a r̄_{i,a} r̄_{j,a}`, `r̄_{i,a} = ‖x_{i,a} − x̄_i‖²`.
    pub rr: Vec<f64>,
    /// `tr C_ii`.
    pub trace: Vec<f64>,
    /// Which pairs were computed (a tiled pass computes only the pairs asked for).
    pub known: Vec<bool>,
    /// First row holding a NaN/Inf per layer (only when finiteness was not enforced).
    pub nonfinite: Vec<Option<u64>>,
    /// As [`Moments::shift_offset`] (the largest over a tiled pass's tiles).
    pub shift_offset: f64,
}

impl PairStats {
    /// The statistics of the pairs `(rows[a], cols[b])` (and every layer with itself)
    /// from a single pass's moments; each block norm computed once, in parallel.
    pub fn from_moments(m: &Moments, rows: &[usize], cols: &[usize]) -> Result<Self> {
        let l = m.dims.len();
        for &i in rows.iter().chain(cols) {
            if i >= l {
                return Err(Error::invalid(format!(
                    "layer index {i} out of range for {l} layers"
                )));
            }
        }
        let mut known = vec![false; l * l];
        for &i in rows.iter().chain(cols) {
            known[i * l + i] = true;
        }
        for &i in rows {
            for &j in cols {
                known[i * l + j] = true;
                known[j * l + i] = true;
            }
        }
        let pairs: Vec<(usize, usize)> = (0..l * l)
            .filter(|&k| known[k] && k / l <= k % l)
            .map(|k| (k / l, k % l))
            .collect();
        let norms: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| m.block_sq_norm(i, j))
            .collect::<Result<_>>()?;
        let mut sq = vec![f64::NAN; l * l];
        for (&(i, j), v) in pairs.iter().zip(norms) {
            sq[i * l + j] = v;
            sq[j * l + i] = v;
        }
        Ok(PairStats {
            n: m.n,
            dims: m.dims.clone(),
            names: m.names.clone(),
            sq,
            rr: m.rr.clone(),
            trace: (0..l).map(|k| m.trace(k)).collect::<Result<_>>()?,
            known,
            nonfinite: m.nonfinite.clone(),
            shift_offset: m.shift_offset,
        })
    }

    /// `n(n−3)·HSIC₁` (Song et al. 2012) of the linear kernels of layers `i`, `j`; NaN when
    /// `n < 4` (see [`PairStats::cka_matrix`]).
    fn hsic1_scaled(&self, i: usize, j: usize) -> f64 {
        let l = self.dims.len();
        if self.n < 4 {
            return f64::NAN;
        }
        let n = self.n as f64;
        let rs = self.rr[i * l + j];
        self.sq[i * l + j] - rs + self.trace[i] * self.trace[j] / ((n - 1.0) * (n - 2.0))
            - 2.0 * rs / (n - 2.0)
    }

    /// Linear CKA of every `(rows[a], cols[b])` pair, row-major `rows.len() × cols.len()`.
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
    /// debiased estimator gets `n < 4` rows (its normalisation divides by `n − 3`). A layer
    /// with itself is 1 exactly when its denominator is positive.
    pub fn cka_matrix(&self, rows: &[usize], cols: &[usize], debiased: bool) -> Result<Vec<f64>> {
        let l = self.dims.len();
        for &i in rows.iter().chain(cols) {
            if i >= l {
                return Err(Error::invalid(format!(
                    "layer index {i} out of range for {l} layers"
                )));
            }
        }
        let mut out = Vec::with_capacity(rows.len() * cols.len());
        for &i in rows {
            for &j in cols {
                if !(self.known[i * l + j] && self.known[i * l + i] && self.known[j * l + j]) {
                    return Err(Error::invalid(format!(
                        "the pair ({:?}, {:?}) was not computed by this pass",
                        self.names[i], self.names[j]
                    )));
                }
                let (hii, hjj, hij) = if debiased {
                    (
                        self.hsic1_scaled(i, i),
                        self.hsic1_scaled(j, j),
                        self.hsic1_scaled(i, j),
                    )
                } else {
                    (self.sq[i * l + i], self.sq[j * l + j], self.sq[i * l + j])
                };
                out.push(if !(hii > 0.0 && hjj > 0.0) {
                    f64::NAN
                } else if i == j {
                    1.0
                } else {
                    hij / (hii.sqrt() * hjj.sqrt())
                });
            }
        }
        Ok(out)
    }
}
