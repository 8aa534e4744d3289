//! HSIC and the CKA ratio: the one home of these formulas. Every CKA of layerscope ends
//! here — linear from the moment engine's pair statistics ([`super::cka::linear`]), RBF on
//! a sample ([`super::cka::rbf`]) and the minibatch estimator ([`super::cka::minibatch`]).
//!
//! For two `m × m` kernel matrices `K`, `L` of the same rows (`H = I − 11ᵀ/m`):
//!
//! * biased HSIC (Gretton, Bousquet, Smola & Schölkopf 2005):
//!   `HSIC₀(K, L) = tr(K H L H) / (m − 1)²`;
//! * unbiased HSIC (Song, Smola, Gretton, Bedo & Borgwardt 2012, JMLR 13, eq. 5), with
//!   `K̃ = K − diag(K)`, `L̃` likewise, `m ≥ 4`:
//!   `HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − 2/(m−2)·1ᵀK̃L̃1] / (m(m−3))`;
//! * CKA (Kornblith, Norouzi, Lee & Hinton 2019, ICML):
//!   `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`, the same estimator in numerator and
//!   denominator. The debiased value can be negative and is never clamped.
//!
//! **The NaN rule** ([`cka_ratio`]): a CKA is NaN — never a made-up number — when either
//! self-HSIC is not positive (a constant layer, or a debiased self-HSIC ≤ 0 on very few
//! rows) or is NaN (the debiased estimator on fewer than 4 rows); a layer with itself is
//! exactly 1 whenever its self-HSIC is positive.
use crate::error::{Error, Result};
use rayon::prelude::*;

/// `Σ x_i y_i` with eight partial sums (vectorisable; f64; the same order on every run).
pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut xi = x.chunks_exact(8);
    let mut yi = y.chunks_exact(8);
    for (a, b) in (&mut xi).zip(&mut yi) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let tail: f64 = xi
        .remainder()
        .iter()
        .zip(yi.remainder())
        .map(|(p, q)| p * q)
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `Σ x` with eight partial sums (f64).
fn sum(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f64>() + it.remainder().iter().sum::<f64>()
}

/// `m(m−3) · HSIC₁` from the four sums the unbiased estimator needs:
/// `tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − 2/(m−2)·1ᵀK̃L̃1` (Song et al. 2012, eq. 5,
/// before its division by `m(m−3)`). NaN when `m < 4` (the estimator divides by `m − 3`).
///
/// The moment engine gives these sums without any Gram (see [`super::cka::linear`]); a
/// prepared Gram gives them directly ([`hsic`]).
pub fn unbiased_scaled(tr_kl: f64, sum_k: f64, sum_l: f64, kl1: f64, m: u64) -> f64 {
    if m < 4 {
        return f64::NAN;
    }
    let mf = m as f64;
    tr_kl + sum_k * sum_l / ((mf - 1.0) * (mf - 2.0)) - 2.0 / (mf - 2.0) * kl1
}

/// The CKA ratio `hxy / sqrt(hxx · hyy)` under the NaN rule of the module docs; `same`:
/// the two kernels are those of one layer (the diagonal of a within-source table), whose
/// CKA is exactly 1 when defined.
pub fn cka_ratio(hxy: f64, hxx: f64, hyy: f64, same: bool) -> f64 {
    if !(hxx > 0.0 && hyy > 0.0) {
        return f64::NAN;
    }
    if same {
        return 1.0;
    }
    // sqrt(h·h) == h exactly (two identical layers give exactly 1); the product of square
    // roots when h·h would over- or underflow.
    let p = hxx * hyy;
    let den = if p.is_normal() {
        p.sqrt()
    } else {
        hxx.sqrt() * hyy.sqrt()
    };
    hxy / den
}

/// Which HSIC a prepared Gram serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimator {
    /// `HSIC₀` (Gretton et al. 2005).
    Biased,
    /// `HSIC₁` (Song et al. 2012), `m ≥ 4`.
    Unbiased,
}

impl Estimator {
    /// `Unbiased` when `unbiased`.
    pub fn from_unbiased(unbiased: bool) -> Estimator {
        if unbiased {
            Estimator::Unbiased
        } else {
            Estimator::Biased
        }
    }
    /// The fewest rows the estimator is defined on.
    pub fn min_rows(self) -> usize {
        match self {
            Estimator::Biased => 2,
            Estimator::Unbiased => 4,
        }
    }
}

/// One kernel matrix prepared for the HSIC of every pair it is in (prepared once per layer).
#[derive(Debug)]
pub struct Gram {
    /// Biased: `HKH` (row-major `m × m`); unbiased: `K̃` (K with a zero diagonal).
    pub(crate) g: Vec<f64>,
    pub(crate) m: usize,
    pub(crate) estimator: Estimator,
    /// Unbiased only: row sums of `K̃` and their total `1ᵀK̃1`.
    pub(crate) rows: Vec<f64>,
    pub(crate) total: f64,
}

impl Gram {
    /// Prepare the symmetric row-major `m × m` kernel matrix `k` (taken over: no copy).
    pub fn prepare(mut k: Vec<f64>, m: usize, estimator: Estimator) -> Result<Gram> {
        if Some(k.len()) != m.checked_mul(m) {
            return Err(Error::Mismatch(format!(
                "a kernel matrix of {} values is not {m} × {m}",
                k.len()
            )));
        }
        if m < estimator.min_rows() {
            return Err(Error::invalid(format!(
                "the {} HSIC needs at least {} rows, got {m}",
                if estimator == Estimator::Unbiased {
                    "unbiased"
                } else {
                    "biased"
                },
                estimator.min_rows()
            )));
        }
        match estimator {
            Estimator::Unbiased => {
                for i in 0..m {
                    k[i * m + i] = 0.0;
                }
                let rows: Vec<f64> = k.par_chunks(m).map(sum).collect();
                let total = sum(&rows);
                Ok(Gram {
                    g: k,
                    m,
                    estimator,
                    rows,
                    total,
                })
            }
            Estimator::Biased => {
                // HKH: subtract row means and column means (equal: K is symmetric), add the
                // grand mean.
                let rm: Vec<f64> = k.par_chunks(m).map(|r| sum(r) / m as f64).collect();
                let gm = sum(&rm) / m as f64;
                k.par_chunks_mut(m).enumerate().for_each(|(i, r)| {
                    for (j, v) in r.iter_mut().enumerate() {
                        *v = *v - rm[i] - rm[j] + gm;
                    }
                });
                Ok(Gram {
                    g: k,
                    m,
                    estimator,
                    rows: Vec::new(),
                    total: 0.0,
                })
            }
        }
    }
}

/// `tr(AB) = Σ_ij A_ij B_ij` of two symmetric matrices: the diagonal plus twice the strict
/// upper triangle (half the memory traffic of the full sum), summed row by row in order.
fn trace_sym(a: &[f64], b: &[f64], m: usize) -> f64 {
    let mut tr = 0.0;
    for i in 0..m {
        let (p, q) = (&a[i * m..(i + 1) * m], &b[i * m..(i + 1) * m]);
        tr += p[i] * q[i] + 2.0 * dot(&p[i + 1..], &q[i + 1..]);
    }
    tr
}

/// The HSIC of two prepared Grams (same rows, same estimator): `HSIC₀` or `HSIC₁` as in the
/// module docs. Sequential (and so the same value on every run): callers run pairs in
/// parallel.
pub fn hsic(a: &Gram, b: &Gram) -> Result<f64> {
    if a.m != b.m || a.estimator != b.estimator {
        return Err(Error::Mismatch(format!(
            "HSIC of Grams of {} and {} rows ({:?} and {:?})",
            a.m, b.m, a.estimator, b.estimator
        )));
    }
    let m = a.m;
    let tr = trace_sym(&a.g, &b.g, m);
    let mf = m as f64;
    Ok(match a.estimator {
        Estimator::Biased => tr / ((mf - 1.0) * (mf - 1.0)),
        Estimator::Unbiased => {
            unbiased_scaled(tr, a.total, b.total, dot(&a.rows, &b.rows), m as u64)
                / (mf * (mf - 3.0))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A symmetric kernel `XXᵀ` of a small `m × d` matrix (with an offset, so `H` matters).
    fn kernel(m: usize, d: usize, seed: usize) -> Vec<f64> {
        let x: Vec<f64> = (0..m * d)
            .map(|i| ((i * 7919 + seed * 104729) % 211) as f64 / 31.0 + 5.0)
            .collect();
        let mut k = vec![0.0; m * m];
        for a in 0..m {
            for b in 0..m {
                k[a * m + b] = (0..d).map(|f| x[a * d + f] * x[b * d + f]).sum();
            }
        }
        k
    }

    /// Biased HSIC straight from `tr(KHLH)/(m−1)²` with explicit matrices.
    fn naive_biased(k: &[f64], l: &[f64], m: usize) -> f64 {
        let h = |i: usize, j: usize| f64::from(u8::from(i == j)) - 1.0 / m as f64;
        let mul = |p: &dyn Fn(usize, usize) -> f64, q: &dyn Fn(usize, usize) -> f64| {
            let mut r = vec![0.0; m * m];
            for i in 0..m {
                for j in 0..m {
                    r[i * m + j] = (0..m).map(|t| p(i, t) * q(t, j)).sum();
                }
            }
            r
        };
        let kh = mul(&|i, j| k[i * m + j], &h);
        let lh = mul(&|i, j| l[i * m + j], &h);
        let khlh = mul(&|i, j| kh[i * m + j], &|i, j| lh[i * m + j]);
        (0..m).map(|i| khlh[i * m + i]).sum::<f64>() / ((m - 1) * (m - 1)) as f64
    }

    /// Unbiased HSIC straight from eq. 5 with explicit `K̃`, `L̃`.
    fn naive_unbiased(k: &[f64], l: &[f64], m: usize) -> f64 {
        let t = |v: &[f64]| {
            let mut w = v.to_vec();
            for i in 0..m {
                w[i * m + i] = 0.0;
            }
            w
        };
        let (kt, lt) = (t(k), t(l));
        let tr: f64 = kt.iter().zip(&lt).map(|(a, b)| a * b).sum();
        let sk: f64 = kt.iter().sum();
        let sl: f64 = lt.iter().sum();
        let mut kl1 = 0.0;
        for i in 0..m {
            for j in 0..m {
                kl1 += (0..m).map(|t| kt[i * m + t] * lt[t * m + j]).sum::<f64>();
            }
        }
        let mf = m as f64;
        (tr + sk * sl / ((mf - 1.0) * (mf - 2.0)) - 2.0 / (mf - 2.0) * kl1) / (mf * (mf - 3.0))
    }

    #[test]
    fn hsic_matches_the_formulas() {
        for m in [4usize, 5, 9, 17] {
            let (k, l) = (kernel(m, 3, 1), kernel(m, 5, 2));
            for (est, naive) in [
                (
                    Estimator::Biased,
                    naive_biased as fn(&[f64], &[f64], usize) -> f64,
                ),
                (Estimator::Unbiased, naive_unbiased),
            ] {
                let a = Gram::prepare(k.clone(), m, est).unwrap();
                let b = Gram::prepare(l.clone(), m, est).unwrap();
                let (got, want) = (hsic(&a, &b).unwrap(), naive(&k, &l, m));
                assert!(
                    (got - want).abs() <= 1e-10 * want.abs().max(1.0),
                    "{m} {est:?}"
                );
            }
        }
    }

    #[test]
    fn ratio_nan_rule_and_errors() {
        assert_eq!(cka_ratio(2.0, 2.0, 2.0, false), 1.0);
        assert_eq!(cka_ratio(0.3, 2.0, 2.0, true), 1.0);
        assert!(cka_ratio(0.0, 0.0, 2.0, false).is_nan());
        assert!(cka_ratio(1.0, -1.0, 2.0, true).is_nan());
        assert!(cka_ratio(1.0, f64::NAN, 2.0, false).is_nan());
        assert_eq!(cka_ratio(-0.5, 1.0, 4.0, false), -0.25);
        // no overflow or underflow in the denominator
        for h in [1e300, 1e-300, 3e-320] {
            assert!((cka_ratio(h, h, h, false) - 1.0).abs() < 1e-15, "{h}");
        }
        assert!(unbiased_scaled(1.0, 1.0, 1.0, 1.0, 3).is_nan());
        let k = kernel(4, 2, 0);
        assert!(Gram::prepare(k.clone(), 3, Estimator::Biased).is_err());
        assert!(Gram::prepare(kernel(3, 2, 0), 3, Estimator::Unbiased).is_err());
        let a = Gram::prepare(k, 4, Estimator::Biased).unwrap();
        let b = Gram::prepare(kernel(4, 2, 1), 4, Estimator::Unbiased).unwrap();
        assert!(hsic(&a, &b).is_err());
    }
}
