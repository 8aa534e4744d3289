//! Subspace alignment between layers from one-pass moments: principal angles (sample and
//! feature space), SVCCA, PWCCA, CCA and orthogonal Procrustes.
//!
//! Everything is a function of the centred cross-products `C_ii`, `C_jj`, `C_ij` (see
//! [`crate::engine::moments`]) and of the per-layer eigendecompositions
//! `C_ii = V_i Λ_i V_iᵀ` ([`LayerEig`]); no second pass over the rows is needed. Write
//! `X̃_i` for the centred `n × d_i` activations and `σ = sqrt(λ)` for its singular values;
//! the left singular vectors are `U_i = X̃_i V_i Σ_i⁻¹`, hence
//! `U_i[:, :k]ᵀ U_j[:, :k] = Σ_i⁻¹ V_iᵀ C_ij V_j Σ_j⁻¹` (top-k blocks).
//!
//! * `Subspace(Samples)`: cosines of the principal angles between the top-k left singular
//!   subspaces (token space) = singular values of `Σ_i⁻¹ V_iᵀ C_ij V_j Σ_j⁻¹`; any widths.
//!   Value: mean cos² (subspace overlap); extra: Grassmann distance `sqrt(Σ θ²)`.
//! * `Subspace(Features)`: singular values of `V_i[:, :k]ᵀ V_j[:, :k]` (equal widths only).
//! * `Svcca` (Raghu et al. 2017): keep the top-k (or 99 %-variance) PCA directions, CCA between
//!   the kept subspaces. The kept reduced data `X̃_i V_i` has orthonormal basis `U_i`, so the
//!   canonical correlations **equal** the sample-space principal cosines of the kept
//!   subspaces. Value: mean canonical correlation.
//! * `Pwcca` (Morcos et al. 2018): the same canonical correlations `ρ_c`, weighted by
//!   `α_c ∝ Σ_a |⟨h_c, x̃_a⟩|`, where `h_c = U_i p_c` are the canonical variates of the row
//!   layer (`M = P S Qᵀ`) and `x̃_a` its centred neurons: `h_cᵀ X̃_i = (Pᵀ Σ_i V_iᵀ)_c`,
//!   a closed form in the moments. Not symmetric: `value[i, j]` weights by the row layer.
//! * `Cca`: mean squared canonical correlation `R² = Σρ²/min(d_i, d_j)` of the full layers;
//!   `ρ` = singular values of `(C_ii + r_i I)^{-1/2} C_ij (C_jj + r_j I)^{-1/2}` with ridge
//!   `r_i = ε tr(C_ii)/d_i` when `n ≤ d_i` or `C_ii` is numerically singular, else `r_i = 0`.
//! * `Procrustes`: orthogonal Procrustes on centred, Frobenius-normalised data:
//!   similarity `‖C_ij‖_* / sqrt(tr C_ii tr C_jj)`, angular distance (Williams et al. 2021)
//!   `arccos(similarity)`. The stored "cosines" are the normalised singular values of `C_ij`
//!   (they sum to the similarity).
//!
//! * `Shape` (Williams, Kunz, Kornblith & Linderman 2021, NeurIPS, "Generalized shape
//!   metrics on neural representations"): each layer partially whitened by
//!   `Z_i = V_i diag(α + (1 − α) λ^(−1/2)) V_iᵀ` (`λ`: the eigenvalues of the covariance
//!   `C_ii/(n−1)`, floored at the rank tolerance `tol/(n−1)` of the rank rule below; `α = 1`:
//!   no whitening, Procrustes; `α = 0`: full whitening, CCA-like), then
//!   `θ = arccos(‖Z_i S_ij Z_j‖_* / sqrt(‖X̃_i Z_i‖² ‖X̃_j Z_j‖²))` with `S_ij = C_ij/(n−1)` and
//!   `‖X̃ Z‖² = Σ λ⁺ (α + (1 − α) λ^(−1/2))²` per `n − 1` rows (the Procrustes rotation's
//!   inner product is the nuclear norm). Extras: the Procrustes-aligned Euclidean distance
//!   `sqrt(‖X̃_i Z_i‖² + ‖X̃_j Z_j‖² − 2‖Z_i S_ij Z_j‖_*)` (per `sqrt(n − 1)` rows) and the
//!   cosine. A layer with itself is exactly 0. A metric: symmetric, 0 on equal layers up to
//!   rotation, the triangle inequality (for the angle, tested).
//!
//! Rank rule: `k` must not exceed the numerical rank `#{λ > λ_max · max(n, d) · ε_f64}` of
//! either layer; otherwise an `InvalidArgument` error names the layer and its rank.
//! `arccos` of a cosine that round-off puts above 1 is taken as 0 (only in the angles).
use crate::error::{Error, Result};
use crate::measures::spectrum::LayerEig;
use faer::{Mat, MatRef};

mod matrix;
pub use matrix::{
    align_matrix, eigs_bytes, measures_from_cov, measures_from_moments, AlignSpec, AlignmentMatrix,
    CovView, LayerFacts,
};

/// Which space the principal angles live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Token/sample space: left singular vectors of the centred activations (any widths).
    Samples,
    /// Feature space: right singular vectors (PCA axes); equal widths only.
    Features,
}

/// Alignment method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Subspace(Space),
    Svcca,
    Pwcca,
    Cca,
    Procrustes,
    /// Generalized shape metric, partial whitening `α` in [`AlignOptions::alpha`].
    Shape,
}

impl Method {
    /// Parse `"subspace" | "svcca" | "pwcca" | "cca" | "procrustes"` with a space name.
    pub fn parse(method: &str, space: &str) -> Result<Method> {
        let sp = crate::error::choice(
            "space",
            space,
            &[("samples", Space::Samples), ("features", Space::Features)],
        )?;
        Ok(match method {
            "subspace" => Method::Subspace(sp),
            "svcca" => Method::Svcca,
            "pwcca" => Method::Pwcca,
            "cca" => Method::Cca,
            "procrustes" => Method::Procrustes,
            "shape" => Method::Shape,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown alignment method {method:?} (subspace, svcca, pwcca, cca, procrustes)"
                )))
            }
        })
    }

    /// Names of the per-pair extra values this method reports.
    pub fn extra_names(&self) -> &'static [&'static str] {
        match self {
            Method::Subspace(_) | Method::Svcca => &["grassmann"],
            Method::Pwcca => &["mean_cca"],
            Method::Cca => &[],
            Method::Procrustes => &["distance"],
            Method::Shape => &["euclidean", "similarity"],
        }
    }
}

/// How many leading PCA directions to keep per layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KSpec {
    /// Exactly `k` (must be ≤ the numerical rank of every layer involved).
    Fixed(usize),
    /// The smallest `k` whose cumulative variance share is ≥ the given fraction (0.99 for
    /// SVCCA's "99 % of the variance").
    Variance(f64),
}

/// Leading directions kept per layer when neither `k` nor a variance share is given.
pub const DEFAULT_K: usize = 32;

impl KSpec {
    /// `k` directions, or the smallest number holding the `variance` share; neither given:
    /// [`DEFAULT_K`]; both: an error.
    pub fn from_options(k: Option<usize>, variance: Option<f64>) -> Result<KSpec> {
        match (k, variance) {
            (Some(k), None) => Ok(KSpec::Fixed(k)),
            (None, Some(f)) => Ok(KSpec::Variance(f)),
            (None, None) => Ok(KSpec::Fixed(DEFAULT_K)),
            (Some(_), Some(_)) => Err(Error::invalid("give either k or variance, not both")),
        }
    }
}

/// Options of [`align_matrix`].
#[derive(Debug, Clone, Copy)]
pub struct AlignOptions {
    pub method: Method,
    pub k: KSpec,
    /// `ε` of the CCA ridge `ε · tr(C_ii) / d_i` (used by `Cca` only).
    pub ridge_eps: f64,
    /// Partial whitening of `Shape`, in `[0, 1]` (1: none).
    pub alpha: f64,
}

/// One pair's result.
#[derive(Debug, Clone)]
pub struct PairAlignment {
    /// Summary value for (row, col).
    pub value: f64,
    /// Summary value for (col, row) (differs from `value` only for PWCCA).
    pub value_t: f64,
    /// Principal cosines / canonical correlations (descending, as computed).
    pub cosines: Vec<f64>,
    /// Method-specific extras, in the order of [`Method::extra_names`].
    pub extras: Vec<f64>,
}

impl PairAlignment {
    /// A summary the same both ways (every method but PWCCA).
    fn symmetric(value: f64, cosines: Vec<f64>, extras: Vec<f64>) -> Self {
        PairAlignment {
            value,
            value_t: value,
            cosines,
            extras,
        }
    }
}

/// Per-layer quantities prepared once and shared by all pairs.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Kept directions (0 for methods that do not use k).
    pub k: usize,
    /// `V_i[:, :k] Σ_i⁻¹` (samples subspace, SVCCA, PWCCA), `V_i[:, :k]` (features), or
    /// `(C_ii + r I)^{-1/2}` (CCA); empty for Procrustes.
    pub basis: Mat<f64>,
    /// CCA ridge `r_i` actually added (0 when none).
    pub ridge: f64,
    /// Numerical rank of `C_ii` (the rank rule of the module docs).
    pub rank: usize,
    /// Layer width.
    pub dim: usize,
    /// `tr C_ii`.
    pub trace: f64,
    /// `Shape`: `‖X̃_i Z_i‖²/(n−1)` (0 otherwise).
    pub norm: f64,
}

impl Prepared {
    /// The per-layer numbers reported with the table.
    pub fn facts(&self) -> LayerFacts {
        LayerFacts {
            k: self.k,
            ridge: self.ridge,
            rank: self.rank,
        }
    }
}

fn variance_k(e: &LayerEig, frac: f64) -> usize {
    let pos = e.positive_values();
    let total: f64 = pos.iter().sum();
    let mut cum = 0.0;
    for (i, v) in pos.iter().enumerate() {
        cum += v;
        if cum >= frac * total {
            return i + 1;
        }
    }
    e.rank
}

/// Prepare one layer for `opts` (`name` is used in error messages).
pub fn prepare(e: &LayerEig, name: &str, opts: &AlignOptions) -> Result<Prepared> {
    let d = e.dim();
    let mut p = Prepared {
        k: 0,
        basis: Mat::zeros(0, 0),
        ridge: 0.0,
        rank: e.rank,
        dim: d,
        trace: e.trace,
        norm: 0.0,
    };
    if e.rank == 0 {
        return Err(Error::invalid(format!(
            "layer {name:?} has zero variance (all rows equal): alignment is undefined"
        )));
    }
    match opts.method {
        Method::Procrustes => {}
        Method::Shape => {
            let a = opts.alpha;
            if !(0.0..=1.0).contains(&a) {
                return Err(Error::invalid(format!("alpha must be in [0, 1], got {a}")));
            }
            if e.n < 2 {
                return Err(Error::invalid(format!(
                    "layer {name:?}: a covariance needs at least 2 rows, got {}",
                    e.n
                )));
            }
            let nm1 = (e.n - 1) as f64;
            let floor = e.tol / nm1;
            let dv: Vec<f64> = e
                .values
                .iter()
                .map(|&l| a + (1.0 - a) / (l / nm1).max(floor).sqrt())
                .collect();
            p.norm = e
                .positive_values()
                .iter()
                .zip(&dv)
                .map(|(l, w)| l / nm1 * w * w)
                .sum();
            if a < 1.0 {
                let v = e.vectors.as_ref();
                p.basis = Mat::from_fn(d, d, |r, c| v[(r, c)] * dv[c]);
            }
        }
        Method::Cca => {
            if !(opts.ridge_eps.is_finite() && opts.ridge_eps >= 0.0) {
                return Err(Error::invalid(format!(
                    "ridge must be a finite number >= 0, got {}",
                    opts.ridge_eps
                )));
            }
            let singular = e.n <= d || e.rank < d;
            if singular && opts.ridge_eps == 0.0 {
                return Err(Error::invalid(format!(
                    "layer {name:?} has a singular covariance (rank {} of width {d}, n = {}): \
                     CCA without a ridge is undefined there; use a ridge > 0 (default 1e-4)",
                    e.rank, e.n
                )));
            }
            let ridge = if singular {
                opts.ridge_eps * e.trace / d as f64
            } else {
                0.0
            };
            let w: Vec<f64> = e.values.iter().map(|&l| 1.0 / (l + ridge).sqrt()).collect();
            if !w.iter().all(|x| x.is_finite()) {
                // Only when the ridge is smaller than the round-off of the eigenvalues.
                return Err(Error::invalid(format!(
                    "CCA ridge {ridge:.3e} of layer {name:?} is too small: C + ridge·I is not \
                     positive definite in floating point (smallest eigenvalue {:.3e}); \
                     use a larger ridge",
                    e.values.last().copied().unwrap_or(f64::NAN)
                )));
            }
            let v = e.vectors.as_ref();
            let vw = Mat::from_fn(d, d, |r, c| v[(r, c)] * w[c]);
            p.basis = &vw * v.transpose();
            p.ridge = ridge;
        }
        Method::Subspace(_) | Method::Svcca | Method::Pwcca => {
            let k = match opts.k {
                KSpec::Fixed(k) => {
                    if k == 0 {
                        return Err(Error::invalid("k must be at least 1"));
                    }
                    if k > e.rank {
                        return Err(Error::invalid(format!(
                            "k = {k} exceeds the numerical rank {} of layer {name:?} \
                             (width {d}, n = {}; rank = #eigenvalues of C above \
                             λ_max·max(n,d)·eps = {:.3e})",
                            e.rank, e.n, e.tol
                        )));
                    }
                    k
                }
                KSpec::Variance(f) => {
                    if !(f > 0.0 && f <= 1.0) {
                        return Err(Error::invalid(format!(
                            "variance fraction must be in (0, 1], got {f}"
                        )));
                    }
                    variance_k(e, f)
                }
            };
            let v = e.vectors.as_ref();
            p.basis = if opts.method == Method::Subspace(Space::Features) {
                v.subcols(0, k).to_owned()
            } else {
                Mat::from_fn(d, k, |r, c| v[(r, c)] / e.values[c].sqrt())
            };
            p.k = k;
        }
    }
    Ok(p)
}

fn angles_summary(cos: &[f64]) -> (f64, f64) {
    let m = cos.len().max(1) as f64;
    let overlap = cos.iter().map(|c| c * c).sum::<f64>() / m;
    let g = cos
        .iter()
        .map(|&c| {
            let t = c.min(1.0).acos();
            t * t
        })
        .sum::<f64>()
        .sqrt();
    (overlap, g)
}

fn svd_err(e: impl std::fmt::Debug) -> Error {
    Error::invalid(format!("SVD failed: {e:?}"))
}

/// PWCCA weights `α_c ∝ Σ_a |(G)_{a c}|`, `G = V_i[:, :k] Σ_i P[:, :m]` (`d × m`).
fn pwcca_value(e: &LayerEig, k: usize, p: MatRef<'_, f64>, rho: &[f64]) -> f64 {
    let m = rho.len();
    let d = e.dim();
    let v = e.vectors.as_ref();
    let vs = Mat::from_fn(d, k, |r, c| v[(r, c)] * e.values[c].sqrt());
    let g = &vs * p.subcols(0, m);
    let alpha: Vec<f64> = (0..m)
        .map(|c| (0..d).map(|a| g[(a, c)].abs()).sum())
        .collect();
    let total: f64 = alpha.iter().sum();
    alpha.iter().zip(rho).map(|(a, r)| a * r).sum::<f64>() / total
}

/// Alignment of one pair from `C_ij` (`d_i × d_j`) and the two prepared layers.
pub fn align_pair(
    c_ij: MatRef<'_, f64>,
    ei: &LayerEig,
    ej: &LayerEig,
    pi: &Prepared,
    pj: &Prepared,
    opts: &AlignOptions,
) -> Result<PairAlignment> {
    if c_ij.nrows() != pi.dim || c_ij.ncols() != pj.dim {
        return Err(Error::Mismatch(format!(
            "cross block is {}×{}, layers have widths {} and {}",
            c_ij.nrows(),
            c_ij.ncols(),
            pi.dim,
            pj.dim
        )));
    }
    let out = match opts.method {
        Method::Subspace(space) => {
            let m = match space {
                Space::Samples => pi.basis.transpose() * c_ij * &pj.basis,
                Space::Features => {
                    if pi.dim != pj.dim {
                        return Err(Error::invalid(format!(
                            "space='features' needs equal widths, got {} and {}",
                            pi.dim, pj.dim
                        )));
                    }
                    pi.basis.transpose() * &pj.basis
                }
            };
            let cos = m.singular_values().map_err(svd_err)?;
            let (ov, g) = angles_summary(&cos);
            PairAlignment::symmetric(ov, cos, vec![g])
        }
        Method::Svcca | Method::Pwcca => {
            let m = pi.basis.transpose() * c_ij * &pj.basis;
            if opts.method == Method::Svcca {
                let cos = m.singular_values().map_err(svd_err)?;
                let mean = cos.iter().sum::<f64>() / cos.len() as f64;
                let (_, g) = angles_summary(&cos);
                PairAlignment::symmetric(mean, cos, vec![g])
            } else {
                let svd = m.thin_svd().map_err(svd_err)?;
                let s = svd.S().column_vector();
                let rho: Vec<f64> = (0..s.nrows()).map(|i| s[i]).collect();
                let mean = rho.iter().sum::<f64>() / rho.len() as f64;
                let value = pwcca_value(ei, pi.k, svd.U(), &rho);
                let value_t = pwcca_value(ej, pj.k, svd.V(), &rho);
                PairAlignment {
                    value,
                    value_t,
                    cosines: rho,
                    extras: vec![mean],
                }
            }
        }
        Method::Cca => {
            let t = &pi.basis * c_ij * &pj.basis;
            let rho = t.singular_values().map_err(svd_err)?;
            let m = pi.dim.min(pj.dim) as f64;
            let r2 = rho.iter().map(|r| r * r).sum::<f64>() / m;
            PairAlignment::symmetric(r2, rho, vec![])
        }
        Method::Shape => {
            let nm1 = (ei.n.max(2) - 1) as f64;
            // ‖Z_i S_ij Z_j‖_* = ‖D_i V_iᵀ S_ij V_j D_j‖_* (V orthogonal); α = 1: ‖S_ij‖_*
            let sv = if pi.basis.nrows() == 0 {
                c_ij.singular_values().map_err(svd_err)?
            } else {
                (pi.basis.transpose() * c_ij * &pj.basis)
                    .singular_values()
                    .map_err(svd_err)?
            };
            let norm = (pi.norm * pj.norm).sqrt();
            let cos: Vec<f64> = sv.iter().map(|s| s / nm1 / norm).collect();
            let sim = cos.iter().sum::<f64>();
            let nuc = sv.iter().sum::<f64>() / nm1;
            // round-off can take 1 − cos or the squared distance just below 0 for layers
            // equal up to rotation: those are 0
            let euclid = (pi.norm + pj.norm - 2.0 * nuc).max(0.0).sqrt();
            let theta = sim.min(1.0).acos();
            PairAlignment::symmetric(theta, cos, vec![euclid, sim])
        }
        Method::Procrustes => {
            let sv = c_ij.singular_values().map_err(svd_err)?;
            let norm = (pi.trace * pj.trace).sqrt();
            let cos: Vec<f64> = sv.iter().map(|s| s / norm).collect();
            let sim = cos.iter().sum::<f64>();
            PairAlignment::symmetric(sim, cos, vec![sim.min(1.0).acos()])
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measures::spectrum::layer_eig;
    use crate::monitor::NoMonitor;

    /// Deterministic pseudo-random data (n × d), row-major, plus a per-column offset.
    fn data(n: usize, d: usize, seed: u64, offset: f64) -> Mat<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        Mat::from_fn(n, d, |_, c| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) + offset * (c as f64 + 1.0)
        })
    }

    fn centred(x: &Mat<f64>) -> Mat<f64> {
        let (n, d) = (x.nrows(), x.ncols());
        let mean: Vec<f64> = (0..d)
            .map(|c| (0..n).map(|r| x[(r, c)]).sum::<f64>() / n as f64)
            .collect();
        Mat::from_fn(n, d, |r, c| x[(r, c)] - mean[c])
    }

    type Setup = (Vec<Mat<f64>>, Vec<Vec<Mat<f64>>>, Vec<LayerEig>);

    /// `n` rows of layers `(width, seed, offset)` ([`data`]): centred, their cross blocks and
    /// their eigendecompositions.
    fn setup(n: usize, layers: &[(usize, u64, f64)]) -> Setup {
        let xs: Vec<Mat<f64>> = layers.iter().map(|&(d, s, o)| data(n, d, s, o)).collect();
        let cs: Vec<Mat<f64>> = xs.iter().map(centred).collect();
        let blocks: Vec<Vec<Mat<f64>>> = cs
            .iter()
            .map(|a| cs.iter().map(|b| a.transpose() * b).collect())
            .collect();
        let eigs = (0..xs.len())
            .map(|i| layer_eig(blocks[i][i].as_ref(), n).unwrap())
            .collect();
        (cs, blocks, eigs)
    }

    fn run(
        blocks: &[Vec<Mat<f64>>],
        eigs: &[LayerEig],
        opts: AlignOptions,
        symmetric: bool,
    ) -> Result<AlignmentMatrix> {
        let names: Vec<String> = (0..eigs.len()).map(|i| format!("l{i}")).collect();
        let idx: Vec<usize> = (0..eigs.len()).collect();
        align_matrix(
            eigs,
            &names,
            &idx,
            &idx,
            |i, j| Ok(blocks[i][j].as_ref()),
            symmetric,
            &opts,
            &NoMonitor,
        )
    }

    fn rank(facts: &[LayerFacts]) -> Vec<usize> {
        facts.iter().map(|f| f.rank).collect()
    }

    fn opts(method: Method, k: usize) -> AlignOptions {
        AlignOptions {
            method,
            k: KSpec::Fixed(k),
            ridge_eps: 1e-4,
            alpha: 1.0,
        }
    }

    /// Explicit top-k left singular vectors of centred data.
    fn left_sv(x: &Mat<f64>, k: usize) -> Mat<f64> {
        let svd = x.thin_svd().unwrap();
        svd.U().subcols(0, k).to_owned()
    }

    #[test]
    fn samples_subspace_matches_explicit_svd() {
        let (cs, blocks, eigs) = setup(40, &[(5, 1, 100.0), (7, 2, 0.0)]);
        let k = 3;
        let al = run(
            &blocks,
            &eigs,
            opts(Method::Subspace(Space::Samples), k),
            true,
        )
        .unwrap();
        let m = left_sv(&cs[0], k).transpose() * left_sv(&cs[1], k);
        let want = m.singular_values().unwrap();
        let got = &al.cosines[1];
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        let ov = want.iter().map(|c| c * c).sum::<f64>() / k as f64;
        assert!((al.values[1] - ov).abs() < 1e-9);
        assert!((al.values[2] - ov).abs() < 1e-9);
        assert!((al.values[0] - 1.0).abs() < 1e-9);
        // SVCCA correlations equal the sample-space principal cosines.
        let sv = run(&blocks, &eigs, opts(Method::Svcca, k), false).unwrap();
        for (a, b) in sv.cosines[1].iter().zip(got) {
            assert!((a - b).abs() < 1e-12);
        }
        // PWCCA mirror = recomputation on the transposed pair.
        let pw = run(&blocks, &eigs, opts(Method::Pwcca, k), true).unwrap();
        let pw2 = run(&blocks, &eigs, opts(Method::Pwcca, k), false).unwrap();
        assert!((pw.values[2] - pw2.values[2]).abs() < 1e-12);
        assert!((pw.values[1] - pw2.values[1]).abs() < 1e-12);
    }

    #[test]
    fn features_and_errors() {
        let (_, blocks, eigs) = setup(30, &[(4, 3, 1.0), (4, 4, 1.0), (6, 5, 1.0)]);
        let f = opts(Method::Subspace(Space::Features), 2);
        assert!(matches!(
            run(&blocks, &eigs, f, true),
            Err(Error::InvalidArgument(_))
        ));
        let two = &eigs[..2];
        let al = run(&blocks, two, f, true).unwrap();
        let m = eigs[0].vectors.subcols(0, 2).transpose() * eigs[1].vectors.subcols(0, 2);
        let want = m.singular_values().unwrap();
        assert!((al.cosines[1][0] - want[0]).abs() < 1e-12);
        // k > rank names the layer.
        let e = run(
            &blocks,
            &eigs,
            opts(Method::Subspace(Space::Samples), 5),
            true,
        );
        match e {
            Err(Error::InvalidArgument(msg)) => {
                assert!(msg.contains("\"l0\"") && msg.contains("rank 4"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn procrustes_and_cca_full_rank() {
        let (cs, blocks, eigs) = setup(50, &[(3, 7, 10.0), (4, 8, 0.0)]);
        let pr = run(&blocks, &eigs, opts(Method::Procrustes, 1), true).unwrap();
        let nuc: f64 = blocks[0][1].singular_values().unwrap().iter().sum();
        let fro = |m: &Mat<f64>| m.norm_l2();
        let want = nuc / (fro(&cs[0]) * fro(&cs[1]));
        assert!((pr.values[1] - want).abs() < 1e-12);
        assert!((pr.values[0] - 1.0).abs() < 1e-12);
        // CCA: canonical correlations = singular values of Q_iᵀ Q_j (full rank, n > d).
        let cc = run(&blocks, &eigs, opts(Method::Cca, 1), false).unwrap();
        assert!(cc.rows.iter().all(|f| f.ridge == 0.0));
        let q = |x: &Mat<f64>| x.thin_svd().unwrap().U().to_owned();
        let rho = (q(&cs[0]).transpose() * q(&cs[1]))
            .singular_values()
            .unwrap();
        let r2 = rho.iter().map(|r| r * r).sum::<f64>() / 3.0;
        assert!((cc.values[1] - r2).abs() < 1e-10);
        assert!((cc.values[2] - r2).abs() < 1e-10);
        assert_eq!((rank(&cc.rows), rank(&cc.cols)), (vec![3, 4], vec![3, 4]));
        // No ridge is needed at full rank, so ridge 0 is allowed and changes nothing.
        let none = AlignOptions {
            ridge_eps: 0.0,
            ..opts(Method::Cca, 1)
        };
        assert_eq!(run(&blocks, &eigs, none, false).unwrap().values, cc.values);
    }

    #[test]
    fn shape_metric_ends_at_procrustes_and_cca() {
        let (cs, blocks, eigs) = setup(60, &[(3, 17, 10.0), (4, 18, 0.0), (3, 19, 1.0)]);
        let shape = |alpha: f64| {
            let o = AlignOptions {
                alpha,
                ..opts(Method::Shape, 1)
            };
            run(&blocks, &eigs, o, true).unwrap()
        };
        // α = 1: the Procrustes angle; the Euclidean distance of the aligned data per
        // sqrt(n − 1) rows
        let one = shape(1.0);
        let pr = run(&blocks, &eigs, opts(Method::Procrustes, 1), true).unwrap();
        assert!((one.values[1] - pr.extras[0].1[1]).abs() < 1e-12);
        let nuc: f64 = blocks[0][1].singular_values().unwrap().iter().sum();
        let (f0, f1) = (cs[0].squared_norm_l2(), cs[1].squared_norm_l2());
        let e = ((f0 + f1 - 2.0 * nuc) / 59.0).sqrt();
        assert!((one.extras[0].1[1] - e).abs() < 1e-10);
        // α = 0: arccos(Σρ / sqrt(d_i d_j)), ρ the canonical correlations
        let zero = shape(0.0);
        let q = |x: &Mat<f64>| x.thin_svd().unwrap().U().to_owned();
        let rho: f64 = (q(&cs[0]).transpose() * q(&cs[1]))
            .singular_values()
            .unwrap()
            .iter()
            .sum();
        assert!((zero.values[1] - (rho / 12f64.sqrt()).acos()).abs() < 1e-10);
        // a metric: 0 on the diagonal, symmetric, the triangle inequality
        for t in [0.0, 0.3, 0.7, 1.0] {
            let r = shape(t);
            let v = |i: usize, j: usize| r.values[i * 3 + j];
            assert_eq!((v(0, 0), v(1, 1), v(2, 2)), (0.0, 0.0, 0.0));
            assert_eq!(v(0, 1), v(1, 0));
            assert!(v(0, 2) <= v(0, 1) + v(1, 2) + 1e-12);
        }
        let bad = AlignOptions {
            alpha: 1.5,
            ..opts(Method::Shape, 1)
        };
        assert!(run(&blocks, &eigs, bad, true).is_err());
    }

    #[test]
    fn cca_ridge_when_n_le_d() {
        let (_, blocks, eigs) = setup(5, &[(8, 9, 0.0), (8, 10, 0.0)]);
        let cc = run(&blocks, &eigs, opts(Method::Cca, 1), true).unwrap();
        let want = 1e-4 * eigs[0].trace / 8.0;
        assert!((cc.rows[0].ridge - want).abs() < 1e-15 * want.max(1.0));
        assert!(cc.values[1].is_finite() && cc.values[1] < 1.0);
        assert_eq!(rank(&cc.rows), vec![4, 4]); // 5 centred rows: rank 4 of width 8
                                                // Without a ridge a singular covariance is an error naming the layer and its rank.
        let none = AlignOptions {
            ridge_eps: 0.0,
            ..opts(Method::Cca, 1)
        };
        match run(&blocks, &eigs, none, true) {
            Err(Error::InvalidArgument(msg)) => {
                assert!(
                    msg.contains("rank 4 of width 8") && msg.contains("ridge > 0"),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A ridge below the eigenvalues' round-off is a clear error, not a NaN.
        let tiny = AlignOptions {
            ridge_eps: 1e-300,
            ..opts(Method::Cca, 1)
        };
        match run(&blocks, &eigs, tiny, true) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("too small"), "{msg}"),
            Ok(r) => assert!(r.values.iter().all(|v| v.is_finite())),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn k_options_and_default() {
        assert_eq!(
            KSpec::from_options(None, None).unwrap(),
            KSpec::Fixed(DEFAULT_K)
        );
        assert_eq!(KSpec::from_options(Some(3), None).unwrap(), KSpec::Fixed(3));
        assert_eq!(
            KSpec::from_options(None, Some(0.99)).unwrap(),
            KSpec::Variance(0.99)
        );
        assert!(KSpec::from_options(Some(3), Some(0.99)).is_err());
    }
}
