//! Engine 2: exact neighbours of an in-memory sample of points (row-major `m × d`, `f64`).
//!
//! * [`knn`]: the `k` nearest neighbours of every point (self excluded). Candidate lists come
//!   from f32 GEMM distance blocks `‖a‖² + ‖b‖² − 2 a·b` of the **column-centred** data
//!   (faer matmul, rayon over row blocks, partial selection — no full sorts); the `2k + 16`
//!   candidates of each row are then **re-computed exactly in f64 from the original
//!   coordinates** (`Σ (a_t − b_t)²`, no GEMM), re-ordered, and the best `k` kept. A per-row
//!   certificate (rigorous bound on the f32 GEMM + rounding error) proves that no
//!   non-candidate can be closer than the k-th kept point; a row that fails it is redone
//!   exactly over all points. So neighbour sets and distances are exact (ties broken by
//!   index) and cancellation can never fake a zero distance.
//! * [`sq_distance_matrix`]: the full `m × m` matrix of squared distances (centred GEMM,
//!   rounding noise below 0 set to 0, diagonal exactly 0), for RSA and RBF kernels.
//! * [`dedup_knn`]: duplicate handling. Two points are duplicates when their exact distance is
//!   `≤ tol`; the default tolerance is [`DEFAULT_REL_TOL`] × the RMS radius of the sample
//!   (`sqrt(Σ_i ‖x_i − x̄‖² / m)`), i.e. relative to the data scale.
use crate::error::{Error, Result};
use crate::monitor::Monitor;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Default duplicate tolerance relative to the RMS radius of the sample.
pub const DEFAULT_REL_TOL: f64 = 1e-7;

/// Rows per GEMM block.
const BLOCK: usize = 128;

/// A kNN graph: for point `i`, `dist[i*k + j]` is the exact Euclidean distance to its
/// `(j+1)`-th nearest neighbour `idx[i*k + j]` (ascending; ties broken by index).
#[derive(Debug, Clone)]
pub struct Knn {
    pub m: usize,
    pub k: usize,
    pub dist: Vec<f64>,
    pub idx: Vec<usize>,
}

impl Knn {
    /// Distances of point `i` (length `k`).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.dist[i * self.k..(i + 1) * self.k]
    }
    /// Neighbour indices of point `i` (length `k`).
    pub fn neighbours(&self, i: usize) -> &[usize] {
        &self.idx[i * self.k..(i + 1) * self.k]
    }
}

fn check_shape(x: &[f64], m: usize, d: usize) -> Result<()> {
    if m.checked_mul(d) != Some(x.len()) {
        return Err(Error::invalid(format!(
            "points buffer has {} values, expected {m} × {d}",
            x.len()
        )));
    }
    if d == 0 {
        return Err(Error::invalid("points have 0 features"));
    }
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "non-finite value (NaN/Inf) in row {} of the sample",
            p / d
        )));
    }
    Ok(())
}

/// Column-centred copy of `x` and the squared norms of its rows.
fn centred(x: &[f64], m: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for (s, v) in mean.iter_mut().zip(row) {
            *s += v;
        }
    }
    for s in mean.iter_mut() {
        *s /= m as f64;
    }
    let mut xc = x.to_vec();
    xc.par_chunks_mut(d).for_each(|row| {
        for (v, mu) in row.iter_mut().zip(&mean) {
            *v -= mu;
        }
    });
    let norms = xc
        .par_chunks(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect();
    (xc, norms)
}

/// Root mean squared distance of the points to their centroid, `sqrt(Σ_i ‖x_i − x̄‖² / m)`.
pub fn rms_radius(x: &[f64], m: usize, d: usize) -> Result<f64> {
    check_shape(x, m, d)?;
    if m == 0 {
        return Ok(0.0);
    }
    let (_, norms) = centred(x, m, d);
    Ok((norms.iter().sum::<f64>() / m as f64).sqrt())
}

/// Exact squared Euclidean distance between two rows (f64, no GEMM).
#[inline]
pub fn exact_sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum()
}

/// Exact k nearest neighbours (self excluded) of the `m` rows of `x` (row-major `m × d`).
///
/// Errors: `k == 0` or `k ≥ m` (InvalidArgument), non-finite values (NonFinite).
pub fn knn(x: &[f64], m: usize, d: usize, k: usize, monitor: &dyn Monitor) -> Result<Knn> {
    check_shape(x, m, d)?;
    if k == 0 || k >= m {
        return Err(Error::invalid(format!(
            "k = {k} neighbours needs 1 ≤ k < number of points ({m})"
        )));
    }
    let (xc, norms64) = centred(x, m, d);
    // Candidates from an f32 GEMM of the centred data; certified below.
    let xc32: Vec<f32> = xc.iter().map(|&v| v as f32).collect();
    let norms: Vec<f64> = xc32
        .par_chunks(d)
        .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect();
    let len: Vec<f64> = norms64.iter().map(|v| v.sqrt()).collect();
    let maxlen = len.iter().copied().fold(0.0f64, f64::max);
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = d as f64 * u / (1.0 - d as f64 * u).max(1e-3);
    let kc = (2 * k + 16).min(m - 1);
    let all = MatRef::from_row_major_slice(&xc32, m, d);
    let nblocks = m.div_ceil(BLOCK);
    let done = std::sync::atomic::AtomicU64::new(0);
    let fallbacks = std::sync::atomic::AtomicU64::new(0);
    let blocks: Vec<Result<(Vec<f64>, Vec<usize>)>> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let r0 = b * BLOCK;
            let r1 = (r0 + BLOCK).min(m);
            let nb = r1 - r0;
            let lhs = MatRef::from_row_major_slice(&xc32[r0 * d..r1 * d], nb, d);
            let mut g = vec![0.0f32; nb * m];
            matmul(
                MatMut::from_row_major_slice_mut(&mut g, nb, m),
                Accum::Replace,
                lhs,
                all.transpose(),
                1.0f32,
                Par::Seq,
            );
            let mut dist = Vec::with_capacity(nb * k);
            let mut idx = Vec::with_capacity(nb * k);
            let mut cand: Vec<(f64, usize)> = Vec::with_capacity(m);
            for (r, grow) in g.chunks_exact(m).enumerate() {
                let i = r0 + r;
                cand.clear();
                let ni = norms[i];
                cand.extend(
                    grow.iter()
                        .enumerate()
                        .filter(|&(j, _)| j != i)
                        .map(|(j, &gij)| (ni + norms[j] - 2.0 * f64::from(gij), j)),
                );
                // Smallest approximate value among the rows NOT kept as candidates.
                let mut thr = f64::INFINITY;
                if kc < cand.len() {
                    cand.select_nth_unstable_by(kc, |a, b| a.0.total_cmp(&b.0));
                    thr = cand[kc].0;
                    cand.truncate(kc);
                }
                let xi = &x[i * d..(i + 1) * d];
                for c in cand.iter_mut() {
                    c.0 = exact_sq_dist(xi, &x[c.1 * d..(c.1 + 1) * d]);
                }
                cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                // Certificate: every non-candidate j has true d² ≥ approx_j − E_i ≥ thr − E_i,
                // E_i bounding the f32 GEMM error (γ_d·2‖a‖‖b‖) plus the effect of rounding
                // the centred coordinates to f32 (≤ 3u(‖a‖+‖b‖)²). If the k-th exact distance
                // is not strictly below thr − E_i, redo the row exactly over all points.
                let s = len[i] + maxlen;
                let e = 2.0 * gamma * (len[i] * maxlen) * (1.0 + 4.0 * u)
                    + 3.0 * u * s * s
                    + 1e-12 * s * s;
                let kth = cand.get(k - 1).map_or(f64::INFINITY, |c| c.0);
                if thr.is_finite() && kth >= thr - e {
                    fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    cand.clear();
                    cand.extend(
                        (0..m)
                            .filter(|&j| j != i)
                            .map(|j| (exact_sq_dist(xi, &x[j * d..(j + 1) * d]), j)),
                    );
                    cand.select_nth_unstable_by(k - 1, |a, b| {
                        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
                    });
                    cand.truncate(k);
                    cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                }
                for c in cand.iter().take(k) {
                    dist.push(c.0.sqrt());
                    idx.push(c.1);
                }
            }
            let n = done.fetch_add(nb as u64, std::sync::atomic::Ordering::Relaxed) + nb as u64;
            monitor.progress(n, m as u64)?;
            Ok((dist, idx))
        })
        .collect();
    let _ = fallbacks.load(std::sync::atomic::Ordering::Relaxed);
    let mut dist = Vec::with_capacity(m * k);
    let mut idx = Vec::with_capacity(m * k);
    for b in blocks {
        let (dd, ii) = b?;
        dist.extend(dd);
        idx.extend(ii);
    }
    Ok(Knn { m, k, dist, idx })
}

/// How duplicates are treated by [`dedup_knn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// Keep the first point (lowest index) of each group of duplicates, drop the others.
    Drop,
    /// Fail with InvalidArgument saying how many points are duplicates.
    Error,
    /// Keep everything (estimators may then see zero distances).
    Keep,
}

impl Duplicates {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(Duplicates::Drop),
            "error" => Ok(Duplicates::Error),
            "keep" => Ok(Duplicates::Keep),
            _ => Err(Error::invalid(format!(
                "duplicates must be 'drop', 'error' or 'keep', got {s:?}"
            ))),
        }
    }
}

/// A kNN graph after duplicate handling.
#[derive(Debug, Clone)]
pub struct DedupKnn {
    pub knn: Knn,
    /// Rows of the input that the graph is built on (indices into the input, ascending).
    pub kept: Vec<usize>,
    /// Number of input rows dropped as duplicates (`Drop`) or found to be duplicates of an
    /// earlier row (`Keep`, from the kNN graph: a lower bound when a group has more than
    /// `k + 1` members).
    pub duplicates: usize,
    /// The tolerance used.
    pub tol: f64,
}

fn find(parent: &mut [usize], mut a: usize) -> usize {
    while parent[a] != a {
        parent[a] = parent[parent[a]];
        a = parent[a];
    }
    a
}

/// Points of the graph that are duplicates of a lower-index point (union–find over kNN
/// edges with distance ≤ tol; the representative of a group is its lowest index).
fn duplicate_mask(g: &Knn, tol: f64) -> Vec<bool> {
    let mut parent: Vec<usize> = (0..g.m).collect();
    for i in 0..g.m {
        for (dd, &j) in g.row(i).iter().zip(g.neighbours(i)) {
            if *dd <= tol {
                let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                if a != b {
                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                    parent[hi] = lo;
                }
            }
        }
    }
    (0..g.m).map(|i| find(&mut parent, i) != i).collect()
}

/// kNN graph with duplicates handled: points closer than `tol` (default
/// [`DEFAULT_REL_TOL`] × RMS radius) are duplicates. With `Drop`, duplicates are removed and
/// the graph recomputed until none remain (a group larger than `k + 1` may take several
/// rounds); with `Error` the call fails naming how many rows are duplicates; with `Keep` the
/// graph is returned as is with the count.
pub fn dedup_knn(
    x: &[f64],
    m: usize,
    d: usize,
    k: usize,
    tol: Option<f64>,
    policy: Duplicates,
    monitor: &dyn Monitor,
) -> Result<DedupKnn> {
    let tol = match tol {
        Some(t) if t.is_finite() && t >= 0.0 => t,
        Some(t) => return Err(Error::invalid(format!("tolerance must be ≥ 0, got {t}"))),
        None => DEFAULT_REL_TOL * rms_radius(x, m, d)?,
    };
    let mut kept: Vec<usize> = (0..m).collect();
    let mut buf: Option<Vec<f64>> = None;
    loop {
        let data: &[f64] = buf.as_deref().unwrap_or(x);
        let mm = kept.len();
        if k >= mm {
            return Err(Error::invalid(format!(
                "k = {k} neighbours needs more than {mm} distinct points ({} duplicates dropped)",
                m - mm
            )));
        }
        let g = knn(data, mm, d, k, monitor)?;
        let mask = duplicate_mask(&g, tol);
        let ndup = mask.iter().filter(|&&b| b).count();
        if ndup == 0 {
            if policy == Duplicates::Error && mm < m {
                return Err(Error::invalid(format!(
                    "{} of {m} sampled rows are duplicates (distance ≤ {tol:.3e} to another row); \
                     use duplicates='drop' or 'keep'",
                    m - mm
                )));
            }
            return Ok(DedupKnn {
                knn: g,
                duplicates: m - mm,
                kept,
                tol,
            });
        }
        if policy == Duplicates::Keep {
            return Ok(DedupKnn {
                knn: g,
                kept,
                duplicates: ndup,
                tol,
            });
        }
        let new_kept: Vec<usize> = kept
            .iter()
            .zip(&mask)
            .filter(|(_, &dup)| !dup)
            .map(|(&r, _)| r)
            .collect();
        let mut nb = Vec::with_capacity(new_kept.len() * d);
        for &r in &new_kept {
            nb.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        kept = new_kept;
        buf = Some(nb);
    }
}

/// Full `m × m` matrix of squared Euclidean distances (row-major), from a GEMM of the
/// column-centred data; rounding noise below 0 is set to 0 and the diagonal is exactly 0.
/// Fails with a Memory error when `m² × 8` bytes exceed `max_bytes`.
pub fn sq_distance_matrix(x: &[f64], m: usize, d: usize, max_bytes: u64) -> Result<Vec<f64>> {
    check_shape(x, m, d)?;
    let need = (m as u64).saturating_mul(m as u64).saturating_mul(8);
    if need > max_bytes {
        return Err(Error::Memory(format!(
            "an {m} × {m} distance matrix needs {:.1} MiB (limit {:.1} MiB); use a smaller sample",
            need as f64 / 1048576.0,
            max_bytes as f64 / 1048576.0
        )));
    }
    let (xc, norms) = centred(x, m, d);
    let a = MatRef::from_row_major_slice(&xc, m, d);
    let mut g = vec![0.0f64; m * m];
    matmul(
        MatMut::from_row_major_slice_mut(&mut g, m, m),
        Accum::Replace,
        a,
        a.transpose(),
        1.0,
        Par::rayon(0),
    );
    g.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if i == j {
                0.0
            } else {
                (norms[i] + norms[j] - 2.0 * *v).max(0.0)
            };
        }
    });
    // Exact symmetry (the GEMM need not be bitwise symmetric).
    for i in 0..m {
        for j in (i + 1)..m {
            let v = g[i * m + j];
            g[j * m + i] = v;
        }
    }
    Ok(g)
}

/// Condensed (upper-triangle, `i < j`, row-major) **exact** squared distances `Σ (a − b)²`
/// computed directly from the coordinates (no GEMM, so tied distances stay exactly tied —
/// what rank-based comparisons need). Cost `m² d / 2`.
pub fn exact_condensed_sq_distances(
    x: &[f64],
    m: usize,
    d: usize,
    max_bytes: u64,
) -> Result<Vec<f64>> {
    check_shape(x, m, d)?;
    let len = m.saturating_mul(m.saturating_sub(1)) / 2;
    if (len as u64).saturating_mul(8) > max_bytes {
        return Err(Error::Memory(format!(
            "the {m}-row condensed distance matrix needs {:.1} MiB (limit {:.1} MiB); use a smaller sample",
            len as f64 * 8.0 / 1048576.0,
            max_bytes as f64 / 1048576.0
        )));
    }
    let rows: Vec<Vec<f64>> = (0..m)
        .into_par_iter()
        .map(|i| {
            let xi = &x[i * d..(i + 1) * d];
            ((i + 1)..m)
                .map(|j| exact_sq_dist(xi, &x[j * d..(j + 1) * d]))
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    for r in rows {
        out.extend(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::NoMonitor;

    fn brute(x: &[f64], m: usize, d: usize, k: usize) -> Vec<Vec<usize>> {
        (0..m)
            .map(|i| {
                let mut v: Vec<(f64, usize)> = (0..m)
                    .filter(|&j| j != i)
                    .map(|j| {
                        (
                            exact_sq_dist(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]),
                            j,
                        )
                    })
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                v.iter().take(k).map(|p| p.1).collect()
            })
            .collect()
    }

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    #[test]
    fn knn_matches_brute_force_with_offset() {
        let (m, d, k) = (300, 7, 5);
        let mut x = lcg(m * d, 3);
        for (t, v) in x.iter_mut().enumerate() {
            *v = (*v + 1000.0 * (t % d) as f64) as f32 as f64;
        }
        let g = knn(&x, m, d, k, &NoMonitor).unwrap();
        let b = brute(&x, m, d, k);
        for (i, bi) in b.iter().enumerate() {
            assert_eq!(g.neighbours(i), &bi[..]);
        }
    }

    #[test]
    fn duplicates_dropped() {
        let (m, d, k) = (200, 4, 3);
        let mut x = lcg(m * d, 5);
        for r in 0..10 {
            let src: Vec<f64> = x[r * d..(r + 1) * d].to_vec();
            x[(100 + r) * d..(101 + r) * d].copy_from_slice(&src);
        }
        let r = dedup_knn(&x, m, d, k, None, Duplicates::Drop, &NoMonitor).unwrap();
        assert_eq!(r.duplicates, 10);
        assert_eq!(r.kept.len(), 190);
        assert!(dedup_knn(&x, m, d, k, None, Duplicates::Error, &NoMonitor).is_err());
        assert!(knn(&x, m, d, 0, &NoMonitor).is_err());
        assert!(knn(&x, m, d, m, &NoMonitor).is_err());
    }

    #[test]
    fn distance_matrix_matches() {
        let (m, d) = (50, 6);
        let x = lcg(m * d, 9);
        let g = sq_distance_matrix(&x, m, d, u64::MAX).unwrap();
        for (i, gi) in g.chunks_exact(m).enumerate() {
            for (j, gij) in gi.iter().enumerate() {
                let e = exact_sq_dist(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
                assert!((gij - e).abs() < 1e-12);
            }
        }
        assert!(sq_distance_matrix(&x, m, d, 10).is_err());
    }
}
