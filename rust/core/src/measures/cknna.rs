//! CKNNA (Huh, Cheung, Wang & Isola 2024, ICML, "The Platonic Representation Hypothesis",
//! §A): kernel alignment restricted to mutual nearest neighbours.
//!
//! For `m` sampled rows of two layers with inner-product Grams `K`, `L` (of the row-normalised
//! features with `normalize`, the paper's default) and `N_K(i)` the `k` columns `j ≠ i` with
//! the largest `K_ij` (ties broken by the lowest `j`, as [`super::rsa::mutual_knn`]):
//!
//! * the mask `M_ij = [j ∈ N_K(i)] · [j ∈ N_L(i)]` (not symmetric);
//! * `Align(K, L) = HSIC₁(M∘K, M∘L)`, Song et al.'s unbiased HSIC in its trace form
//!   (`tr(K̃L̃)`, the masked matrices not being symmetric; `1ᵀK̃L̃1 = (K̃ᵀ1)·(L̃1)`);
//! * `CKNNA(K, L) = Align(K, L) / sqrt(Align(K, K) · Align(L, L))` (`Align(K, K)` masks `K`
//!   with its own neighbours), under the NaN rule of [`cka_ratio`] and **no additive guard**
//!   (the authors' code adds 1e-6 to the denominator).
//!
//! The mask is not symmetric, and neither is `Align`: its `1ᵀK̃L̃1` term is `(K̃ᵀ1)·(L̃1)`,
//! not `(L̃ᵀ1)·(K̃1)`, so `CKNNA(K, L)` and `CKNNA(L, K)` differ slightly (as in the
//! authors' code, which computes the order it is given).
//!
//! Each layer keeps only its neighbour lists and their inner products (`m·k` pairs), found
//! from exact f64 Gram blocks; every sum of a pair runs over the `≤ m·k` masked entries.
use crate::error::{Error, Result};
use crate::measures::hsic::{cka_ratio, unbiased_scaled};
use crate::measures::pair_table;
use crate::measures::rsa::unit_rows;
use crate::memory::{try_vec, Budget};
use crate::monitor::Monitor;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Rows of the Gram formed at a time.
const BLOCK: usize = 256;

/// One layer's `k` largest inner products per row (self excluded), each row's neighbours in
/// increasing column order.
#[derive(Debug, Clone)]
pub struct IpNeighbours {
    m: usize,
    k: usize,
    cols: Vec<u32>,
    vals: Vec<f64>,
}

impl IpNeighbours {
    fn row(&self, i: usize) -> (&[u32], &[f64]) {
        let r = i * self.k..(i + 1) * self.k;
        (&self.cols[r.clone()], &self.vals[r])
    }

    /// Rows of the sample.
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Peak bytes of [`prepare`] on `m` rows of width `d`: the unit-norm copy, one Gram block
/// and one candidate list per worker thread, and the lists it returns.
pub fn prepare_bytes(m: usize, d: usize, k: usize) -> u128 {
    let (m, d, k) = (m as u128, d as u128, k as u128);
    let threads = rayon::current_num_threads() as u128;
    m * d * 8 + BLOCK as u128 * m * 8 + threads * m * 4 + m * k * 12
}

/// Peak bytes of [`cknna_matrix`] over `layers` layers (the widest `dmax`): every layer's
/// lists and one layer's [`prepare`].
pub fn cknna_bytes(layers: usize, m: usize, dmax: usize, k: usize) -> u128 {
    layers as u128 * m as u128 * k as u128 * 12 + prepare_bytes(m, dmax, k)
}

/// The neighbour lists of one layer (`m × d` row-major; `normalize`: rows scaled to unit
/// norm first, a zero row staying zero).
pub fn prepare(x: &[f64], m: usize, d: usize, k: usize, normalize: bool) -> Result<IpNeighbours> {
    if Some(x.len()) != m.checked_mul(d) {
        return Err(Error::Mismatch(format!(
            "{} values are not {m} rows of {d}",
            x.len()
        )));
    }
    if m < 4 {
        return Err(Error::invalid(format!(
            "CKNNA (unbiased HSIC) needs at least 4 rows, got {m}"
        )));
    }
    if k == 0 || k >= m {
        return Err(Error::invalid(format!(
            "k must be in 1..{} (neighbours among the other {} rows), got {k}",
            m - 1,
            m - 1
        )));
    }
    if u32::try_from(m).is_err() {
        return Err(Error::invalid(format!("{m} rows (at most 2^32 − 1)")));
    }
    let unit;
    let x = if normalize {
        unit = unit_rows(x, d)?;
        &unit[..]
    } else {
        x
    };
    let all = MatRef::from_row_major_slice(x, m, d);
    let mut cols = try_vec(m * k, 0u32, "the neighbour lists")?;
    let mut vals = try_vec(m * k, 0.0f64, "the neighbour inner products")?;
    let mut g = try_vec(BLOCK.min(m) * m, 0.0f64, "a block of the Gram matrix")?;
    for r0 in (0..m).step_by(BLOCK) {
        crate::monitor::check_interrupt()?;
        let r1 = (r0 + BLOCK).min(m);
        let nb = r1 - r0;
        matmul(
            MatMut::from_row_major_slice_mut(&mut g[..nb * m], nb, m),
            Accum::Replace,
            MatRef::from_row_major_slice(&x[r0 * d..r1 * d], nb, d),
            all.transpose(),
            1.0,
            Par::rayon(0),
        );
        g[..nb * m]
            .par_chunks(m)
            .zip(cols[r0 * k..r1 * k].par_chunks_mut(k))
            .zip(vals[r0 * k..r1 * k].par_chunks_mut(k))
            .enumerate()
            .for_each(|(t, ((row, c), v))| {
                let i = r0 + t;
                let mut cand: Vec<u32> = (0..m as u32).filter(|&j| j as usize != i).collect();
                // larger inner product first, then the lower column
                let order = |a: &u32, b: &u32| -> Ordering {
                    row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b))
                };
                if k < cand.len() {
                    cand.select_nth_unstable_by(k - 1, order);
                }
                let top = &mut cand[..k];
                top.sort_unstable();
                for ((cj, vj), &j) in c.iter_mut().zip(v.iter_mut()).zip(top.iter()) {
                    *cj = j;
                    *vj = row[j as usize];
                }
            });
    }
    Ok(IpNeighbours { m, k, cols, vals })
}

/// `m(m−3) · HSIC₁(M∘K, M∘L)` for the mask of `p`'s and `q`'s neighbours (values of `K` from
/// `p`, of `L` from `q`): the sums of Song et al.'s eq. 5 over the masked entries.
fn masked_scaled(p: &IpNeighbours, q: &IpNeighbours) -> f64 {
    let m = p.m;
    // the mask row by row (sorted columns): (j, K_ij, L_ij)
    let rows: Vec<Vec<(u32, f64, f64)>> = (0..m)
        .map(|i| {
            let ((pc, pv), (qc, qv)) = (p.row(i), q.row(i));
            let (mut a, mut b) = (0, 0);
            let mut out = Vec::new();
            while a < pc.len() && b < qc.len() {
                match pc[a].cmp(&qc[b]) {
                    Ordering::Less => a += 1,
                    Ordering::Greater => b += 1,
                    Ordering::Equal => {
                        out.push((pc[a], pv[a], qv[b]));
                        a += 1;
                        b += 1;
                    }
                }
            }
            out
        })
        .collect();
    let (mut sum_k, mut sum_l, mut tr) = (0.0, 0.0, 0.0);
    let mut col_k = vec![0.0; m];
    let mut row_l = vec![0.0; m];
    for (i, r) in rows.iter().enumerate() {
        for &(j, kv, lv) in r {
            sum_k += kv;
            sum_l += lv;
            col_k[j as usize] += kv;
            row_l[i] += lv;
            // tr(K̃L̃) = Σ_ij K_ij L_ji: L_ji is masked in when i is in row j's mask
            let rj = &rows[j as usize];
            if let Ok(t) = rj.binary_search_by(|e| e.0.cmp(&(i as u32))) {
                tr += kv * rj[t].2;
            }
        }
    }
    let kl1: f64 = col_k.iter().zip(&row_l).map(|(a, b)| a * b).sum();
    unbiased_scaled(tr, sum_k, sum_l, kl1, m as u64)
}

/// CKNNA of a pair of prepared layers (the NaN rule of [`cka_ratio`]; `same`: one layer).
pub fn cknna_pair(p: &IpNeighbours, q: &IpNeighbours, same: bool) -> Result<f64> {
    check_pair(p, q)?;
    let (xy, xx, yy) = (
        masked_scaled(p, q),
        masked_scaled(p, p),
        masked_scaled(q, q),
    );
    Ok(cka_ratio(xy, xx, yy, same))
}

fn check_pair(p: &IpNeighbours, q: &IpNeighbours) -> Result<()> {
    if p.m != q.m || p.k != q.k {
        return Err(Error::Mismatch(format!(
            "CKNNA of layers prepared on {} and {} rows with k = {} and {}",
            p.m, q.m, p.k, q.k
        )));
    }
    Ok(())
}

/// CKNNA of every layer pair (row-major `La × Lb`, `[i, j]` = CKNNA(`K` of a's `i`, `L` of
/// b's `j`); `b = None`: `a × a`, the diagonal exactly 1 where defined). Not symmetric: the
/// masked Grams are not, and `1ᵀK̃L̃1 ≠ 1ᵀL̃K̃1`, so both orders of a pair are computed.
/// Checks [`cknna_bytes`] against `budget` before any work.
pub fn cknna_matrix(
    a: &super::Layers<'_>,
    b: Option<&super::Layers<'_>>,
    m: usize,
    k: usize,
    normalize: bool,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<Vec<f64>> {
    let (nl, dmax) = super::count_and_widest(a, b);
    budget.check(
        cknna_bytes(nl, m, dmax, k),
        format_args!("the {k}-neighbour lists of {nl} layers over {m} sampled rows"),
        "use a smaller sample (sample=...), a smaller k, or fewer layers",
    )?;
    let total = nl as u64 + 1;
    let mut done = 0u64;
    let mut prep = |layers: &super::Layers<'_>| -> Result<Vec<IpNeighbours>> {
        let mut out = Vec::with_capacity(layers.len());
        for (x, d) in layers {
            out.push(prepare(x, m, *d, k, normalize)?);
            done += 1;
            monitor.progress(done, total)?;
        }
        Ok(out)
    };
    let pa = prep(a)?;
    let pb = match b {
        Some(b) => Some(prep(b)?),
        None => None,
    };
    let selfs =
        |v: &[IpNeighbours]| -> Vec<f64> { v.par_iter().map(|p| masked_scaled(p, p)).collect() };
    let sa = selfs(&pa);
    let sb = pb.as_ref().map(|v| selfs(v));
    let ia: Vec<(usize, &IpNeighbours)> = pa.iter().enumerate().collect();
    let ib: Option<Vec<(usize, &IpNeighbours)>> =
        pb.as_ref().map(|v| v.iter().enumerate().collect());
    let within = b.is_none();
    // every ordered pair, also within one source: Align(K, L) ≠ Align(L, K) in general
    let out = pair_table(
        &ia,
        Some(ib.as_deref().unwrap_or(&ia)),
        |&(i, p), &(j, q)| {
            check_pair(p, q)?;
            let yy = sb.as_ref().map_or(sa[j], |s| s[j]);
            Ok(cka_ratio(masked_scaled(p, q), sa[i], yy, within && i == j))
        },
    )?;
    monitor.progress(total, total)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::NoMonitor;

    fn data(m: usize, d: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_add(0x9e3779b97f4a7c15);
        (0..m * d)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    /// The definition with dense matrices: masks, `K̃`, eq. 5 term by term.
    fn dense(x: &[f64], y: &[f64], m: usize, d: usize, e: usize, k: usize) -> f64 {
        let gram = |x: &[f64], d: usize| crate::testdata::naive_gram(x, m, d);
        let mask = |g: &[f64]| -> Vec<bool> {
            let mut mk = vec![false; m * m];
            for i in 0..m {
                let mut js: Vec<usize> = (0..m).filter(|&j| j != i).collect();
                js.sort_by(|&a, &b| g[i * m + b].total_cmp(&g[i * m + a]).then(a.cmp(&b)));
                for &j in &js[..k] {
                    mk[i * m + j] = true;
                }
            }
            mk
        };
        let align = |k1: &[f64], m1: &[bool], k2: &[f64], m2: &[bool]| -> f64 {
            let a: Vec<f64> = (0..m * m)
                .map(|t| if m1[t] && m2[t] { k1[t] } else { 0.0 })
                .collect();
            let b: Vec<f64> = (0..m * m)
                .map(|t| if m1[t] && m2[t] { k2[t] } else { 0.0 })
                .collect();
            let mf = m as f64;
            let mut tr = 0.0;
            for i in 0..m {
                for j in 0..m {
                    tr += a[i * m + j] * b[j * m + i];
                }
            }
            let (sa, sb): (f64, f64) = (a.iter().sum(), b.iter().sum());
            let mut kl1 = 0.0;
            for i in 0..m {
                for j in 0..m {
                    kl1 += (0..m).map(|t| a[i * m + t] * b[t * m + j]).sum::<f64>();
                }
            }
            (tr + sa * sb / ((mf - 1.0) * (mf - 2.0)) - 2.0 / (mf - 2.0) * kl1) / (mf * (mf - 3.0))
        };
        let (kx, ky) = (gram(x, d), gram(y, e));
        let (mx, my) = (mask(&kx), mask(&ky));
        align(&kx, &mx, &ky, &my) / (align(&kx, &mx, &kx, &mx) * align(&ky, &my, &ky, &my)).sqrt()
    }

    #[test]
    fn equals_the_dense_definition() {
        let (m, d, e) = (37, 5, 7);
        let x = data(m, d, 1);
        let mut y = data(m, e, 2);
        for i in 0..m {
            for f in 0..3 {
                y[i * e + f] += 2.0 * x[i * d + f]; // related
            }
        }
        for k in [1, 3, 10] {
            let want = dense(&x, &y, m, d, e, k);
            let got = cknna_matrix(
                &[(&x, d)],
                Some(&[(&y, e)]),
                m,
                k,
                false,
                &Budget::unchecked(),
                &NoMonitor,
            )
            .unwrap();
            assert!((got[0] - want).abs() < 1e-12, "k={k}: {} {want}", got[0]);
        }
        let w = cknna_matrix(
            &[(&x, d), (&y, e)],
            None,
            m,
            4,
            false,
            &Budget::unchecked(),
            &NoMonitor,
        )
        .unwrap();
        assert_eq!((w[0], w[3]), (1.0, 1.0));
        let (xy, yx) = (dense(&x, &y, m, d, e, 4), dense(&y, &x, m, e, d, 4));
        assert!((w[1] - xy).abs() < 1e-12 && (w[2] - yx).abs() < 1e-12);
        assert!(prepare(&x, m, d, m, false).is_err() && prepare(&x, m, d, 0, false).is_err());
    }
}
