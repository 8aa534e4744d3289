//! RBF-kernel HSIC and CKA on an in-memory sample (Gram matrices from
//! [`crate::engine::neighbors::sq_distance_matrix`]).
//!
//! * Bandwidth (Kornblith et al. 2019, "Similarity of neural network representations
//!   revisited", ICML): `bw = σ · sqrt(median of all m² squared distances, diagonal
//!   included)`; `K_ij = exp(−‖x_i − x_j‖² / (2 bw²))`.
//! * Biased HSIC (Gretton et al. 2005): `tr(K H L H) / (m − 1)²`, `H = I − 11ᵀ/m`.
//! * Unbiased HSIC (Song et al. 2012, JMLR 13): with `K̃ = K − diag(K)`, `L̃` likewise,
//!   `[tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − 2/(m−2) 1ᵀK̃L̃1] / (m(m−3))`, `m ≥ 4`.
//! * CKA = `HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))` with the same estimator in numerator
//!   and denominator (debiased CKA is normalised by debiased self-HSIC; it can be negative
//!   and is never clamped).
//!
//! Each Gram is built once per layer and reused for all pairs.
use crate::engine::neighbors::sq_distance_matrix;
use crate::error::{Error, Result};
use crate::memory::{try_with_capacity, Budget};
use crate::monitor::Monitor;
use rayon::prelude::*;

/// The largest `r ≤ 2³²` with `bytes(r) ≤ budget` (`bytes` increasing), 0 if none.
pub fn max_rows_for(budget: u64, bytes: impl Fn(u128) -> u128) -> u64 {
    let (mut lo, mut hi) = (0u128, 1u128 << 32);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if bytes(mid) <= budget as u128 {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo as u64
}

/// One prepared kernel: what every pair needs.
struct Prepared {
    /// Biased: `HKH` (row-major m × m); unbiased: `K̃` (K with zero diagonal).
    g: Vec<f64>,
    /// Unbiased only: row sums of `K̃` and their total.
    rows: Vec<f64>,
    total: f64,
}

/// Median of all `m²` entries of a symmetric `m × m` matrix with a zero diagonal (average of
/// the two middle values when `m²` is even), from its strict upper triangle: sorted, the
/// full multiset is the `m` diagonal zeros followed by every upper value twice, so order
/// statistic `r ≥ m` of the whole matrix is order statistic `(r − m) / 2` of the upper
/// triangle. Exactly the median of the full matrix, on half the data.
fn median_sym_zero_diag(g: &[f64], m: usize) -> Result<f64> {
    if m == 0 {
        return Ok(f64::NAN);
    }
    let mut w: Vec<f64> =
        try_with_capacity(m * (m - 1) / 2, "the workspace of the median distance")?;
    for i in 0..m {
        w.extend_from_slice(&g[i * m + i + 1..(i + 1) * m]);
    }
    let full = m * m;
    let ranks = if full % 2 == 1 {
        (full / 2, full / 2)
    } else {
        (full / 2 - 1, full / 2)
    };
    // value at full rank r, given the selected upper order statistics
    let at = |r: usize, w: &mut Vec<f64>| -> f64 {
        if r < m {
            return 0.0;
        }
        let t = (r - m) / 2;
        let (_, v, _) = w.select_nth_unstable_by(t, f64::total_cmp);
        *v
    };
    let lo = at(ranks.0, &mut w);
    let hi = if ranks.1 == ranks.0 {
        lo
    } else {
        at(ranks.1, &mut w)
    };
    Ok((lo + hi) / 2.0)
}

/// Peak bytes of [`rbf_gram`] beyond the Grams it returns: the centred copy of the sample
/// and the median's workspace (half a Gram).
pub fn rbf_gram_workspace_bytes(m: usize, d: usize) -> u128 {
    let (m, d) = (m as u128, d as u128);
    (m * d + m * m.saturating_sub(1) / 2) * 8
}

/// RBF Gram matrix of a sample and its bandwidth (rule above).
pub fn rbf_gram(
    x: &[f64],
    m: usize,
    d: usize,
    sigma: f64,
    budget: &Budget,
) -> Result<(Vec<f64>, f64)> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::invalid(format!("sigma must be > 0, got {sigma}")));
    }
    let mut g = sq_distance_matrix(x, m, d, budget)?;
    let med = median_sym_zero_diag(&g, m)?;
    let bw = sigma * med.sqrt();
    if bw.is_nan() || bw <= 0.0 {
        return Err(Error::invalid(
            "the median pairwise distance is 0 (more than half of the sampled rows coincide): \
             the RBF bandwidth is undefined",
        ));
    }
    let s = 1.0 / (2.0 * bw * bw);
    g.par_iter_mut().for_each(|v| *v = (-*v * s).exp());
    Ok((g, bw))
}

fn prepare(mut k: Vec<f64>, m: usize, unbiased: bool) -> Prepared {
    if unbiased {
        for i in 0..m {
            k[i * m + i] = 0.0;
        }
        let rows: Vec<f64> = k.par_chunks(m).map(|r| r.iter().sum()).collect();
        let total = rows.iter().sum();
        Prepared { g: k, rows, total }
    } else {
        // HKH: subtract row means, column means, add the grand mean.
        let rm: Vec<f64> = k
            .par_chunks(m)
            .map(|r| r.iter().sum::<f64>() / m as f64)
            .collect();
        let gm = rm.iter().sum::<f64>() / m as f64;
        // K symmetric: column means = row means.
        k.par_chunks_mut(m).enumerate().for_each(|(i, r)| {
            for (j, v) in r.iter_mut().enumerate() {
                *v = *v - rm[i] - rm[j] + gm;
            }
        });
        Prepared {
            g: k,
            rows: Vec::new(),
            total: 0.0,
        }
    }
}

fn hsic(a: &Prepared, b: &Prepared, m: usize, unbiased: bool) -> f64 {
    // tr(AB) = Σ_ij A_ij B_ij for symmetric A, B: the diagonal plus twice the strict upper
    // triangle (half the memory traffic of the full sum). Per-row partials are summed in row
    // order, so the value is the same on every run (a parallel float reduction is not).
    let rows: Vec<f64> =
        a.g.par_chunks(m)
            .zip(b.g.par_chunks(m))
            .enumerate()
            .map(|(i, (p, q))| {
                let off: f64 = p[i + 1..].iter().zip(&q[i + 1..]).map(|(x, y)| x * y).sum();
                p[i] * q[i] + 2.0 * off
            })
            .collect();
    let tr: f64 = rows.iter().sum();
    let mf = m as f64;
    if unbiased {
        let kl1: f64 = a.rows.iter().zip(&b.rows).map(|(x, y)| x * y).sum();
        (tr + a.total * b.total / ((mf - 1.0) * (mf - 2.0)) - 2.0 / (mf - 2.0) * kl1)
            / (mf * (mf - 3.0))
    } else {
        tr / ((mf - 1.0) * (mf - 1.0))
    }
}

/// HSIC values of RBF kernels for all layer pairs of one sample.
#[derive(Debug, Clone)]
pub struct RbfHsic {
    /// `xy[i * lb + j]` = HSIC(K_{a,i}, K_{b,j}) (`lb = number of b layers`; with no b, the
    /// a × a matrix).
    pub xy: Vec<f64>,
    /// Self-HSIC of each a layer and each b layer.
    pub xx: Vec<f64>,
    pub yy: Vec<f64>,
    pub bw_a: Vec<f64>,
    pub bw_b: Vec<f64>,
}

/// Peak bytes of [`rbf_hsic`] over `layers` Grams of `m` rows, the widest layer `dmax` wide:
/// one `m × m` f64 Gram per layer plus one Gram's workspace (what it checks before any Gram).
pub fn rbf_hsic_bytes(layers: usize, m: usize, dmax: usize) -> u128 {
    layers as u128 * m as u128 * m as u128 * 8 + rbf_gram_workspace_bytes(m, dmax)
}

/// RBF HSIC for all pairs: `a` (and optionally `b`) are layers of the same `m` rows, each a
/// row-major buffer with its width. `unbiased` selects Song et al.'s estimator (needs m ≥ 4).
/// Memory: one m × m f64 Gram per layer plus one Gram's workspace (checked against `budget`
/// before any Gram is built).
pub fn rbf_hsic(
    a: &[(&[f64], usize)],
    b: Option<&[(&[f64], usize)]>,
    m: usize,
    sigma: f64,
    unbiased: bool,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<RbfHsic> {
    if a.is_empty() || b.is_some_and(|b| b.is_empty()) {
        return Err(Error::invalid("empty layer selection"));
    }
    if m < if unbiased { 4 } else { 2 } {
        return Err(Error::invalid(format!(
            "RBF HSIC needs at least {} rows, got {m}",
            if unbiased { 4 } else { 2 }
        )));
    }
    let (nl, dmax) = super::count_and_widest(a, b);
    budget.check(
        rbf_hsic_bytes(nl, m, dmax),
        format_args!("{nl} RBF Gram matrices of {m} × {m} rows"),
        format_args!(
            "use a smaller sample (sample=...; at most {} rows fit with these {nl} layers), \
             fewer layers, or estimator='minibatch'",
            max_rows_for(budget.bytes, |r| nl as u128 * r * r * 8
                + rbf_gram_workspace_bytes(r as usize, dmax))
        ),
    )?;
    let total = (nl * 2) as u64;
    let mut done = 0u64;
    let mut build = |layers: &[(&[f64], usize)]| -> Result<(Vec<Prepared>, Vec<f64>)> {
        let mut out = Vec::with_capacity(layers.len());
        let mut bws = Vec::with_capacity(layers.len());
        for (x, d) in layers {
            let (k, bw) = rbf_gram(x, m, *d, sigma, &Budget::unchecked())?;
            out.push(prepare(k, m, unbiased));
            bws.push(bw);
            done += 1;
            monitor.progress(done, total)?;
        }
        Ok((out, bws))
    };
    let (pa, bw_a) = build(a)?;
    let (pb, bw_b) = match b {
        Some(b) => {
            let (p, w) = build(b)?;
            (Some(p), w)
        }
        None => (None, Vec::new()),
    };
    let xx: Vec<f64> = pa.iter().map(|p| hsic(p, p, m, unbiased)).collect();
    let (xy, yy) = match &pb {
        Some(pb) => {
            let yy: Vec<f64> = pb.iter().map(|p| hsic(p, p, m, unbiased)).collect();
            let mut xy = Vec::with_capacity(pa.len() * pb.len());
            for p in &pa {
                for q in pb {
                    xy.push(hsic(p, q, m, unbiased));
                }
                done += 1;
                monitor.progress(done.min(total), total)?;
            }
            (xy, yy)
        }
        None => {
            let l = pa.len();
            let mut xy = vec![0.0; l * l];
            for i in 0..l {
                xy[i * l + i] = xx[i];
                for j in (i + 1)..l {
                    let v = hsic(&pa[i], &pa[j], m, unbiased);
                    xy[i * l + j] = v;
                    xy[j * l + i] = v;
                }
                done += 1;
                monitor.progress(done.min(total), total)?;
            }
            (xy, xx.clone())
        }
    };
    monitor.progress(total, total)?;
    Ok(RbfHsic {
        xy,
        xx,
        yy,
        bw_a,
        bw_b,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::NoMonitor;

    #[test]
    fn identical_layers_give_one() {
        let m = 30;
        let x: Vec<f64> = (0..m * 3)
            .map(|i| ((i * 7919) % 101) as f64 / 17.0)
            .collect();
        for unbiased in [false, true] {
            let r = rbf_hsic(
                &[(&x, 3), (&x, 3)],
                None,
                m,
                1.0,
                unbiased,
                &Budget::unchecked(),
                &NoMonitor,
            )
            .unwrap();
            let cka = r.xy[1] / (r.xx[0] * r.xx[1]).sqrt();
            assert!((cka - 1.0).abs() < 1e-12);
        }
        let tiny = Budget::argument(10).unwrap();
        assert!(matches!(
            rbf_hsic(&[(&x, 3)], None, m, 1.0, true, &tiny, &NoMonitor),
            Err(Error::Memory(_))
        ));
    }

    fn naive_median(v: &[f64]) -> f64 {
        let mut w = v.to_vec();
        w.sort_by(f64::total_cmp);
        let n = w.len();
        if n % 2 == 1 {
            w[n / 2]
        } else {
            (w[n / 2 - 1] + w[n / 2]) / 2.0
        }
    }

    #[test]
    fn median_from_the_upper_triangle_is_the_full_median() {
        for m in [1usize, 2, 3, 4, 5, 8, 13] {
            for seed in 0..4u64 {
                let mut g = vec![0.0; m * m];
                for i in 0..m {
                    for j in (i + 1)..m {
                        // few distinct values: ties and zeros off the diagonal too
                        let v = ((i * 31 + j * 17 + seed as usize * 7) % 5) as f64;
                        g[i * m + j] = v;
                        g[j * m + i] = v;
                    }
                }
                assert_eq!(
                    median_sym_zero_diag(&g, m).unwrap(),
                    naive_median(&g),
                    "m={m}"
                );
            }
        }
    }
}
