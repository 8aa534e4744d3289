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
use crate::engine::neighbors::{exact_condensed_sq_distances, Knn};
use crate::error::{Error, Result};
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

impl Dissimilarity {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "euclidean" => Ok(Self::Euclidean),
            "correlation" => Ok(Self::Correlation),
            _ => Err(Error::invalid(format!(
                "dissimilarity must be 'euclidean' or 'correlation', got {s:?}"
            ))),
        }
    }
}

impl Compare {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pearson" => Ok(Self::Pearson),
            "spearman" => Ok(Self::Spearman),
            _ => Err(Error::invalid(format!(
                "compare must be 'spearman' or 'pearson', got {s:?}"
            ))),
        }
    }
}

/// Condensed RDM (length m(m−1)/2) of `m` rows of width `d`.
pub fn rdm(x: &[f64], m: usize, d: usize, kind: Dissimilarity, max_bytes: u64) -> Result<Vec<f64>> {
    match kind {
        Dissimilarity::Euclidean => {
            let mut g = exact_condensed_sq_distances(x, m, d, max_bytes)?;
            g.par_iter_mut().for_each(|v| *v = v.sqrt());
            Ok(g)
        }
        Dissimilarity::Correlation => {
            if m.checked_mul(d) != Some(x.len()) {
                return Err(Error::invalid("points buffer does not match m × d"));
            }
            // Row-standardise z_i = (x_i − mean) / ‖x_i − mean‖; then
            // 1 − corr(x_i, x_j) = ‖z_i − z_j‖² / 2 (exact differences: identical rows give 0).
            let mut z = x.to_vec();
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
            let mut g = exact_condensed_sq_distances(&z, m, d, max_bytes)?;
            g.par_iter_mut().for_each(|v| *v *= 0.5);
            Ok(g)
        }
    }
}

/// Average ranks (1-based, ties averaged).
pub fn rank_average(v: &[f64]) -> Vec<f64> {
    let n = v.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.par_sort_unstable_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && v[order[j]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // mean of ranks i+1 ..= j
        for &o in &order[i..j] {
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

/// Correlation of two prepared RDMs (NaN when either is constant).
pub fn correlate(a: Option<&Vec<f64>>, b: Option<&Vec<f64>>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => a.par_iter().zip(b.par_iter()).map(|(x, y)| x * y).sum(),
        _ => f64::NAN,
    }
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
        let r = rdm(&x, 3, 2, Dissimilarity::Euclidean, u64::MAX).unwrap();
        for (a, b) in r.iter().zip([5.0, 10.0, 5.0]) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
