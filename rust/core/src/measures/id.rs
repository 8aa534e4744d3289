//! Intrinsic-dimension estimators on a kNN graph ([`crate::engine::neighbors`]).
//!
//! Inputs are per-point sorted neighbour distances `r_1 ≤ r_2 ≤ … ≤ r_k` (self excluded).
//! Definitions follow the reference implementations exactly on duplicate-free data:
//!
//! * **TwoNN** (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140), as
//!   `skdim.id.TwoNN`: `μ_i = r_2/r_1`; non-finite `μ` dropped; `N` = number left;
//!   `n_keep = ⌊N (1 − discard_fraction)⌋`; the `n_keep` smallest `μ` sorted ascending,
//!   `F_i = i / N` (i = 1..n_keep). `"linear"`: least-squares slope through the origin of
//!   `y = −log(1 − F_i)` on `x = log μ_(i)`, `d = Σxy / Σx²`. `"mle"`: the censored MLE
//!   `d = (n_keep − 1) / (Σ_{i≤n_keep} log μ_(i) + (N − n_keep) log μ_(n_keep))`
//!   (= `(N − 1)/Σ log μ` with no discarding).
//! * **MLE** (Levina & Bickel 2004, NeurIPS), as `skdim.id.MLE`: per point
//!   `m̂_i = (k − 1) / Σ_{j=1}^{k} log(r_k / r_j)`; pooled by the harmonic mean
//!   `1 / mean(1/m̂_i)` (MacKay & Ghahramani 2005; skdim's default `comb="mle"`), or the
//!   arithmetic mean (Levina–Bickel's original) or the median.
//! * **GRIDE** (Denti, Doimo, Laio & Mira 2022, Sci. Rep. 12:20005), as `skdim.id.GRIDE`:
//!   `log μ_i = log(r_{n2}/r_{n1})`; points with non-finite or zero `log μ` dropped; then
//!   `μ ≥ q50 + 20 (q95 − q50)` dropped (numpy linear percentiles); `d` is the root of the
//!   score `(N−1)/d + (n2−n1−1) Σ log μ / (1 − e^{−d log μ}) − (n2−1) Σ log μ` (decreasing in
//!   `d`; bisection to machine precision), and its standard error is
//!   `1/sqrt(N/d² + (n2−n1−1) Σ (log μ / (2 sinh(d log μ / 2)))²)` (observed Fisher information).
//!
//! Bootstrap: the per-point statistics (`μ_i`, `m̂_i`, `log μ_i`) are resampled with
//! replacement (seeded ChaCha8), keeping the kNN graph of the full sample; percentile CIs.
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// TwoNN fitting variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwoNnMethod {
    Linear,
    Mle,
}

/// Pooling of Levina–Bickel pointwise estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Harmonic,
    Mean,
    Median,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self> {
        // "mle": another name of the harmonic mean (the MLE of Levina & Bickel's pooling).
        let s = if s == "mle" { "harmonic" } else { s };
        let pools = [
            ("harmonic", Pool::Harmonic),
            ("mean", Pool::Mean),
            ("median", Pool::Median),
        ];
        crate::error::choice("pool", s, &pools)
    }
}

/// TwoNN from the ratios `μ_i = r2_i / r1_i` (non-finite values are dropped as skdim does).
pub fn twonn_from_mu(mu: &[f64], discard_fraction: f64, method: TwoNnMethod) -> Result<f64> {
    if !(0.0..1.0).contains(&discard_fraction) {
        return Err(Error::invalid(format!(
            "discard_fraction must be in [0, 1), got {discard_fraction}"
        )));
    }
    let mut mu: Vec<f64> = mu.iter().copied().filter(|v| v.is_finite()).collect();
    let n = mu.len();
    let n_keep = (n as f64 * (1.0 - discard_fraction)) as usize;
    if n_keep < 2 {
        return Err(Error::invalid(
            "fewer than 2 points left to estimate the dimension",
        ));
    }
    mu.sort_unstable_by(f64::total_cmp);
    mu.truncate(n_keep);
    match method {
        TwoNnMethod::Mle => {
            let s: f64 = mu.iter().map(|v| v.ln()).sum();
            let last = mu[n_keep - 1].ln();
            Ok((n_keep as f64 - 1.0) / (s + (n - n_keep) as f64 * last))
        }
        TwoNnMethod::Linear => {
            if n_keep == n {
                return Err(Error::invalid(
                    "the linear TwoNN fit needs discard_fraction > 0 (F = 1 at the largest μ)",
                ));
            }
            let (mut sxy, mut sxx) = (0.0f64, 0.0f64);
            for (i, v) in mu.iter().enumerate() {
                let x = v.ln();
                let f = (i + 1) as f64 / n as f64;
                let y = -(1.0 - f).ln();
                sxy += x * y;
                sxx += x * x;
            }
            Ok(sxy / sxx)
        }
    }
}

/// Pointwise Levina–Bickel estimates from sorted distances `r_1..r_k` (rows of length k).
pub fn mle_pointwise(dist: &[f64], k: usize) -> Result<Vec<f64>> {
    if k < 2 || !dist.len().is_multiple_of(k) {
        return Err(Error::invalid(format!(
            "MLE needs k ≥ 2 neighbours, got {k}"
        )));
    }
    Ok(dist
        .chunks_exact(k)
        .map(|r| {
            let rk = r[k - 1];
            let s: f64 = r.iter().map(|rj| (rk / rj).ln()).sum();
            (k as f64 - 1.0) / s
        })
        .collect())
}

/// Pool pointwise estimates.
pub fn pool(values: &[f64], pool: Pool) -> f64 {
    let n = values.len() as f64;
    match pool {
        Pool::Harmonic => 1.0 / (values.iter().map(|v| 1.0 / v).sum::<f64>() / n),
        Pool::Mean => values.iter().sum::<f64>() / n,
        Pool::Median => {
            let mut v = values.to_vec();
            v.sort_unstable_by(f64::total_cmp);
            let h = v.len() / 2;
            if v.is_empty() {
                f64::NAN
            } else if v.len() % 2 == 1 {
                v[h]
            } else {
                (v[h - 1] + v[h]) / 2.0
            }
        }
    }
}

/// numpy's default (linear) percentile of a sorted slice, `q` in [0, 100].
fn percentile_sorted(v: &[f64], q: f64) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    let pos = (n - 1) as f64 * q / 100.0;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let t = pos - lo as f64;
    let (a, b) = (v[lo], v[hi]);
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// GRIDE `log μ` values after skdim's filtering (non-finite / non-positive dropped, then
/// `μ ≥ q50 + 20 (q95 − q50)` dropped). Returns `(log_mu, dropped_as_ties)`.
pub fn gride_log_mu(dist: &[f64], k: usize, n1: usize, n2: usize) -> Result<(Vec<f64>, usize)> {
    if !(1 <= n1 && n1 < n2 && n2 <= k) {
        return Err(Error::invalid(format!(
            "GRIDE needs 1 ≤ n1 < n2 ≤ k, got n1={n1}, n2={n2}, k={k}"
        )));
    }
    let raw: Vec<f64> = dist
        .chunks_exact(k)
        .map(|r| (r[n2 - 1] / r[n1 - 1]).ln())
        .collect();
    let lm: Vec<f64> = raw
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let ties = raw.len() - lm.len();
    let mut mus: Vec<f64> = lm.iter().map(|v| v.exp()).collect();
    mus.sort_unstable_by(f64::total_cmp);
    let (q95, q50) = (percentile_sorted(&mus, 95.0), percentile_sorted(&mus, 50.0));
    let thr = 20.0 * (q95 - q50) + q50;
    Ok((lm.into_iter().filter(|v| v.exp() < thr).collect(), ties))
}

/// GRIDE maximum-likelihood estimate and its standard error from filtered `log μ`.
pub fn gride_from_log_mu(log_mu: &[f64], n1: usize, n2: usize) -> Result<(f64, f64)> {
    if !(1 <= n1 && n1 < n2) {
        return Err(Error::invalid(format!(
            "GRIDE needs 1 ≤ n1 < n2, got n1={n1}, n2={n2}"
        )));
    }
    let n = log_mu.len();
    if n < 2 {
        return Err(Error::invalid(
            "fewer than 2 points left to estimate the dimension",
        ));
    }
    let c = (n2 - n1 - 1) as f64;
    let slm: f64 = log_mu.iter().sum();
    let score = |d: f64| -> f64 {
        let mut s = (n as f64 - 1.0) / d - (n2 as f64 - 1.0) * slm;
        if c > 0.0 {
            s += c * log_mu.iter().map(|l| l / -(-d * l).exp_m1()).sum::<f64>();
        }
        s
    };
    let mut hi = 1.0f64;
    while score(hi) > 0.0 {
        hi *= 2.0;
        if !hi.is_finite() {
            return Err(Error::invalid("GRIDE score has no root"));
        }
    }
    let mut lo = 1e-8f64;
    for _ in 0..400 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if score(mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let d = 0.5 * (lo + hi);
    let mut info = n as f64 / (d * d);
    if c > 0.0 {
        info += c * log_mu
            .iter()
            .map(|l| (l / (2.0 * (d * l / 2.0).sinh())).powi(2))
            .sum::<f64>();
    }
    Ok((d, 1.0 / info.sqrt()))
}

/// Percentile bootstrap (2.5 %, 97.5 %) of `stat` over resamples (with replacement) of
/// `values`, `b` resamples from ChaCha8 seeded with `seed`. Failed resamples are skipped.
pub fn bootstrap_ci<F>(values: &[f64], b: usize, seed: u64, stat: F) -> (f64, f64)
where
    F: Fn(&[f64]) -> Result<f64>,
{
    let n = values.len();
    if b == 0 || n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut stats = Vec::with_capacity(b);
    let mut buf = vec![0.0f64; n];
    for _ in 0..b {
        for v in buf.iter_mut() {
            *v = values[rng.random_range(0..n)];
        }
        if let Ok(s) = stat(&buf) {
            if s.is_finite() {
                stats.push(s);
            }
        }
    }
    stats.sort_unstable_by(f64::total_cmp);
    (
        percentile_sorted(&stats, 2.5),
        percentile_sorted(&stats, 97.5),
    )
}

/// Result of one estimator on one layer.
#[derive(Debug, Clone)]
pub struct IdEstimate {
    pub value: f64,
    /// Standard error where the method gives one (GRIDE), else NaN.
    pub error: f64,
    pub ci: (f64, f64),
    /// Points whose statistic entered the estimate.
    pub n_used: usize,
    /// Why the value is NaN, if it is.
    pub reason: Option<String>,
}

/// Estimator selection.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    TwoNn {
        discard_fraction: f64,
        method: TwoNnMethod,
    },
    Mle {
        k: usize,
        pool: Pool,
    },
    Gride {
        n1: usize,
        n2: usize,
    },
}

/// Run one estimator on sorted kNN distances (`dist`: rows of length `k`).
pub fn estimate(
    dist: &[f64],
    k: usize,
    method: Method,
    bootstrap: usize,
    seed: u64,
) -> Result<IdEstimate> {
    if k == 0 || !dist.len().is_multiple_of(k) {
        return Err(Error::invalid("distance rows do not match k"));
    }
    match method {
        Method::TwoNn {
            discard_fraction,
            method,
        } => {
            if k < 2 {
                return Err(Error::invalid("TwoNN needs 2 neighbours"));
            }
            let mu: Vec<f64> = dist.chunks_exact(k).map(|r| r[1] / r[0]).collect();
            if mu.iter().any(|v| !v.is_finite()) {
                let bad = mu.iter().filter(|v| !v.is_finite()).count();
                return Ok(nan(format!("{bad} points have a zero nearest-neighbour distance (duplicates kept): μ = r2/r1 is undefined")));
            }
            let value = twonn_from_mu(&mu, discard_fraction, method)?;
            if !value.is_finite() {
                return Ok(nan(format!(
                    "TwoNN is undefined here ({value}): the kept ratios μ = r2/r1 are all 1 \
                     (every point's two nearest neighbours are equidistant, e.g. a lattice)"
                )));
            }
            let ci = bootstrap_ci(&mu, bootstrap, seed, |s| {
                twonn_from_mu(s, discard_fraction, method)
            });
            Ok(IdEstimate {
                value,
                error: f64::NAN,
                ci,
                n_used: mu.len(),
                reason: None,
            })
        }
        Method::Mle { k: kk, pool: p } => {
            if kk > k {
                return Err(Error::invalid(format!(
                    "MLE k={kk} exceeds the graph's k={k}"
                )));
            }
            let sub: Vec<f64> = dist
                .chunks_exact(k)
                .flat_map(|r| r[..kk].iter().copied())
                .collect();
            if sub.contains(&0.0) {
                return Ok(nan(
                    "zero neighbour distances (duplicates kept): log(r_k/r_j) is infinite".into(),
                ));
            }
            let pw = mle_pointwise(&sub, kk)?;
            let value = pool(&pw, p);
            if !value.is_finite() {
                return Ok(nan(format!(
                    "the pooled MLE is {value}: some points have all {kk} neighbours at the same \
                     distance (pointwise estimate infinite)"
                )));
            }
            let ci = bootstrap_ci(&pw, bootstrap, seed, |s| Ok(pool(s, p)));
            Ok(IdEstimate {
                value,
                error: f64::NAN,
                ci,
                n_used: pw.len(),
                reason: None,
            })
        }
        Method::Gride { n1, n2 } => {
            let (lm, _) = gride_log_mu(dist, k, n1, n2)?;
            let (value, error) = gride_from_log_mu(&lm, n1, n2)?;
            let ci = bootstrap_ci(&lm, bootstrap, seed, |s| {
                gride_from_log_mu(s, n1, n2).map(|r| r.0)
            });
            Ok(IdEstimate {
                value,
                error,
                ci,
                n_used: lm.len(),
                reason: None,
            })
        }
    }
}

fn nan(reason: String) -> IdEstimate {
    IdEstimate {
        value: f64::NAN,
        error: f64::NAN,
        ci: (f64::NAN, f64::NAN),
        n_used: 0,
        reason: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twonn_mle_closed_form() {
        let mu = [1.5, 2.0, 1.2, 3.0, 1.1];
        let d = twonn_from_mu(&mu, 0.0, TwoNnMethod::Mle).unwrap();
        let s: f64 = mu.iter().map(|v: &f64| v.ln()).sum();
        assert!((d - 4.0 / s).abs() < 1e-14);
        assert!(twonn_from_mu(&mu, 0.0, TwoNnMethod::Linear).is_err());
    }

    #[test]
    fn gride_n1_1_n2_2_is_closed_form() {
        let lm = [0.1, 0.3, 0.2, 0.5, 0.05];
        let (d, _) = gride_from_log_mu(&lm, 1, 2).unwrap();
        let s: f64 = lm.iter().sum();
        assert!((d - 4.0 / s).abs() < 1e-9 * d);
    }

    #[test]
    fn undefined_cases_are_nan_with_reason_or_errors() {
        // every point's two nearest neighbours equidistant (a lattice): μ = 1 everywhere
        let lattice: Vec<f64> = (0..40).flat_map(|_| [1.0, 1.0, 2.0]).collect();
        let m = Method::TwoNn {
            discard_fraction: 0.0,
            method: TwoNnMethod::Mle,
        };
        let r = estimate(&lattice, 3, m, 0, 0).unwrap();
        assert!(r.value.is_nan() && r.reason.is_some());
        // zero distances (duplicates kept)
        let dup: Vec<f64> = (0..40).flat_map(|i| [f64::from(i % 2), 1.5, 2.0]).collect();
        assert!(estimate(&dup, 3, m, 0, 0).unwrap().reason.is_some());
        let mle = Method::Mle {
            k: 3,
            pool: Pool::Harmonic,
        };
        assert!(estimate(&dup, 3, mle, 0, 0).unwrap().value.is_nan());
        // arguments that do not fit the graph
        let ok: Vec<f64> = (0..40)
            .flat_map(|i| [1.0, 1.5 + f64::from(i) / 40.0, 2.5])
            .collect();
        let big = Method::Mle {
            k: 4,
            pool: Pool::Mean,
        };
        assert!(estimate(&ok, 3, big, 0, 0).is_err());
        assert!(estimate(&ok, 3, Method::Gride { n1: 2, n2: 4 }, 0, 0).is_err());
        assert!(estimate(&ok, 3, Method::Gride { n1: 2, n2: 2 }, 0, 0).is_err());
        assert!(estimate(&ok, 0, m, 0, 0).is_err());
        assert!(estimate(&ok[..7], 3, m, 0, 0).is_err());
        assert!(twonn_from_mu(&[1.5, 2.0], 1.0, TwoNnMethod::Mle).is_err());
        assert!(Pool::parse("geometric").is_err());
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets() {
        let ok: Vec<f64> = (0..200)
            .flat_map(|i| {
                let t = 1.1 + f64::from((i * 37) % 101) / 50.0;
                [1.0, t, t * 1.3]
            })
            .collect();
        let m = Method::TwoNn {
            discard_fraction: 0.0,
            method: TwoNnMethod::Mle,
        };
        let a = estimate(&ok, 3, m, 200, 7).unwrap();
        let b = estimate(&ok, 3, m, 200, 7).unwrap();
        assert_eq!(a.ci, b.ci);
        assert!(a.ci.0 < a.value && a.value < a.ci.1);
        let c = estimate(&ok, 3, m, 200, 8).unwrap();
        assert_ne!(a.ci, c.ci);
    }

    #[test]
    fn percentile_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile_sorted(&v, 50.0) - 2.5).abs() < 1e-15);
        assert!((percentile_sorted(&v, 95.0) - 3.85).abs() < 1e-12);
    }
}
