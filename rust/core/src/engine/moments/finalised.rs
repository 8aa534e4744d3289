//! [`Moments`]: the finalised moments of a pass and their blocks `C_ij`. The measures on
//! them live in `crate::measures` (linear CKA: `cka::linear`; spectra and alignment:
//! `align::measures_from_moments`).
use super::state::ldexp;
use crate::error::{Error, Result};

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
    /// Per layer the scale exponent `e` of the pass (see
    /// [`super::state::SCALE_BAND`]; 0 for every ordinary layer): `cov`'s block
    /// `(i, j)` is in units of `2^-(e_i + e_j)`, `rr[k, l]` of `2^-2(e_k + e_l)`; `mean` is
    /// in the data's own units. The accessors below return the data's units (which can
    /// overflow to ±Inf where the true value is beyond f64); measures that are scale-free per
    /// layer (CKA, alignment, the spectrum's ratios) use the stored units directly.
    pub scale_exp: Vec<i32>,
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
    /// [`Moments::block`] in the data's units (see `scale_exp`).
    pub fn block_unscaled(&self, i: usize, j: usize) -> Result<Vec<f64>> {
        let mut out = self.block(i, j)?;
        let e = self.exp(i) + self.exp(j);
        if e != 0 {
            out.iter_mut().for_each(|v| *v = ldexp(*v, e));
        }
        Ok(out)
    }
    /// The scale exponent of layer `i` (0 when none was recorded).
    pub fn exp(&self, i: usize) -> i32 {
        self.scale_exp.get(i).copied().unwrap_or(0)
    }
    /// Scale-dependent accessors ([`Moments::block`], [`Moments::rr`], [`Moments::trace`],
    /// [`Moments::block_sq_norm`]) are in the stored units (see `scale_exp`): what the
    /// scale-free measures use. Multiply by `2^(e_i + e_j)` per factor for the data's units
    /// ([`Moments::block_unscaled`], [`Moments::cov_unscaled`], [`super::state::ldexp`]).
    ///
    /// The full `C` in the data's units (a copy; see `scale_exp`).
    pub fn cov_unscaled(&self) -> Vec<f64> {
        let mut c = self.cov.clone();
        if self.scale_exp.iter().all(|&e| e == 0) {
            return c;
        }
        let d = self.width();
        let mut e = Vec::with_capacity(d);
        for (l, &dl) in self.dims.iter().enumerate() {
            e.extend(std::iter::repeat_n(self.exp(l), dl));
        }
        for (j, col) in c.chunks_mut(d.max(1)).enumerate() {
            for (i, v) in col.iter_mut().enumerate() {
                *v = ldexp(*v, e[i] + e[j]);
            }
        }
        c
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
