//! [`Moments`]: the finalised moments of a pass, and what is derived from them alone (the
//! blocks `C_ij` of the centred cross-product matrix, linear CKA biased and debiased).
use crate::error::{Error, Result};
use rayon::prelude::*;

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
