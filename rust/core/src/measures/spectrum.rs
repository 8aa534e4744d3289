//! Per-layer spectra from the centred cross-product `C_ii = Σ_a (x_a − x̄)(x_a − x̄)ᵀ`.
//!
//! The eigendecomposition `C_ii = V Λ Vᵀ` ([`LayerEig`]) is computed once per layer (in
//! parallel across layers, [`layer_eigs`]) and shared by the spectrum measures here and by the
//! subspace/CCA/Procrustes alignment measures of [`super::align`].
//!
//! # Conventions (also in docs/alignment.md)
//! * Covariance eigenvalues are `λ_i = eig(C_ii) / (n − 1)`, sorted in descending order and
//!   reported **as computed**: a PSD matrix can give tiny negative eigenvalues (≈ −1e-17 ·
//!   λ_max) through round-off; they are not clamped.
//! * Numerical rank: `r = #{λ_i > tol}` with `tol = λ_max · max(n, d) · ε_f64` (the NumPy
//!   `matrix_rank` rule). Derived measures use `λ⁺_i = λ_i if λ_i > tol else 0`.
//! * A layer with zero variance (all rows equal) has `r = 0` and NaN ratio measures (0/0).
use crate::error::{Error, Result};
use crate::monitor::Monitor;
use faer::{Mat, MatRef, Side};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Eigendecomposition of one layer's centred cross-product matrix `C_ii` (not divided by
/// `n − 1`): `values` descending, `vectors` the matching orthonormal eigenvectors (columns).
#[derive(Debug, Clone)]
pub struct LayerEig {
    /// Eigenvalues of `C_ii`, descending, as computed (tiny negatives possible).
    pub values: Vec<f64>,
    /// `d × d`, column `c` is the eigenvector of `values[c]`.
    pub vectors: Mat<f64>,
    /// Numerical rank: number of eigenvalues `> tol`.
    pub rank: usize,
    /// Rank tolerance `λ_max · max(n, d) · ε_f64` (on the scale of `C_ii`).
    pub tol: f64,
    /// `tr C_ii` from the diagonal of the input (not from the eigenvalues).
    pub trace: f64,
    /// Number of rows the moments were accumulated over.
    pub n: usize,
}

impl LayerEig {
    /// Layer width `d`.
    pub fn dim(&self) -> usize {
        self.values.len()
    }

    /// `λ⁺`: eigenvalues with those `≤ tol` set to zero (the values derived measures use).
    pub fn positive_values(&self) -> Vec<f64> {
        self.values
            .iter()
            .map(|&v| if v > self.tol { v } else { 0.0 })
            .collect()
    }
}

/// Rank tolerance of the eigenvalues of a `d × d` PSD matrix from `n` rows.
pub fn rank_tolerance(lambda_max: f64, n: usize, d: usize) -> f64 {
    lambda_max.max(0.0) * (n.max(d) as f64) * f64::EPSILON
}

/// Eigendecomposition of a symmetric `C_ii` (lower triangle read), eigenvalues descending.
///
/// Errors: not square, fewer than 2 rows, non-finite entries, or an eigen-solver failure.
pub fn layer_eig(c: MatRef<'_, f64>, n: usize) -> Result<LayerEig> {
    let d = c.nrows();
    if c.ncols() != d {
        return Err(Error::invalid(format!(
            "covariance block must be square, got {}×{}",
            d,
            c.ncols()
        )));
    }
    if d == 0 {
        return Err(Error::invalid("layer of width 0"));
    }
    if n < 2 {
        return Err(Error::invalid(format!(
            "spectra need at least 2 rows, got n = {n}"
        )));
    }
    let mut trace = 0.0;
    for j in 0..d {
        for i in j..d {
            if !c[(i, j)].is_finite() {
                return Err(Error::NonFinite(format!(
                    "covariance entry ({i}, {j}) is not finite"
                )));
            }
        }
        trace += c[(j, j)];
    }
    let eig = c
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::invalid(format!("eigendecomposition failed: {e:?}")))?;
    let s = eig.S().column_vector();
    let u = eig.U();
    // faer returns ascending order: reverse.
    let values: Vec<f64> = (0..d).map(|i| s[d - 1 - i]).collect();
    let vectors = Mat::from_fn(d, d, |r, col| u[(r, d - 1 - col)]);
    let tol = rank_tolerance(values[0], n, d);
    let rank = values.iter().filter(|&&v| v > tol).count();
    Ok(LayerEig {
        values,
        vectors,
        rank,
        tol,
        trace,
        n,
    })
}

/// [`layer_eig`] for many layers, in parallel (rayon) across layers. `monitor` is told after
/// each finished layer (`done`, `total` = layers).
pub fn layer_eigs(
    blocks: &[MatRef<'_, f64>],
    n: usize,
    monitor: &dyn Monitor,
) -> Result<Vec<LayerEig>> {
    let total = blocks.len() as u64;
    let done = AtomicU64::new(0);
    blocks
        .par_iter()
        .map(|c| {
            let e = layer_eig(*c, n)?;
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            monitor.progress(k, total)?;
            Ok(e)
        })
        .collect()
}

/// Spectrum measures of one layer (covariance `C_ii / (n − 1)`).
#[derive(Debug, Clone)]
pub struct Spectrum {
    /// Covariance eigenvalues `λ_i`, descending, as computed (not clamped).
    pub eigenvalues: Vec<f64>,
    /// `λ_i / Σ_j λ⁺_j` (tiny negative `λ_i` give tiny negative ratios, reported as-is).
    pub explained_variance_ratio: Vec<f64>,
    /// `Σ λ⁺`.
    pub total_variance: f64,
    /// Numerical rank `#{λ_i > tol}`.
    pub rank: usize,
    /// The rank tolerance on the covariance scale.
    pub rank_tol: f64,
    /// Roy & Vetterli (2007): `exp(−Σ p_i ln p_i)`, `p_i = σ_i / Σσ`, `σ_i = sqrt(λ⁺_i)`.
    pub effective_rank: f64,
    /// `(Σλ⁺)² / Σ(λ⁺)²`.
    pub participation_ratio: f64,
    /// `Σλ⁺ / λ_1`.
    pub stable_rank: f64,
    /// Smallest `k` with `Σ_{i≤k} λ⁺_i / Σλ⁺ ≥ 0.90` (NaN for a zero-variance layer).
    pub pca_id_90: f64,
    /// Same at 0.95.
    pub pca_id_95: f64,
    /// Same at 0.99.
    pub pca_id_99: f64,
}

/// Smallest `k ≥ 1` with cumulative share `≥ threshold` of the non-negative, descending
/// `pos` values (NaN if they sum to 0).
pub fn pca_components(pos: &[f64], threshold: f64) -> f64 {
    let total: f64 = pos.iter().sum();
    if total <= 0.0 || pos.is_empty() {
        return f64::NAN;
    }
    let mut cum = 0.0;
    for (i, v) in pos.iter().enumerate() {
        cum += v;
        if cum / total >= threshold {
            return (i + 1) as f64;
        }
    }
    // Round-off can leave the full cumulative sum a hair below 1 for threshold 1.0.
    pos.iter().filter(|&&v| v > 0.0).count() as f64
}

impl Spectrum {
    /// The spectrum measures from the eigen-decomposition of `C_ii` (divides by `n − 1`).
    pub fn from_eig(e: &LayerEig) -> Spectrum {
        let scale = 1.0 / ((e.n as f64) - 1.0);
        let eigenvalues: Vec<f64> = e.values.iter().map(|v| v * scale).collect();
        let pos: Vec<f64> = e.positive_values().iter().map(|v| v * scale).collect();
        let total: f64 = pos.iter().sum();
        let sum_sq: f64 = pos.iter().map(|v| v * v).sum();
        let sig: Vec<f64> = pos.iter().map(|v| v.sqrt()).collect();
        let sig_total: f64 = sig.iter().sum();
        let entropy: f64 = sig
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| {
                let p = s / sig_total;
                -p * p.ln()
            })
            .sum();
        let (effective_rank, participation_ratio, stable_rank) = if total > 0.0 {
            (entropy.exp(), total * total / sum_sq, total / pos[0])
        } else {
            (f64::NAN, f64::NAN, f64::NAN)
        };
        Spectrum {
            explained_variance_ratio: eigenvalues.iter().map(|v| v / total).collect(),
            eigenvalues,
            total_variance: total,
            rank: e.rank,
            rank_tol: e.tol * scale,
            effective_rank,
            participation_ratio,
            stable_rank,
            pca_id_90: pca_components(&pos, 0.90),
            pca_id_95: pca_components(&pos, 0.95),
            pca_id_99: pca_components(&pos, 0.99),
        }
    }

    /// The absolute values (eigenvalues, total variance, rank tolerance) multiplied by
    /// `2^two_e`: a spectrum computed on a layer stored in units of `2^-e`
    /// ([`crate::engine::moments::Moments::scale_exp`]) back in the data's units (±Inf where
    /// the true value is beyond f64); the ratios are unit-free and unchanged.
    pub fn rescaled(mut self, two_e: i32) -> Spectrum {
        if two_e != 0 {
            use crate::engine::moments::ldexp;
            self.eigenvalues
                .iter_mut()
                .for_each(|v| *v = ldexp(*v, two_e));
            self.total_variance = ldexp(self.total_variance, two_e);
            self.rank_tol = ldexp(self.rank_tol, two_e);
        }
        self
    }

    /// Smallest `k` whose cumulative share of `Σλ⁺` is `≥ threshold` (PCA intrinsic
    /// dimension at any threshold; NaN for a zero-variance layer).
    pub fn pca_id(&self, threshold: f64) -> f64 {
        let pos: Vec<f64> = self
            .eigenvalues
            .iter()
            .map(|&v| if v > self.rank_tol { v } else { 0.0 })
            .collect();
        pca_components(&pos, threshold)
    }

    /// `(name, value)` of the scalar measures, in a fixed order (the Python table columns).
    pub fn measures(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("total_variance", self.total_variance),
            ("rank", self.rank as f64),
            ("rank_tol", self.rank_tol),
            ("effective_rank", self.effective_rank),
            ("participation_ratio", self.participation_ratio),
            ("stable_rank", self.stable_rank),
            ("pca_id_90", self.pca_id_90),
            ("pca_id_95", self.pca_id_95),
            ("pca_id_99", self.pca_id_99),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::NoMonitor;

    /// Centred cross-product of row-major data (n × d), plain loops.
    fn cross(x: &[Vec<f64>]) -> Mat<f64> {
        let n = x.len();
        let d = x[0].len();
        let mean: Vec<f64> = (0..d)
            .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64)
            .collect();
        Mat::from_fn(d, d, |a, b| {
            x.iter()
                .map(|r| (r[a] - mean[a]) * (r[b] - mean[b]))
                .sum::<f64>()
        })
    }

    #[test]
    fn diagonal_covariance_measures() {
        // Covariance diag(4, 1, 0) scaled by n − 1 = 9.
        let n = 10;
        let c = Mat::from_fn(3, 3, |i, j| if i == j { [36.0, 9.0, 0.0][i] } else { 0.0 });
        let e = layer_eig(c.as_ref(), n).unwrap();
        assert_eq!(e.rank, 2);
        let s = Spectrum::from_eig(&e);
        assert!((s.eigenvalues[0] - 4.0).abs() < 1e-12);
        assert!((s.eigenvalues[1] - 1.0).abs() < 1e-12);
        assert!((s.explained_variance_ratio[0] - 0.8).abs() < 1e-12);
        assert!((s.participation_ratio - 25.0 / 17.0).abs() < 1e-12);
        assert!((s.stable_rank - 5.0 / 4.0).abs() < 1e-12);
        let (p1, p2) = (2.0 / 3.0, 1.0 / 3.0);
        let er = (-(p1 * f64::ln(p1) + p2 * f64::ln(p2))).exp();
        assert!((s.effective_rank - er).abs() < 1e-12);
        assert_eq!(s.pca_id_90, 2.0);
        assert_eq!(s.pca_id_95, 2.0);
        assert_eq!(s.pca_id(0.9), s.pca_id_90);
        assert_eq!(s.pca_id(0.8), 1.0);
        // 0.8 ≥ 0.8 exactly at k = 1
        assert_eq!(pca_components(&[4.0, 1.0], 0.8), 1.0);
    }

    #[test]
    fn eigenvectors_reconstruct() {
        let x: Vec<Vec<f64>> = (0..7)
            .map(|a| {
                (0..4)
                    .map(|b| ((a * 7 + b * 3) as f64).sin() + b as f64)
                    .collect()
            })
            .collect();
        let c = cross(&x);
        let e = layer_eig(c.as_ref(), 7).unwrap();
        for w in e.values.windows(2) {
            assert!(w[0] >= w[1]);
        }
        for i in 0..4 {
            for j in 0..4 {
                let r: f64 = (0..4)
                    .map(|k| e.vectors[(i, k)] * e.values[k] * e.vectors[(j, k)])
                    .sum();
                assert!((r - c[(i, j)]).abs() < 1e-10 * e.values[0]);
            }
        }
        let all = layer_eigs(&[c.as_ref(), c.as_ref()], 7, &NoMonitor).unwrap();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn zero_variance_and_errors() {
        let c = Mat::<f64>::zeros(3, 3);
        let e = layer_eig(c.as_ref(), 5).unwrap();
        assert_eq!(e.rank, 0);
        let s = Spectrum::from_eig(&e);
        assert!(s.effective_rank.is_nan() && s.pca_id_90.is_nan());
        assert!(layer_eig(c.as_ref(), 1).is_err());
        let r = Mat::<f64>::zeros(2, 3);
        assert!(layer_eig(r.as_ref(), 5).is_err());
        let mut nan = Mat::<f64>::zeros(2, 2);
        nan[(1, 0)] = f64::NAN;
        assert!(matches!(
            layer_eig(nan.as_ref(), 5),
            Err(Error::NonFinite(_))
        ));
    }
}
