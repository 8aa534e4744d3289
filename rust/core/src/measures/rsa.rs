//! Representational similarity analysis (Kriegeskorte, Mur & Bandettini 2008) and mutual
//! k-nearest-neighbour alignment (Huh, Cheung, Wang & Isola 2024, "The Platonic
//! Representation Hypothesis").
//!
//! * RDM of a layer (exact pairwise differences, no GEMM, so ties stay ties): the upper triangle (`i < j`, row-major order, as
//!   `scipy.spatial.distance.pdist`) of `‖x_i − x_j‖` (`Euclidean`) or of
//!   `1 − corr(x_i, x_j)` (`Correlation`: Pearson correlation between the rows, each row
//!   centred by its own mean).
//! * RDMs are compared by Pearson correlation or by Spearman correlation (Pearson of the
//!   ranks, ties given their average rank, as `scipy.stats.spearmanr`).
//! * Mutual kNN: `mean_i |N_k^A(i) ∩ N_k^B(i)| / k`, with `N_k` the k nearest neighbours of
//!   point `i` (self excluded) in each representation.
use crate::engine::neighbors::{exact_condensed_sq_distances, knn, Cpu, Knn, Products, RowMajor};
use crate::error::{Error, Result};
use crate::measures::{pair_table, Layers};
use crate::memory::{try_copy, Budget};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dissimilarity {
    Euclidean,
    Correlation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    Pearson,
    Spearman,
}

/// An RSA: the dissimilarity of its RDMs and how two RDMs are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rsa {
    pub dissimilarity: Dissimilarity,
    pub compare: Compare,
}

impl Rsa {
    /// From the names: `"euclidean"` or `"correlation"`, `"spearman"` or `"pearson"`.
    pub fn parse(dissimilarity: &str, compare: &str) -> Result<Rsa> {
        Ok(Rsa {
            dissimilarity: Dissimilarity::parse(dissimilarity)?,
            compare: Compare::parse(compare)?,
        })
    }
}

impl Dissimilarity {
    pub fn parse(s: &str) -> Result<Self> {
        let kinds = [
            ("euclidean", Self::Euclidean),
            ("correlation", Self::Correlation),
        ];
        crate::error::choice("dissimilarity", s, &kinds)
    }
}

impl Compare {
    pub fn parse(s: &str) -> Result<Self> {
        let ways = [("spearman", Self::Spearman), ("pearson", Self::Pearson)];
        crate::error::choice("compare", s, &ways)
    }
}

/// Condensed RDM (length m(m−1)/2) of `m` rows of width `d`.
/// Fails with [`Error::Memory`] when the RDM does not fit `budget`.
pub fn rdm(
    x: &[f64],
    m: usize,
    d: usize,
    kind: Dissimilarity,
    budget: &Budget,
) -> Result<Vec<f64>> {
    rdm_with(x, m, d, kind, budget, &Cpu)
}

/// [`rdm`] with the exact distances computed by `prod`.
pub fn rdm_with(
    x: &[f64],
    m: usize,
    d: usize,
    kind: Dissimilarity,
    budget: &Budget,
    prod: &dyn Products,
) -> Result<Vec<f64>> {
    match kind {
        Dissimilarity::Euclidean => {
            let mut g = exact_condensed_sq_distances(RowMajor { x, m, d }, budget, prod)?;
            g.par_iter_mut().for_each(|v| *v = v.sqrt());
            Ok(g)
        }
        Dissimilarity::Correlation => {
            if m.checked_mul(d) != Some(x.len()) {
                return Err(Error::invalid("points buffer does not match m × d"));
            }
            // Row-standardise z_i = (x_i − mean) / ‖x_i − mean‖; then
            // 1 − corr(x_i, x_j) = ‖z_i − z_j‖² / 2 (exact differences: identical rows give 0).
            let mut z = try_copy(x, "the row-standardised sample")?;
            for (i, r) in z.chunks_exact_mut(d).enumerate() {
                let mu = r.iter().sum::<f64>() / d as f64;
                r.iter_mut().for_each(|v| *v -= mu);
                let nrm = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                if nrm.is_nan() || nrm <= 0.0 || !nrm.is_finite() {
                    return Err(Error::invalid(format!(
                        "row {i} of the sample is constant (or non-finite): its correlation with \
                         other rows is undefined"
                    )));
                }
                r.iter_mut().for_each(|v| *v /= nrm);
            }
            let mut g = exact_condensed_sq_distances(RowMajor { x: &z, m, d }, budget, prod)?;
            g.par_iter_mut().for_each(|v| *v *= 0.5);
            Ok(g)
        }
    }
}

/// Average ranks (1-based, ties averaged).
pub fn rank_average(v: &[f64]) -> Vec<f64> {
    let n = v.len();
    // Sort (key, index) pairs, not indices compared through `v`: contiguous keys instead of
    // a random read per comparison (about 3× faster on tens of millions of pairs). The key
    // is the IEEE total order as an unsigned integer (`f64::total_cmp`'s order).
    let key = |x: f64| {
        let b = x.to_bits();
        if b >> 63 == 1 {
            !b
        } else {
            b | (1 << 63)
        }
    };
    let mut order: Vec<(u64, usize)> = v
        .par_iter()
        .enumerate()
        .map(|(i, &x)| (key(x), i))
        .collect();
    // The sort of tens of millions of pairs takes seconds and cannot stop halfway: once an
    // interrupt is requested every key reads as equal, which the pattern-defeating sort
    // finishes in linear time; the ranks are then meaningless and the caller, which checks
    // the request right after, never uses them.
    let stop = crate::monitor::interrupt_requested;
    order.par_sort_unstable_by_key(|p| if stop() { 0 } else { p.0 });
    if stop() {
        return vec![f64::NAN; n];
    }
    let mut r = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && v[order[j].1] == v[order[i].1] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // mean of ranks i+1 ..= j
        for &(_, o) in &order[i..j] {
            r[o] = avg;
        }
        i = j;
    }
    r
}

/// Centre and scale a vector to unit norm (None when it is constant).
pub fn standardise(v: &[f64]) -> Option<Vec<f64>> {
    let n = v.len() as f64;
    let mu = v.iter().sum::<f64>() / n;
    let c: Vec<f64> = v.iter().map(|x| x - mu).collect();
    let s = c.iter().map(|x| x * x).sum::<f64>().sqrt();
    if s > 0.0 && s.is_finite() {
        Some(c.into_iter().map(|x| x / s).collect())
    } else {
        None
    }
}

/// Prepare one RDM for comparison: ranks (Spearman) then standardise. None = constant RDM.
pub fn prepare_rdm(rdm: &[f64], compare: Compare) -> Option<Vec<f64>> {
    match compare {
        Compare::Pearson => standardise(rdm),
        Compare::Spearman => standardise(&rank_average(rdm)),
    }
}

/// Correlation of two prepared RDMs (NaN when either is constant). Sequential, so the same
/// value on every run: callers run pairs in parallel.
pub fn correlate(a: Option<&Vec<f64>>, b: Option<&Vec<f64>>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => crate::measures::hsic::dot(a, b),
        _ => f64::NAN,
    }
}

/// `x` (row-major `m × d`) with every non-zero row scaled to unit Euclidean norm (a zero
/// row stays zero): cosine neighbourhoods for [`mutual_knn_matrix`].
pub fn unit_rows(x: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut out = try_copy(x, "the unit-norm copy of a layer")?;
    if d > 0 {
        out.par_chunks_mut(d).for_each(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                r.iter_mut().for_each(|v| *v /= norm);
            }
        });
    }
    Ok(out)
}

/// Mutual kNN alignment of two kNN graphs on the same points (uses the first `k` neighbours
/// of each).
pub fn mutual_knn(a: &Knn, b: &Knn, k: usize) -> Result<f64> {
    if a.m != b.m || k == 0 || k > a.k || k > b.k {
        return Err(Error::invalid(
            "mutual kNN: graphs differ in size or k too large",
        ));
    }
    let tot: usize = (0..a.m)
        .into_par_iter()
        .map(|i| {
            let nb = &b.neighbours(i)[..k];
            a.neighbours(i)[..k]
                .iter()
                .filter(|j| nb.contains(j))
                .count()
        })
        .sum();
    Ok(tot as f64 / (a.m as f64 * k as f64))
}

/// Peak bytes of [`rsa_matrix`] over `layers` layers of `m` rows: every prepared RDM
/// (`m(m−1)/2` values each) plus the workspace of one being made (the RDM, its rank order of
/// (key, index) pairs — two values each —, ranks and centred copy: five more).
pub fn rsa_bytes(layers: usize, m: usize) -> u128 {
    let pairs = m as u128 * (m as u128).saturating_sub(1) / 2;
    (layers as u128 + 5) * pairs * 8
}

/// RSA of every layer pair: the correlation (`compare`) of the RDMs (`dissimilarity`) of
/// each layer of `a` with each layer of `b` (row-major `La × Lb`; `b = None`: `a × a`).
/// All layers hold the same `m ≥ 3` rows. Every RDM is made once; a constant RDM gives NaN.
/// Fails with [`Error::Memory`] before any work when [`rsa_bytes`] exceeds `budget`.
pub fn rsa_matrix(
    a: &Layers<'_>,
    b: Option<&Layers<'_>>,
    m: usize,
    rsa: Rsa,
    budget: &Budget,
    monitor: &dyn crate::Monitor,
) -> Result<Vec<f64>> {
    if m < 3 {
        return Err(Error::invalid("RSA needs at least 3 rows"));
    }
    let nl = a.len() + b.map_or(0, |b| b.len());
    budget.check(
        rsa_bytes(nl, m),
        format_args!("RSA of {nl} layers over {m} sampled rows ({nl} RDMs of {m} × {m})"),
        format_args!(
            "use a smaller sample (sample=...; at most {} rows fit with these {nl} layers) or \
             fewer layers",
            crate::memory::max_rows_for(budget.bytes, |r| rsa_bytes(nl, r as usize))
        ),
    )?;
    let mut done = 0u64;
    let mut prepare = |layers: &Layers<'_>| -> Result<Vec<Option<Vec<f64>>>> {
        let mut out = Vec::with_capacity(layers.len());
        for (x, d) in layers {
            out.push(prepare_rsa(x, m, *d, rsa, &Cpu)?);
            done += 1;
            monitor.progress(done, nl as u64)?;
        }
        Ok(out)
    };
    let ra = prepare(a)?;
    let rb = match b {
        Some(b) => Some(prepare(b)?),
        None => None,
    };
    let ra: Vec<&Option<Vec<f64>>> = ra.iter().collect();
    let rb: Option<Vec<&Option<Vec<f64>>>> = rb.as_ref().map(|r| r.iter().collect());
    rsa_table(&ra, rb.as_deref())
}

/// One layer's step of [`rsa_matrix`] (one task per layer in a distributed run): its RDM
/// prepared for `compare` (None: a constant RDM).
/// The exact distances are computed by `prod`.
pub fn prepare_rsa(
    x: &[f64],
    m: usize,
    d: usize,
    rsa: Rsa,
    prod: &dyn Products,
) -> Result<Option<Vec<f64>>> {
    if m < 3 {
        return Err(Error::invalid("RSA needs at least 3 rows"));
    }
    let r = rdm_with(x, m, d, rsa.dissimilarity, &Budget::unchecked(), prod)?;
    crate::monitor::check_interrupt()?; // the ranking below is the other long step
    let p = prepare_rdm(&r, rsa.compare);
    crate::monitor::check_interrupt()?; // an interrupted ranking is meaningless
    Ok(p)
}

/// The pair step of [`rsa_matrix`] over prepared RDMs (`b = None`: all pairs of `a`).
pub fn rsa_table(ra: &[&Option<Vec<f64>>], rb: Option<&[&Option<Vec<f64>>]>) -> Result<Vec<f64>> {
    pair_table(ra, rb, |p, q| Ok(correlate(p.as_ref(), q.as_ref())))
}

/// Mutual-kNN alignment of every layer pair (row-major `La × Lb`; `b = None`: `a × a`):
/// one exact kNN graph per layer ([`crate::engine::neighbors::knn`]; with `normalize`, of
/// the rows scaled to unit norm, [`unit_rows`]: cosine neighbours), then [`mutual_knn`].
/// Fails with [`Error::Memory`] before any work when the graphs and one graph's workspace
/// exceed `budget`.
#[allow(clippy::too_many_arguments)]
pub fn mutual_knn_matrix(
    a: &Layers<'_>,
    b: Option<&Layers<'_>>,
    m: usize,
    k: usize,
    normalize: bool,
    budget: &Budget,
    monitor: &dyn crate::Monitor,
) -> Result<Vec<f64>> {
    let (nl, dmax) = super::count_and_widest(a, b);
    let graphs = nl as u128 * m as u128 * k as u128 * 16;
    let copy = if normalize {
        m as u128 * dmax as u128 * 8
    } else {
        0
    };
    budget.check(
        graphs + copy + crate::engine::neighbors::knn_bytes(m, dmax, k),
        format_args!("the {k}-nearest-neighbour graphs of {nl} layers over {m} sampled rows"),
        "use a smaller sample (sample=...), a smaller k, or fewer layers",
    )?;
    let graph = |layers: &Layers<'_>| -> Result<Vec<Knn>> {
        layers
            .iter()
            .map(|(x, d)| prepare_knn(x, m, *d, k, normalize, monitor, &Cpu))
            .collect()
    };
    let ga = graph(a)?;
    let gb = match b {
        Some(b) => Some(graph(b)?),
        None => None,
    };
    let ga: Vec<&Knn> = ga.iter().collect();
    let gb: Option<Vec<&Knn>> = gb.as_ref().map(|g| g.iter().collect());
    knn_table(&ga, gb.as_deref(), k)
}

/// One layer's step of [`mutual_knn_matrix`] (one task per layer in a distributed run):
/// its exact `k`-nearest-neighbour graph (of the unit-norm rows with `normalize`), the
/// distance products computed by `prod`.
pub fn prepare_knn(
    x: &[f64],
    m: usize,
    d: usize,
    k: usize,
    normalize: bool,
    monitor: &dyn crate::Monitor,
    prod: &dyn Products,
) -> Result<Knn> {
    let unit;
    let x = if normalize {
        unit = unit_rows(x, d)?;
        &unit[..]
    } else {
        x
    };
    knn(RowMajor { x, m, d }, k, &Budget::unchecked(), monitor, prod)
}

/// The pair step of [`mutual_knn_matrix`] over kNN graphs (`b = None`: all pairs of `a`).
pub fn knn_table(ga: &[&Knn], gb: Option<&[&Knn]>, k: usize) -> Result<Vec<f64>> {
    pair_table(ga, gb, |p, q| mutual_knn(p, q, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(
            rank_average(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
    }

    #[test]
    fn rdm_euclidean_small() {
        let x = [0.0, 0.0, 3.0, 4.0, 6.0, 8.0];
        let r = rdm(&x, 3, 2, Dissimilarity::Euclidean, &Budget::unchecked()).unwrap();
        for (a, b) in r.iter().zip([5.0, 10.0, 5.0]) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn unit_rows_at_any_scale_and_zero_rows() {
        for scale in [1e-30, 1.0, 1e30] {
            let x = [3.0 * scale, 4.0 * scale, 0.0, 0.0];
            let u = unit_rows(&x, 2).unwrap();
            assert!((u[0] - 0.6).abs() < 1e-15 && (u[1] - 0.8).abs() < 1e-15);
            assert_eq!(&u[2..], &[0.0, 0.0]);
        }
    }
}
