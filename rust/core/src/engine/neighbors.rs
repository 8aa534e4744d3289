//! Engine 2: exact neighbours of an in-memory sample of points (row-major `m × d`, `f64`).
//!
//! * [`knn`]: the `k` nearest neighbours of every point (self excluded). Candidate lists come
//!   from f32 GEMM distance blocks `‖a‖² + ‖b‖² − 2 a·b` of the **column-centred** data
//!   (the packed kernel of [`crate::linalg::packed`], the sample packed once, rayon over row
//!   blocks, partial selection — no full sorts); the `k + 4`
//!   candidates of each row are then **re-computed exactly in f64 from the original
//!   coordinates** (`Σ (a_t − b_t)²`, no GEMM), re-ordered, and the best `k` kept.
//!   Candidates are ranked by a rigorous per-pair **lower bound** `lb_ij` = GEMM value −
//!   (bound on the f32 inner-product error `2γ_d‖a‖‖b‖` + the f32 rounding of the
//!   coordinates), so the certificate "k-th exact distance < smallest `lb` of the
//!   non-candidates" proves the result exact; when it fails, every non-candidate with
//!   `lb ≤` the k-th exact distance is recomputed exactly too (the others provably cannot
//!   enter). So neighbour sets and distances are exact (ties broken by index), one huge-norm
//!   row does not loosen the other rows' bounds, and cancellation can never fake a zero
//!   distance. Work: one `2m²d` f32 GEMM + `O(m²)` selection + `O(m·k·d)` exact f64.
//! * [`sq_distance_matrix`]: the full `m × m` matrix of squared distances (centred GEMM,
//!   rounding noise below 0 set to 0, diagonal exactly 0), for RBF kernels; RSA uses the
//!   GEMM-free [`exact_condensed_sq_distances`] so tied distances stay tied.
//! * [`dedup_knn`]: duplicate handling. Two points are duplicates when their exact distance is
//!   `≤ tol`; the default tolerance is [`DEFAULT_REL_TOL`] × the RMS radius of the sample
//!   (`sqrt(Σ_i ‖x_i − x̄‖² / m)`), i.e. relative to the data scale.
use crate::error::{Error, Result};
use crate::linalg::packed::{PackedA, PackedElem, Strided};
use crate::memory::{try_copy, try_vec, try_with_capacity, Budget};
use crate::monitor::Monitor;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A (value, index) pair ordered by value (total order), then index: heap entries.
#[derive(Debug, Clone, Copy)]
struct Item(f64, usize);

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// Default duplicate tolerance relative to the RMS radius of the sample.
pub const DEFAULT_REL_TOL: f64 = 1e-7;

/// Rows per GEMM block (a multiple of every kernel's `nr`, 6 and 12: no padded columns).
const BLOCK: usize = 144;

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

/// The products behind the neighbour measures — all but a sliver of their work — as a
/// value that can run elsewhere: the CPU here ([`Cpu`]), or a torch device through the
/// Python binding (`layerscope._device`). Everything made of them (lower bounds, the exact
/// f64 recheck of near neighbours, bandwidths, kernels, RDMs) stays in this crate, whichever
/// computes the products.
pub trait Products: Sync {
    /// `X Xᵀ` of the row-major `m × d` f64 matrix `x` (row-major `m × m`, f64 arithmetic;
    /// only the upper triangle is read).
    fn gram_f64(&self, x: RowMajor<'_, f64>) -> Result<Vec<f64>>;
    /// Rows `r0..r0 + nb` of `X Xᵀ` of the f32 matrix `x`, in blocks of at most `block` rows,
    /// each handed to `each(r0, rows)` (row-major `nb × m`) — IEEE f32 products with any
    /// summation order, delivered in f32 or summed further in f64 (the kNN lower bounds
    /// assume no more error than a sum of `d` f32 products: no TF32).
    fn f32_gram_blocks(&self, x: RowMajor<'_, f32>, block: usize, each: &GramSink) -> Result<()>;
    /// The condensed (`i < j`, row-major) exact squared distances `Σ (a − b)²`, from the
    /// differences (no GEMM: identical rows give exactly 0, tied distances stay tied).
    fn exact_condensed_sq(&self, x: RowMajor<'_, f64>) -> Result<Vec<f64>>;
}

/// A row-major `m × d` matrix handed to [`Products`]: `x[i·d + j]`.
#[derive(Debug, Clone, Copy)]
pub struct RowMajor<'a, T> {
    pub x: &'a [T],
    pub m: usize,
    pub d: usize,
}

/// What [`Products::f32_gram_blocks`] hands each block to: `each(r0, rows)`.
pub type GramSink<'a> = dyn Fn(usize, GramRows<'_>) -> Result<()> + Sync + 'a;

/// A block of rows of `X Xᵀ` handed to the kNN selection: f32 values (a device), or the
/// CPU's packed kernel's f64 sums of f32 products (chains of at most 128 f32 products,
/// summed in f64: no more error than one f32 sum of all `d`).
#[derive(Debug, Clone, Copy)]
pub enum GramRows<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl GramRows<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            GramRows::F32(g) => g.len(),
            GramRows::F64(g) => g.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The products on this machine's CPU (the packed kernels, rayon).
pub struct Cpu;

impl Products for Cpu {
    fn gram_f64(&self, RowMajor { x, m, d }: RowMajor<'_, f64>) -> Result<Vec<f64>> {
        crate::linalg::gram(x, m, d) // the packed SYRK, mirrored
    }

    /// `X` is packed once ([`PackedA`]: the `mr`-row panels the micro-kernel reads), then
    /// each block of rows is packed and multiplied against it by one thread (rayon over
    /// blocks; each thread's block and panel buffers are reused, so no block page-faults).
    fn f32_gram_blocks(&self, x: RowMajor<'_, f32>, block: usize, each: &GramSink) -> Result<()> {
        let RowMajor { x, m, d } = x;
        if m == 0 {
            return Ok(());
        }
        let block = block.max(1);
        // U = Xᵀ (d × m): element (feature p, row c) = x[c·d + p].
        let all = PackedA::new(
            f32::kernel(),
            Strided {
                u: x,
                k: d,
                n: m,
                rs: 1,
                cs: d,
            },
        )?;
        (0..m.div_ceil(block)).into_par_iter().try_for_each_init(
            || (Vec::<f64>::new(), Vec::<f32>::new()),
            |(g, pack), b| -> Result<()> {
                let r0 = b * block;
                let nb = block.min(m - r0);
                if g.len() < nb * m {
                    *g = Vec::new();
                    *g = crate::linalg::hinted_vec(
                        block.min(m) * m,
                        "a block of the distance matrix",
                    )?;
                } else {
                    g[..nb * m].fill(0.0);
                }
                let rows = Strided {
                    u: &x[r0 * d..],
                    k: d,
                    n: nb,
                    rs: 1,
                    cs: d,
                };
                // C (m × nb, column-major) = row-major nb × m: row r of the block at r·m.
                all.gemm_tn_add_seq(&mut g[..nb * m], m, rows, pack)?;
                each(r0, GramRows::F64(&g[..nb * m]))
            },
        )
    }

    fn exact_condensed_sq(&self, RowMajor { x, m, d }: RowMajor<'_, f64>) -> Result<Vec<f64>> {
        let len = m * m.saturating_sub(1) / 2;
        let what = format!("the condensed {m}-row distance matrix ({len} pairs)");
        let mut out = try_vec(len, 0.0f64, &what)?;
        // Row i's pairs (i, i+1..m) are one contiguous run of m − 1 − i values.
        let mut runs: Vec<(usize, &mut [f64])> = Vec::with_capacity(m);
        let mut rest: &mut [f64] = &mut out;
        for i in 0..m {
            let (run, tail) = rest.split_at_mut(m - 1 - i.min(m - 1));
            runs.push((i, run));
            rest = tail;
        }
        runs.into_par_iter().try_for_each(|(i, run)| {
            crate::monitor::check_interrupt()?; // per row: m·d flops at most between checks
            let xi = &x[i * d..(i + 1) * d];
            for (v, j) in run.iter_mut().zip((i + 1)..m) {
                *v = exact_sq_dist(xi, &x[j * d..(j + 1) * d]);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

impl<'a> RowMajor<'a, f64> {
    /// The view, when `x` holds `m × d` finite values and `d > 0` (InvalidArgument, NonFinite).
    pub fn checked(self) -> Result<Self> {
        let RowMajor { x, m, d } = self;
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
        Ok(self)
    }
}

/// Column-centred copy of `x` and the squared norms of its rows.
fn centred(x: &[f64], m: usize, d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        for (s, v) in mean.iter_mut().zip(row) {
            *s += v;
        }
    }
    for s in mean.iter_mut() {
        *s /= m as f64;
    }
    let mut xc = try_copy(x, format_args!("the centred {m} × {d} sample"))?;
    xc.par_chunks_mut(d).for_each(|row| {
        for (v, mu) in row.iter_mut().zip(&mean) {
            *v -= mu;
        }
    });
    let norms = xc
        .par_chunks(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect();
    Ok((xc, norms))
}

/// Peak bytes of [`knn`] on `m` points of width `d`: the centred f64 and f32 copies and the
/// packed f32 copy, per worker thread one `BLOCK × m` f64 distance block, its packed rows,
/// one candidate list and one row of lower bounds, and the `m × k` neighbour lists — plus,
/// for [`dedup_knn`], one more copy of the sample when duplicates are dropped.
pub fn knn_bytes(m: usize, d: usize, k: usize) -> u128 {
    let packed = PackedA::<f32>::bytes(d, m);
    let (m, d, k) = (m as u128, d as u128, k as u128);
    let threads = rayon::current_num_threads() as u128;
    let per_thread = BLOCK as u128 * m * 8 + (BLOCK as u128 + 31) * d * 4 + m * 24;
    m * d * (8 + 4 + 8) + packed + threads * per_thread + m * k * 16
}

fn check_knn(m: usize, d: usize, k: usize, budget: &Budget) -> Result<()> {
    budget.check(
        knn_bytes(m, d, k),
        format_args!("the exact {k}-nearest-neighbour graph of {m} sampled rows × {d} features"),
        format_args!("use a smaller sample (sample=...) or a smaller k"),
    )
}

/// Root mean squared distance of the points to their centroid, `sqrt(Σ_i ‖x_i − x̄‖² / m)`.
pub fn rms_radius(x: &[f64], m: usize, d: usize) -> Result<f64> {
    RowMajor { x, m, d }.checked()?;
    if m == 0 {
        return Ok(0.0);
    }
    let (_, norms) = centred(x, m, d)?;
    Ok((norms.iter().sum::<f64>() / m as f64).sqrt())
}

/// Exact squared Euclidean distance between two rows (f64, no GEMM): `Σ_t (a_t − b_t)²`
/// from the differences themselves (identical rows give exactly 0), summed in 8 independent
/// lanes (vectorisable, no long dependency chain) and then pairwise. Deterministic for a pair
/// and symmetric in `a`, `b`.
#[inline]
pub fn exact_sq_dist(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| (p - q) * (p - q))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, p), q) in acc.iter_mut().zip(x).zip(y) {
            let e = p - q;
            *s += e * e;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Exact k nearest neighbours (self excluded) of the `m` rows of `x` (row-major `m × d`),
/// the f32 distance products computed by `prod` ([`Cpu`]: the packed kernels; the lower
/// bounds, the selection and the exact f64 recheck stay here).
///
/// Errors: `k == 0` or `k ≥ m` (InvalidArgument), non-finite values (NonFinite).
/// Fails with [`Error::Memory`] before any work when [`knn_bytes`] exceeds `budget`.
pub fn knn(
    points: RowMajor<'_, f64>,
    k: usize,
    budget: &Budget,
    monitor: &dyn Monitor,
    prod: &dyn Products,
) -> Result<Knn> {
    let RowMajor { x, m, d } = points.checked()?;
    if k == 0 || k >= m {
        return Err(Error::invalid(format!(
            "k = {k} neighbours needs 1 ≤ k < number of points ({m})"
        )));
    }
    check_knn(m, d, k, budget)?;
    let (xc, norms64) = centred(x, m, d)?;
    // Candidates from an f32 GEMM of the centred data; certified below.
    let mut xc32: Vec<f32> = try_with_capacity(m * d, "the f32 copy of the sample")?;
    xc32.extend(xc.iter().map(|&v| v as f32));
    let norms: Vec<f64> = xc32
        .par_chunks(d)
        .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect();
    let len: Vec<f64> = norms64.iter().map(|v| v.sqrt()).collect();
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = d as f64 * u / (1.0 - d as f64 * u).max(1e-3);
    let kc = (k + 4).min(m - 1);
    // lb_parts: the error of the GEMM value n_a + n_b − 2·g_ab is at most
    // E_ab = 2γ_d‖a‖‖b‖(1 + 4u) + (3u + 1e-12)(‖a‖ + ‖b‖)²: the f32 inner-product error (any
    // summation order), the f32 rounding of the centred coordinates, slack for the f64
    // centring and for evaluating this bound. Expanded so a pair costs four flops:
    // lb_ab = (n_a − B‖a‖²) + (n_b − B‖b‖²) − 2g_ab − (A + 2B)‖a‖‖b‖. Per pair, so one
    // huge-norm row does not loosen every other row's bound.
    let bsl = 3.0 * u + 1e-12;
    let acoef = 2.0 * gamma * (1.0 + 4.0 * u) + 2.0 * bsl;
    let p: Vec<f64> = norms
        .iter()
        .zip(&len)
        .map(|(n, l)| n - bsl * l * l)
        .collect();
    let done = std::sync::atomic::AtomicU64::new(0);
    // The m × k lists are allocated once, up front (the largest buffer: a refusal comes
    // before any work), and each row block fills its own rows (one slot per block).
    let mut dist = try_vec(m * k, 0.0f64, "the neighbour lists")?;
    let mut idx = try_vec(m * k, 0usize, "the neighbour lists")?;
    let slots: Vec<std::sync::Mutex<(&mut [f64], &mut [usize])>> = dist
        .chunks_mut(BLOCK * k)
        .zip(idx.chunks_mut(BLOCK * k))
        .map(std::sync::Mutex::new)
        .collect();
    let each = |r0: usize, g: GramRows<'_>| -> Result<()> {
        let nb = g.len() / m.max(1);
        if !r0.is_multiple_of(BLOCK) || nb == 0 || nb > BLOCK || g.len() != nb * m || r0 + nb > m {
            return Err(Error::Mismatch(format!(
                "a distance block of {} values at row {r0} (blocks of {BLOCK} rows × {m})",
                g.len()
            )));
        }
        let mut slot = slots[r0 / BLOCK]
            .lock()
            .map_err(|_| Error::invalid("a neighbour block's lock was poisoned"))?;
        let (dist, idx) = &mut *slot;
        let mut cand: Vec<(f64, usize)> = try_with_capacity(m, "a candidate list")?;
        let mut lbs: Vec<f64> = try_with_capacity(m, "a row of lower bounds")?;
        let mut heap: BinaryHeap<Item> = BinaryHeap::with_capacity(kc + 2);
        for r in 0..nb {
            let i = r0 + r;
            // Lower bound on the true squared distance of every pair (see `lb_parts`):
            // lb_ij = q_i + p_j − 2·g_ij − c_i·‖b_j‖, for the whole row first (a loop the
            // compiler vectorises), then selected.
            let (qi, ci) = (norms[i] - bsl * len[i] * len[i], acoef * len[i]);
            lbs.clear();
            match g {
                GramRows::F64(g) => lbs.extend(
                    g[r * m..(r + 1) * m]
                        .iter()
                        .zip(&p)
                        .zip(&len)
                        .map(|((&gij, &pj), &lj)| qi + pj - 2.0 * gij - ci * lj),
                ),
                GramRows::F32(g) => lbs.extend(
                    g[r * m..(r + 1) * m]
                        .iter()
                        .zip(&p)
                        .zip(&len)
                        .map(|((&gij, &pj), &lj)| qi + pj - 2.0 * f64::from(gij) - ci * lj),
                ),
            }
            // The kc smallest lower bounds are the candidates (a bounded max-heap of
            // kc + 1 and its largest value kept at hand: most pairs cost one comparison);
            // thr = the (kc+1)-th smallest, a lower bound for every non-candidate.
            heap.clear();
            let cap = (kc + 1).min(m - 1);
            let mut j0 = 0;
            while heap.len() < cap {
                if j0 != i {
                    heap.push(Item(lbs[j0], j0));
                }
                j0 += 1;
            }
            // The rest: one comparison per pair (NaN never compares below: the point
            // itself is never a candidate; nor in the recheck below, which skips it).
            lbs[i] = f64::NAN;
            let mut top = heap.peek().map_or(f64::INFINITY, |t| t.0);
            for (j, &v) in lbs.iter().enumerate().skip(j0) {
                if v < top {
                    if let Some(mut t) = heap.peek_mut() {
                        *t = Item(v, j);
                    }
                    top = heap.peek().map_or(f64::INFINITY, |t| t.0);
                }
            }
            let mut thr = f64::INFINITY;
            if cap > kc {
                if let Some(t) = heap.pop() {
                    thr = t.0;
                }
            }
            cand.clear();
            cand.extend(heap.drain().map(|it| (it.0, it.1)));
            let xi = &x[i * d..(i + 1) * d];
            for c in cand.iter_mut() {
                c.0 = exact_sq_dist(xi, &x[c.1 * d..(c.1 + 1) * d]);
            }
            cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            // Certificate: every non-candidate j has true d² ≥ lb_j ≥ thr. If the k-th
            // exact distance is below thr the k best are exact. Otherwise the answer
            // is the k best (exact) of {j : lb_j ≤ k-th}: the others have true d²
            // above it, so they cannot enter, not even on a tie.
            let kth = cand.get(k - 1).map_or(f64::INFINITY, |c| c.0);
            if kth >= thr {
                cand.clear();
                for (j, &v) in lbs.iter().enumerate() {
                    if j != i && v <= kth {
                        cand.push((exact_sq_dist(xi, &x[j * d..(j + 1) * d]), j));
                    }
                }
                cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            }
            for (t, c) in cand.iter().take(k).enumerate() {
                dist[r * k + t] = c.0.sqrt();
                idx[r * k + t] = c.1;
            }
        }
        let n = done.fetch_add(nb as u64, std::sync::atomic::Ordering::Relaxed) + nb as u64;
        monitor.progress(n, m as u64)
    };
    prod.f32_gram_blocks(RowMajor { x: &xc32, m, d }, BLOCK, &each)?;
    drop(slots);
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
    /// The policies by name, in the order an error lists them.
    pub const NAMES: [(&'static str, Duplicates); 3] = [
        ("drop", Duplicates::Drop),
        ("error", Duplicates::Error),
        ("keep", Duplicates::Keep),
    ];

    pub fn parse(s: &str) -> Result<Self> {
        crate::error::choice("duplicates", s, &Self::NAMES)
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
/// The distance products are computed by `prod` ([`knn`]).
#[allow(clippy::too_many_arguments)]
pub fn dedup_knn(
    x: &[f64],
    m: usize,
    d: usize,
    k: usize,
    tol: Option<f64>,
    policy: Duplicates,
    budget: &Budget,
    monitor: &dyn Monitor,
    prod: &dyn Products,
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
        let g = knn(RowMajor { x: data, m: mm, d }, k, budget, monitor, prod)?;
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
        drop(buf.take()); // free the previous round's copy first
        let mut nb = try_with_capacity(new_kept.len() * d, "the sample without duplicates")?;
        for &r in &new_kept {
            nb.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        kept = new_kept;
        buf = Some(nb);
    }
}

/// Copy the upper triangle of the row-major `m × m` matrix `g` onto its lower triangle
/// (exact symmetry), in 64 × 64 tiles so that the strided side stays in cache.
pub fn mirror_upper(g: &mut [f64], m: usize) {
    const T: usize = 64;
    for bi in (0..m).step_by(T) {
        for bj in (bi..m).step_by(T) {
            for i in bi..(bi + T).min(m) {
                for j in bj.max(i + 1)..(bj + T).min(m) {
                    g[j * m + i] = g[i * m + j];
                }
            }
        }
    }
}

/// Full `m × m` matrix of squared Euclidean distances (row-major), from the Gram of the
/// column-centred data computed by `prod` ([`Cpu`]: the packed SYRK); rounding noise below 0
/// is set to 0 and the diagonal is exactly 0. Fails with a Memory error when the matrix and
/// the centred copy (`(m² + m·d) × 8` bytes) exceed `budget`.
pub fn sq_distance_matrix(
    points: RowMajor<'_, f64>,
    budget: &Budget,
    prod: &dyn Products,
) -> Result<Vec<f64>> {
    let RowMajor { x, m, d } = points.checked()?;
    let need = (m as u128 * m as u128 + m as u128 * d as u128) * 8;
    budget.check(
        need,
        format_args!("the {m} × {m} distance matrix"),
        "use a smaller sample (sample=...)",
    )?;
    let (xc, norms) = centred(x, m, d)?;
    let mut g = prod.gram_f64(RowMajor { x: &xc, m, d })?;
    if g.len() != m * m {
        return Err(Error::Mismatch(format!(
            "a Gram of {} values for {m} rows",
            g.len()
        )));
    }
    crate::monitor::check_interrupt()?;
    // From the row-major upper triangle: d²_ij = ‖a‖² + ‖b‖² − 2⟨a, b⟩ (rounding noise below
    // 0 set to 0), the diagonal exactly 0, then mirrored (exact symmetry).
    g.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, row)| {
        row[i] = 0.0;
        for (j, v) in row.iter_mut().enumerate().skip(i + 1) {
            *v = (norms[i] + norms[j] - 2.0 * *v).max(0.0);
        }
    });
    mirror_upper(&mut g, m);
    Ok(g)
}

/// Condensed (upper-triangle, `i < j`, row-major) **exact** squared distances `Σ (a − b)²`
/// computed by `prod` directly from the coordinates (no GEMM, so tied distances stay exactly
/// tied — what rank-based comparisons need). Cost `m² d / 2`.
pub fn exact_condensed_sq_distances(
    points: RowMajor<'_, f64>,
    budget: &Budget,
    prod: &dyn Products,
) -> Result<Vec<f64>> {
    let m = points.checked()?.m;
    let len = (m as u128) * (m as u128).saturating_sub(1) / 2;
    let what = format!("the condensed {m}-row distance matrix ({len} pairs)");
    budget.check(len * 8, &what, "use a smaller sample (sample=...)")?;
    let out = prod.exact_condensed_sq(points)?;
    if out.len() as u128 != len {
        return Err(Error::Mismatch(format!(
            "{} condensed distances for {m} rows ({len} pairs)",
            out.len()
        )));
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

    /// The kNN graph of `x`, checked against [`brute`].
    fn knn_is_brute_force(x: &[f64], m: usize, d: usize, k: usize) -> Knn {
        let un = Budget::unchecked();
        let g = knn(RowMajor { x, m, d }, k, &un, &NoMonitor, &Cpu).unwrap();
        for (i, bi) in brute(x, m, d, k).iter().enumerate() {
            assert_eq!(g.neighbours(i), &bi[..]);
        }
        g
    }

    #[test]
    fn knn_matches_brute_force_with_offset() {
        let (m, d, k) = (300, 7, 5);
        let mut x = lcg(m * d, 3);
        for (t, v) in x.iter_mut().enumerate() {
            *v = (*v + 1000.0 * (t % d) as f64) as f32 as f64;
        }
        knn_is_brute_force(&x, m, d, k);
    }

    #[test]
    fn knn_exact_when_gemm_cancels() {
        // Two clusters far apart (centring cannot remove the separation), stored f32: the
        // f32 GEMM distances inside a cluster are noise; results must still be exact.
        let (m, d, k) = (240, 16, 6);
        let mut x = lcg(m * d, 7);
        for (t, v) in x.iter_mut().enumerate() {
            let sign = if t / d < m / 2 { 1.0 } else { -1.0 };
            *v = (*v + sign * 3e4 + 50.0 * (t % d) as f64) as f32 as f64;
        }
        // plus one row with a huge norm
        for v in x[5 * d..6 * d].iter_mut() {
            *v *= 1e3;
        }
        let g = knn_is_brute_force(&x, m, d, k);
        assert!(g.dist.iter().all(|&v| v > 0.0));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let bad = |x: &[f64], m: usize, d: usize| {
            knn(
                RowMajor { x, m, d },
                1,
                &Budget::unchecked(),
                &NoMonitor,
                &Cpu,
            )
            .is_err()
        };
        assert!(bad(&[], 0, 3));
        assert!(bad(&[1.0, 2.0], 1, 2));
        assert!(bad(&[1.0, 2.0, 3.0], 2, 2));
        assert!(bad(&[1.0, f64::NAN, 3.0, 4.0], 2, 2));
        assert!(bad(&[1.0, 2.0], 2, 0));
        let x = lcg(40, 1);
        assert!(dedup_knn(
            &x,
            10,
            4,
            2,
            Some(-1.0),
            Duplicates::Drop,
            &Budget::unchecked(),
            &NoMonitor,
            &Cpu,
        )
        .is_err());
        // all rows identical: dropping leaves one point, too few for k = 2
        let same = vec![1.5; 40];
        assert!(dedup_knn(
            &same,
            10,
            4,
            2,
            None,
            Duplicates::Drop,
            &Budget::unchecked(),
            &NoMonitor,
            &Cpu,
        )
        .is_err());
        assert!(
            sq_distance_matrix(RowMajor { x: &x, m: 11, d: 4 }, &Budget::unchecked(), &Cpu)
                .is_err()
        );
    }

    #[test]
    fn duplicates_dropped() {
        let (m, d, k) = (200, 4, 3);
        let mut x = lcg(m * d, 5);
        for r in 0..10 {
            let src: Vec<f64> = x[r * d..(r + 1) * d].to_vec();
            x[(100 + r) * d..(101 + r) * d].copy_from_slice(&src);
        }
        let r = dedup_knn(
            &x,
            m,
            d,
            k,
            None,
            Duplicates::Drop,
            &Budget::unchecked(),
            &NoMonitor,
            &Cpu,
        )
        .unwrap();
        assert_eq!(r.duplicates, 10);
        assert_eq!(r.kept.len(), 190);
        assert!(dedup_knn(
            &x,
            m,
            d,
            k,
            None,
            Duplicates::Error,
            &Budget::unchecked(),
            &NoMonitor,
            &Cpu,
        )
        .is_err());
        for k in [0, m] {
            let un = Budget::unchecked();
            assert!(knn(RowMajor { x: &x, m, d }, k, &un, &NoMonitor, &Cpu).is_err());
        }
    }

    #[test]
    fn distance_matrix_matches() {
        let (m, d) = (50, 6);
        let x = lcg(m * d, 9);
        let g = sq_distance_matrix(RowMajor { x: &x, m, d }, &Budget::unchecked(), &Cpu).unwrap();
        for (i, gi) in g.chunks_exact(m).enumerate() {
            for (j, gij) in gi.iter().enumerate() {
                let e = exact_sq_dist(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d]);
                assert!((gij - e).abs() < 1e-12);
            }
        }
        let small = Budget::argument(10).unwrap();
        assert!(sq_distance_matrix(RowMajor { x: &x, m, d }, &small, &Cpu).is_err());
    }
}
