//! RBF-kernel CKA on an in-memory sample (Gram matrices from
//! [`crate::engine::neighbors::sq_distance_matrix`]; HSIC and the CKA ratio from
//! [`crate::measures::hsic`]).
//!
//! * Bandwidth (Kornblith et al. 2019, "Similarity of neural network representations
//!   revisited", ICML): `bw = σ · sqrt(median of all m² squared distances, diagonal
//!   included)`; `K_ij = exp(−‖x_i − x_j‖² / (2 bw²))`.
//! * HSIC biased (Gretton et al. 2005) or unbiased (Song et al. 2012, `m ≥ 4`), and
//!   CKA = `HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))` with the same estimator in numerator
//!   and denominator, under the NaN rule of [`crate::measures::hsic::cka_ratio`].
//!
//! Each Gram is built once per layer and reused for all pairs; pairs run in parallel, each
//! unordered pair of one source once.
use crate::engine::neighbors::{sq_distance_matrix, Cpu, Products, RowMajor};
use crate::error::{Error, Result};
use crate::measures::hsic::{cka_ratio, hsic, Estimator, Gram};
use crate::measures::pair_table;
use crate::memory::{max_rows_for, try_with_capacity, Budget};
use crate::monitor::Monitor;
use rayon::prelude::*;

/// Median of all `m²` entries of a symmetric `m × m` matrix with a zero diagonal (average of
/// the two middle values when `m²` is even), from its strict upper triangle: sorted, the
/// full multiset is the `m` diagonal zeros followed by every upper value twice, so order
/// statistic `r ≥ m` of the whole matrix is order statistic `(r − m) / 2` of the upper
/// triangle. Exactly the median of the full matrix, on half the data.
pub(crate) fn median_sym_zero_diag(g: &[f64], m: usize) -> Result<f64> {
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
    rbf_gram_with(x, m, d, sigma, budget, &Cpu)
}

/// [`rbf_gram`] with the distance products computed by `prod`.
pub fn rbf_gram_with(
    x: &[f64],
    m: usize,
    d: usize,
    sigma: f64,
    budget: &Budget,
    prod: &dyn Products,
) -> Result<(Vec<f64>, f64)> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(Error::invalid(format!("sigma must be > 0, got {sigma}")));
    }
    let mut g = sq_distance_matrix(RowMajor { x, m, d }, budget, prod)?;
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

/// RBF CKA of all layer pairs of one sample, with the HSIC values it comes from.
#[derive(Debug, Clone)]
pub struct RbfHsic {
    pub table: RbfTable,
    /// The bandwidth of each a layer's and each b layer's kernel.
    pub bw_a: Vec<f64>,
    pub bw_b: Vec<f64>,
}

/// Peak bytes of [`rbf_hsic`] over `layers` Grams of `m` rows, the widest layer `dmax` wide:
/// one `m × m` f64 Gram per layer plus one Gram's workspace (what it checks before any Gram).
pub fn rbf_hsic_bytes(layers: usize, m: usize, dmax: usize) -> u128 {
    layers as u128 * m as u128 * m as u128 * 8 + rbf_gram_workspace_bytes(m, dmax)
}

/// RBF HSIC and CKA for all pairs: `a` (and optionally `b`) are layers of the same `m`
/// rows, each a row-major buffer with its width. `unbiased` selects Song et al.'s estimator
/// (needs m ≥ 4). Memory: one m × m f64 Gram per layer plus one Gram's workspace (checked
/// against `budget` before any Gram is built).
pub fn rbf_hsic(
    a: &[(&[f64], usize)],
    b: Option<&[(&[f64], usize)]>,
    m: usize,
    sigma: f64,
    unbiased: bool,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<RbfHsic> {
    let est = Estimator::from_unbiased(unbiased);
    if a.is_empty() || b.is_some_and(|b| b.is_empty()) {
        return Err(Error::invalid("empty layer selection"));
    }
    if m < est.min_rows() {
        return Err(Error::invalid(format!(
            "RBF HSIC needs at least {} rows, got {m}",
            est.min_rows()
        )));
    }
    let (nl, dmax) = crate::measures::count_and_widest(a, b);
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
    let total = nl as u64 + 1;
    let mut done = 0u64;
    let mut build = |layers: &[(&[f64], usize)]| -> Result<(Vec<Gram>, Vec<f64>)> {
        let mut out = Vec::with_capacity(layers.len());
        let mut bws = Vec::with_capacity(layers.len());
        for (x, d) in layers {
            let (g, bw) = prepare_rbf(x, m, *d, sigma, est, &Cpu)?;
            out.push(g);
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
    let ra: Vec<&Gram> = pa.iter().collect();
    let rb: Option<Vec<&Gram>> = pb.as_ref().map(|p| p.iter().collect());
    let table = rbf_table(&ra, rb.as_deref())?;
    monitor.progress(total, total)?;
    Ok(RbfHsic { table, bw_a, bw_b })
}

/// One layer's step of [`rbf_hsic`] (the unit of a distributed run: one task per layer):
/// its RBF Gram ([`rbf_gram`]) prepared for the estimator, and its bandwidth.
/// The distance products are computed by `prod`.
pub fn prepare_rbf(
    x: &[f64],
    m: usize,
    d: usize,
    sigma: f64,
    est: Estimator,
    prod: &dyn Products,
) -> Result<(Gram, f64)> {
    if m < est.min_rows() {
        return Err(Error::invalid(format!(
            "RBF HSIC needs at least {} rows, got {m}",
            est.min_rows()
        )));
    }
    let (k, bw) = rbf_gram_with(x, m, d, sigma, &Budget::unchecked(), prod)?;
    Ok((Gram::prepare(k, m, est)?, bw))
}

/// The pair step of [`rbf_hsic`]: HSIC of every pair, self-HSICs and CKA ratios.
#[derive(Debug, Clone)]
pub struct RbfTable {
    /// `cka[i * lb + j]` = CKA of a-layer `i` and b-layer `j` (`lb` = the number of b
    /// layers; with no b, the a × a matrix, 1 on its diagonal), under the NaN rule of
    /// [`cka_ratio`].
    pub cka: Vec<f64>,
    /// `xy[i * lb + j]` = HSIC(K_{a,i}, K_{b,j}) (same layout).
    pub xy: Vec<f64>,
    /// Self-HSIC of each a layer and each b layer.
    pub xx: Vec<f64>,
    pub yy: Vec<f64>,
}

/// The pair step of [`rbf_hsic`] over prepared Grams (`b = None`: all pairs of `a`, each
/// unordered pair once, the diagonal exactly 1 where defined). Used as it is by a
/// distributed run on each block of layer pairs.
pub fn rbf_table(pa: &[&Gram], pb: Option<&[&Gram]>) -> Result<RbfTable> {
    let xy = pair_table(pa, pb, |p, q| hsic(p, q))?;
    let lb = pb.map_or(pa.len(), |p| p.len());
    let (xx, yy) = match pb {
        None => {
            let xx: Vec<f64> = (0..lb).map(|i| xy[i * lb + i]).collect();
            (xx.clone(), xx)
        }
        Some(pb) => {
            let selfs =
                |g: &[&Gram]| -> Result<Vec<f64>> { g.par_iter().map(|p| hsic(p, p)).collect() };
            (selfs(pa)?, selfs(pb)?)
        }
    };
    let cka = (0..xy.len())
        .map(|k| {
            let (i, j) = (k / lb, k % lb);
            cka_ratio(xy[k], xx[i], yy[j], pb.is_none() && i == j)
        })
        .collect();
    Ok(RbfTable { cka, xy, xx, yy })
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
            assert_eq!(r.table.cka, vec![1.0; 4]);
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
