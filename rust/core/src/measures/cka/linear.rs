//! Linear CKA from the moment engine's pair statistics ([`PairStats`]: one pass's
//! [`Moments`], the Gram route or the tiles of a tiled pass), exact over all rows, with no
//! Gram matrix of the rows.
//!
//! With centred data `X̄_i` (rows = samples), `C_ij = X̄_iᵀX̄_j` and `r_a = ‖x̄_{i,a}‖²`,
//! `s_a = ‖x̄_{j,a}‖²` for the linear kernels `K = X̄_iX̄_iᵀ`, `L = X̄_jX̄_jᵀ`:
//!
//! * biased (Kornblith et al. 2019; HSIC of Gretton et al. 2005): `tr(KHLH) = ‖C_ij‖_F²`, so
//!   `CKA = ‖C_ij‖_F² / (‖C_ii‖_F ‖C_jj‖_F)` (the `(n − 1)²` cancels);
//! * debiased (unbiased HSIC of Song et al. 2012, eq. 5; translation invariant for the
//!   linear kernel, so centred data may be used): `tr K̃L̃ = ‖C_ij‖² − Σ r_a s_a`,
//!   `1ᵀK̃1 = −tr C_ii`, `1ᵀK̃L̃1 = Σ r_a s_a`, given to
//!   [`unbiased_scaled`] (the `n(n − 3)` cancels).
//!
//! Both ratios under the NaN rule of [`cka_ratio`]: NaN
//! when a layer has zero variance, when a debiased self-HSIC is not positive (tiny `n`), or
//! when the debiased estimator gets `n < 4` rows; a layer with itself is exactly 1 when
//! defined.
use crate::engine::moments::{Moments, PairStats};
use crate::error::{Error, Result};
use crate::measures::hsic::{cka_ratio, unbiased_scaled};

/// Linear CKA of what the moment engine computed (an extension of [`PairStats`] and
/// [`Moments`]: the engine sums, the measure divides).
pub trait LinearCka {
    /// Linear CKA of every `(rows[a], cols[b])` pair, row-major `rows.len() × cols.len()`,
    /// biased or debiased (module docs).
    fn cka_matrix(&self, rows: &[usize], cols: &[usize], debiased: bool) -> Result<Vec<f64>>;

    /// Linear CKA of layers `i` and `j`.
    fn cka(&self, i: usize, j: usize, debiased: bool) -> Result<f64> {
        Ok(self.cka_matrix(&[i], &[j], debiased)?[0])
    }
}

/// `n(n−3) · HSIC₁` of the linear kernels of layers `i`, `j` (NaN when `n < 4`).
fn hsic1_scaled(s: &PairStats, i: usize, j: usize) -> f64 {
    let l = s.dims.len();
    let rs = s.rr[i * l + j];
    unbiased_scaled(s.sq[i * l + j] - rs, -s.trace[i], -s.trace[j], rs, s.n)
}

impl LinearCka for PairStats {
    fn cka_matrix(&self, rows: &[usize], cols: &[usize], debiased: bool) -> Result<Vec<f64>> {
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
                let (hij, hii, hjj) = if debiased {
                    (
                        hsic1_scaled(self, i, j),
                        hsic1_scaled(self, i, i),
                        hsic1_scaled(self, j, j),
                    )
                } else {
                    (self.sq[i * l + j], self.sq[i * l + i], self.sq[j * l + j])
                };
                out.push(cka_ratio(hij, hii, hjj, i == j));
            }
        }
        Ok(out)
    }
}

impl LinearCka for Moments {
    /// Each distinct block norm computed once, in parallel ([`PairStats::from_moments`]).
    fn cka_matrix(&self, rows: &[usize], cols: &[usize], debiased: bool) -> Result<Vec<f64>> {
        PairStats::from_moments(self, rows, cols)?.cka_matrix(rows, cols, debiased)
    }
}
