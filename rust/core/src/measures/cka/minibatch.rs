//! Minibatch CKA (Nguyen, Raghu & Kornblith 2021, ICLR, "Do wide and deep networks learn
//! the same things? Uncovering how neural network representations vary with width and
//! depth", section 3.1): the unbiased HSIC of every layer pair averaged over consecutive
//! minibatches of the row stream, linear or RBF kernel, in constant memory.
//!
//! # Estimator
//! The rows are cut, in stream order, into consecutive minibatches `b = 1 … B` of `m` rows
//! (`m = batch_size`; a final shorter batch is used when it has at least 4 rows, and dropped
//! otherwise). On each minibatch and for each layer the Gram matrix `K` (`m × m`) is built,
//! and for every layer pair the unbiased HSIC of Song et al. (2012, JMLR 13, eq. 5):
//!
//! ```text
//! HSIC₁(K, L) = [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((m−1)(m−2)) − 2/(m−2) · 1ᵀK̃L̃1 ] / (m(m−3))
//! ```
//!
//! with `K̃ = K − diag(K)`. Then
//!
//! ```text
//! CKA_minibatch(X, Y) = mean_b HSIC₁(K_b, L_b) / sqrt( mean_b HSIC₁(K_b, K_b) · mean_b HSIC₁(L_b, L_b) )
//! ```
//!
//! (every batch weighs the same: each batch's HSIC₁ is an unbiased estimate of the same
//! population HSIC). Values can be negative and are never clamped; a non-positive mean
//! self-HSIC gives NaN (no made-up number).
//!
//! # Kernels
//! * Linear: `K = X̄X̄ᵀ` where `X̄` is the minibatch centred at its own column means (in
//!   f64). HSIC₁ is exactly invariant to adding `f(x_a) + f(x_b)` to the kernel, so centring
//!   changes nothing mathematically — it only keeps the products small: LLM activations carry
//!   per-feature offsets hundreds of times their spread, and uncentred Grams of them cancel
//!   catastrophically.
//! * RBF: `K_ab = exp(−‖x_a − x_b‖² / (2 bw²))` with the bandwidth of Kornblith et al.
//!   (2019): `bw = σ · sqrt(median of all m² squared distances of the minibatch, diagonal
//!   included)`, recomputed **per minibatch** ([`crate::measures::cka::rbf::rbf_gram`]); the
//!   mean bandwidth over batches is reported per layer.
//!
//! All arithmetic is f64 (f32/bf16/f16 inputs are widened first). Memory: one `m × m` Gram
//! per layer plus the rows of one partial batch — independent of the number of rows.
use crate::engine::moments::{ldexp, max_deviation, scale_exponent};
use crate::engine::neighbors::{mirror_upper, Cpu, Products, RowMajor};
use crate::error::{Error, Result};
use crate::linalg::gram;
use crate::measures::cka::rbf::{rbf_gram_with, rbf_gram_workspace_bytes};
use crate::measures::hsic::{cka_ratio, hsic, Estimator, Gram};
use crate::memory::{max_rows_for, try_vec, Budget};
use crate::monitor::Monitor;
use crate::store::stream::{self, RowSource};
use crate::store::Element;
use rayon::prelude::*;

/// Rows per minibatch when the caller gives none (Nguyen et al. 2021 use minibatches of a
/// few hundred rows; 256 keeps one Gram per layer at 512 KiB).
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// The kernel of a minibatch CKA.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kernel {
    /// `k(x, y) = xᵀy` (on minibatch-centred data; see the module docs).
    Linear,
    /// Gaussian RBF, bandwidth `sigma × sqrt(median squared distance)` per minibatch.
    Rbf { sigma: f64 },
}

impl Kernel {
    /// `"linear"` or `"rbf"` (with `sigma` for the latter).
    pub fn parse(name: &str, sigma: f64) -> Result<Kernel> {
        let kernels = [("linear", Kernel::Linear), ("rbf", Kernel::Rbf { sigma })];
        let kernel = crate::error::choice("kernel", name, &kernels)?;
        if matches!(kernel, Kernel::Rbf { .. }) && !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::invalid(format!("sigma must be > 0, got {sigma}")));
        }
        Ok(kernel)
    }
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Linear => "linear",
            Kernel::Rbf { .. } => "rbf",
        }
    }
}

/// Bytes a minibatch CKA over layers `dims` with minibatches of `batch_size` rows needs:
/// one `m × m` f64 Gram per layer, plus the f64 rows of one batch (carry and centred copy).
/// Layers are prepared in parallel, so up to one Gram workspace (the centred copy and the
/// median's half Gram, [`rbf_gram_workspace_bytes`]) per worker thread comes on top.
pub fn minibatch_bytes(dims: &[usize], batch_size: usize) -> u128 {
    let m = batch_size as u128;
    let d: u128 = dims.iter().map(|&d| d as u128).sum();
    let dmax = dims.iter().copied().max().unwrap_or(0);
    let workers = rayon::current_num_threads().min(dims.len()) as u128;
    dims.len() as u128 * m * m * 8
        + 2 * m * d * 8
        + workers * rbf_gram_workspace_bytes(batch_size, dmax)
}

/// The streaming minibatch-CKA accumulator: feed row blocks of any size with
/// [`update`](Self::update) (they are cut into consecutive minibatches across block
/// boundaries), then [`finish`](Self::finish).
#[derive(Debug)]
pub struct MinibatchCka {
    dims: Vec<usize>,
    names: Vec<String>,
    kernel: Kernel,
    batch_size: usize,
    /// Layers `0..num_a` are the first source; with `num_a < L` only the pairs
    /// `(a-layer, b-layer)` and the self-pairs are computed.
    num_a: usize,
    /// Unordered pairs `(i, j)`, `i ≤ j`, whose HSIC is accumulated.
    pairs: Vec<(usize, usize)>,
    sums: Vec<f64>,
    bw_sums: Vec<f64>,
    batches: u64,
    rows_used: u64,
    rows_seen: u64,
    expected_rows: u64,
    /// Rows of the current, incomplete minibatch (f64, row-major, per layer).
    carry: Vec<Vec<f64>>,
    carry_rows: usize,
    check_finite: bool,
    nonfinite: Vec<Option<u64>>,
    /// Per layer the scale exponent fixed by the first minibatch
    /// ([`crate::engine::moments::SCALE_BAND`]): its rows are multiplied by `2^-e` before
    /// the Gram, in every batch (one unit per layer, so that the batch means add up).
    exps: Option<Vec<i32>>,
    /// Where the minibatch Grams' products run (None: this CPU; see
    /// [`MinibatchCka::with_products`]).
    products: Option<SharedProducts>,
}

/// A [`Products`] shared with the accumulator (a torch device through the binding).
#[derive(Clone)]
pub struct SharedProducts(pub std::sync::Arc<dyn Products + Send + Sync>);

impl std::fmt::Debug for SharedProducts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Products")
    }
}

/// The finished estimate: mean unbiased HSIC of the computed pairs and the CKA they give.
#[derive(Clone, Debug)]
pub struct MinibatchHsic {
    pub dims: Vec<usize>,
    pub names: Vec<String>,
    pub kernel: Kernel,
    pub batch_size: usize,
    pub num_a: usize,
    /// Number of minibatches averaged.
    pub batches: u64,
    /// Rows in those minibatches.
    pub rows_used: u64,
    /// Rows fed (the difference, < 4, was a final batch too short for HSIC₁).
    pub rows_seen: u64,
    /// `hsic[i * L + j]`: mean HSIC₁ over batches (symmetric; NaN for pairs not computed and
    /// for layers holding non-finite values).
    pub hsic: Vec<f64>,
    /// Mean RBF bandwidth over batches per layer, in the data's units (NaN for the linear
    /// kernel).
    pub bandwidths: Vec<f64>,
    /// First row holding a NaN/Inf per layer (only when finiteness was not enforced).
    pub nonfinite: Vec<Option<u64>>,
    /// Per layer the scale exponent `e` of the pass: `hsic[i * L + j]` is in units of
    /// `2^-2(e_i + e_j)` (0 for every ordinary layer; CKA is free of them).
    pub scale_exp: Vec<i32>,
}

impl MinibatchCka {
    /// An accumulator for layers of widths `dims` (all pairs; see
    /// [`with_num_a`](Self::with_num_a) for two sources), minibatches of `batch_size ≥ 4`.
    pub fn new(dims: &[usize], kernel: Kernel, batch_size: usize) -> Result<Self> {
        if dims.is_empty() {
            return Err(Error::invalid("minibatch CKA needs at least one layer"));
        }
        if dims.contains(&0) {
            return Err(Error::invalid("a layer of width 0 has no CKA"));
        }
        if batch_size < 4 {
            return Err(Error::invalid(format!(
                "batch_size must be at least 4 (the unbiased HSIC divides by m − 3), got \
                 {batch_size}"
            )));
        }
        if let Kernel::Rbf { sigma } = kernel {
            if !(sigma.is_finite() && sigma > 0.0) {
                return Err(Error::invalid(format!("sigma must be > 0, got {sigma}")));
            }
        }
        // Refuse what cannot be allocated at all (a budget is checked by with_budget).
        let need = minibatch_bytes(dims, batch_size);
        if need > (isize::MAX as u128) / 2 {
            return Err(Error::Memory(format!(
                "minibatches of {batch_size} rows need {need} bytes of Gram matrices; use a \
                 smaller batch_size"
            )));
        }
        let l = dims.len();
        let mut acc = MinibatchCka {
            dims: dims.to_vec(),
            names: (0..l).map(|i| format!("layer{i}")).collect(),
            kernel,
            batch_size,
            num_a: l,
            pairs: Vec::new(),
            sums: Vec::new(),
            bw_sums: try_vec(l, 0.0, "the bandwidth sums")?,
            batches: 0,
            rows_used: 0,
            rows_seen: 0,
            expected_rows: 0,
            carry: dims.iter().map(|_| Vec::new()).collect(),
            carry_rows: 0,
            check_finite: true,
            nonfinite: vec![None; l],
            exps: None,
            products: None,
        };
        acc.set_pairs(l);
        Ok(acc)
    }

    /// Compute each minibatch's Gram products with `p` (linear: `X̄ X̄ᵀ` in f64; RBF: the
    /// squared distances' Gram): everything made of them — centring, bandwidth, kernel, the
    /// unbiased HSIC — stays here.
    pub fn with_products(mut self, p: SharedProducts) -> Self {
        self.products = Some(p);
        self
    }

    fn set_pairs(&mut self, num_a: usize) {
        let l = self.dims.len();
        self.num_a = num_a;
        self.pairs = (0..l)
            .flat_map(|i| (i..l).map(move |j| (i, j)))
            .filter(|&(i, j)| num_a == l || i == j || (i < num_a && j >= num_a))
            .collect();
        self.sums = vec![0.0; self.pairs.len()];
    }

    /// Layer names (used in error messages and carried into the result).
    pub fn with_names(mut self, names: &[String]) -> Result<Self> {
        if names.len() != self.dims.len() {
            return Err(Error::invalid(format!(
                "{} names for {} layers",
                names.len(),
                self.dims.len()
            )));
        }
        self.names = names.to_vec();
        Ok(self)
    }

    /// Two sources: layers `0..num_a` come from the first, the rest from the second; only
    /// cross pairs (and self-pairs, for the normalisation) are computed.
    pub fn with_num_a(mut self, num_a: usize) -> Result<Self> {
        let l = self.dims.len();
        if num_a == 0 || num_a > l {
            return Err(Error::invalid(format!(
                "num_a = {num_a} must be between 1 and the {l} layers"
            )));
        }
        self.set_pairs(num_a);
        Ok(self)
    }

    /// `true` (default): a NaN/Inf is an [`Error::NonFinite`] naming the layer and row.
    /// `false`: the layer's cells become NaN (first bad row recorded in the result).
    pub fn with_check_finite(mut self, check: bool) -> Self {
        self.check_finite = check;
        self
    }

    /// Fail with [`Error::Memory`] (giving the options) when the Grams and batch buffers
    /// ([`minibatch_bytes`]) would exceed `budget`.
    pub fn with_budget(self, budget: &Budget) -> Result<Self> {
        let (l, m) = (self.dims.len(), self.batch_size);
        budget.check(
            minibatch_bytes(&self.dims, m),
            format_args!("minibatch CKA over {l} layers (one {m} × {m} Gram per layer)"),
            format_args!(
                "use a smaller batch_size (at most {} fits with these {l} layers) or fewer \
                 layers per call",
                max_rows_for(budget.bytes, |r| minibatch_bytes(&self.dims, r as usize))
            ),
        )?;
        Ok(self)
    }

    /// The total number of rows that will be fed (only used for progress reports).
    pub fn with_expected_rows(mut self, n: u64) -> Self {
        self.expected_rows = n;
        self
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }
    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Feed `rows` rows: `block[l]` is the row-major `rows × d_l` data of layer `l`. Rows are
    /// appended to the current minibatch; every completed minibatch is processed at once
    /// (Grams in parallel over layers, HSIC in parallel over pairs). A non-finite value
    /// (with finiteness enforced) or a shape error is reported before anything changes; an
    /// error while processing a batch (e.g. an undefined RBF bandwidth) leaves the
    /// accumulator unusable.
    pub fn update<T: Element>(
        &mut self,
        block: &[&[T]],
        rows: usize,
        monitor: &dyn Monitor,
    ) -> Result<()> {
        let lc = self.dims.len();
        if block.len() != lc {
            return Err(Error::Mismatch(format!(
                "block has {} layers, the minibatch CKA has {lc}",
                block.len()
            )));
        }
        for (l, (x, &d)) in block.iter().zip(&self.dims).enumerate() {
            if Some(x.len()) != rows.checked_mul(d) {
                return Err(Error::Mismatch(format!(
                    "layer {:?}: block has {} values, expected {rows} rows × {d}",
                    self.names[l],
                    x.len()
                )));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let bad: Vec<Option<usize>> = block
            .par_iter()
            .zip(self.dims.par_iter())
            .map(|(x, &d)| x.chunks(d).position(|r| r.iter().any(|v| !v.is_finite())))
            .collect();
        if self.check_finite {
            if let Some((l, a)) = bad.iter().enumerate().find_map(|(l, b)| b.map(|a| (l, a))) {
                return Err(Error::NonFinite(format!(
                    "layer {:?}: non-finite value (NaN/Inf) in row {}",
                    self.names[l],
                    self.rows_seen + a as u64
                )));
            }
        }
        for (l, b) in bad.iter().enumerate() {
            if let (Some(a), None) = (b, self.nonfinite[l]) {
                self.nonfinite[l] = Some(self.rows_seen + *a as u64);
            }
        }
        let mut pos = 0usize;
        while pos < rows {
            let take = (self.batch_size - self.carry_rows).min(rows - pos);
            for (l, x) in block.iter().enumerate() {
                let d = self.dims[l];
                self.carry[l].try_reserve_exact(take * d).map_err(|_| {
                    Error::Memory(format!(
                        "could not allocate the minibatch rows of layer {:?}; use a smaller \
                         batch_size",
                        self.names[l]
                    ))
                })?;
                self.carry[l].extend(x[pos * d..(pos + take) * d].iter().map(|v| v.to_f64()));
            }
            self.carry_rows += take;
            self.rows_seen += take as u64;
            pos += take;
            if self.carry_rows == self.batch_size {
                self.process_batch()?;
                monitor.progress(self.rows_seen, self.expected_rows.max(self.rows_seen))?;
            }
        }
        Ok(())
    }

    /// Grams of the current minibatch, HSIC₁ of every pair, added to the sums.
    fn process_batch(&mut self) -> Result<()> {
        let m = self.carry_rows;
        if self.exps.is_none() {
            let dims = &self.dims;
            let exps = self
                .carry
                .par_iter()
                .enumerate()
                .map(|(l, c)| {
                    let d = dims[l];
                    let x = &c[..m * d];
                    let mut mean = vec![0.0; d];
                    for r in x.chunks(d) {
                        for (mu, v) in mean.iter_mut().zip(r) {
                            *mu += v;
                        }
                    }
                    mean.iter_mut().for_each(|mu| *mu /= m as f64);
                    let max = max_deviation(x, &mean);
                    scale_exponent(max)
                })
                .collect();
            self.exps = Some(exps);
        }
        if let Some(exps) = &self.exps {
            for (c, &e) in self.carry.iter_mut().zip(exps) {
                if e != 0 {
                    c.par_iter_mut().for_each(|v| *v = ldexp(*v, -e));
                }
            }
        }
        let start = self.rows_seen - m as u64;
        let lc = self.dims.len();
        let kernel = self.kernel;
        let carry = &self.carry;
        let dims = &self.dims;
        let names = &self.names;
        let nonfinite = &self.nonfinite;
        let prod: &dyn Products = self.products.as_ref().map_or(&Cpu, |p| &*p.0);
        let external = self.products.is_some();
        let preps: Vec<Option<(Gram, f64)>> = (0..lc)
            .into_par_iter()
            .map(|l| -> Result<Option<(Gram, f64)>> {
                if nonfinite[l].is_some() {
                    return Ok(None); // its cells are NaN
                }
                let d = dims[l];
                let x = &carry[l][..m * d];
                let (k, bw) = match kernel {
                    Kernel::Linear => {
                        let mut mean = vec![0.0; d];
                        for r in x.chunks(d) {
                            for (mu, v) in mean.iter_mut().zip(r) {
                                *mu += v;
                            }
                        }
                        for mu in mean.iter_mut() {
                            *mu /= m as f64;
                        }
                        let xc: Vec<f64> = x
                            .chunks(d)
                            .flat_map(|r| r.iter().zip(&mean).map(|(v, mu)| v - mu))
                            .collect();
                        let g = if external {
                            let mut g = prod.gram_f64(RowMajor { x: &xc, m, d })?;
                            if g.len() != m * m {
                                return Err(Error::Mismatch(format!(
                                    "a minibatch Gram of {} values for {m} rows",
                                    g.len()
                                )));
                            }
                            mirror_upper(&mut g, m); // exactly symmetric
                            g
                        } else {
                            gram(&xc, m, d)?
                        };
                        (g, f64::NAN)
                    }
                    Kernel::Rbf { sigma } => {
                        rbf_gram_with(x, m, d, sigma, &Budget::unchecked(), prod).map_err(|e| {
                            match e {
                                Error::InvalidArgument(msg) => Error::invalid(format!(
                                    "layer {:?}, minibatch of rows {start}..{}: {msg}",
                                    names[l],
                                    start + m as u64
                                )),
                                other => other,
                            }
                        })?
                    }
                };
                Ok(Some((Gram::prepare(k, m, Estimator::Unbiased)?, bw)))
            })
            .collect::<Result<_>>()?;
        let vals: Vec<f64> = self
            .pairs
            .par_iter()
            .map(|&(i, j)| match (&preps[i], &preps[j]) {
                (Some((a, _)), Some((b, _))) => hsic(a, b),
                _ => Ok(f64::NAN),
            })
            .collect::<Result<_>>()?;
        for (s, v) in self.sums.iter_mut().zip(vals) {
            *s += v;
        }
        for (b, p) in self.bw_sums.iter_mut().zip(&preps) {
            if let Some((_, bw)) = p {
                *b += bw;
            }
        }
        self.batches += 1;
        self.rows_used += m as u64;
        self.carry_rows = 0;
        for c in self.carry.iter_mut() {
            c.clear();
        }
        Ok(())
    }

    /// Process the final shorter minibatch (when it has ≥ 4 rows) and return the means.
    /// Fails when no minibatch of ≥ 4 rows was seen.
    pub fn finish(mut self) -> Result<MinibatchHsic> {
        if self.carry_rows >= 4 {
            self.process_batch()?;
        }
        if self.batches == 0 {
            return Err(Error::invalid(format!(
                "minibatch CKA needs at least 4 rows (the unbiased HSIC divides by m − 3), got {}",
                self.rows_seen
            )));
        }
        let l = self.dims.len();
        let nb = self.batches as f64;
        let mut hsic = vec![f64::NAN; l * l];
        for (&(i, j), s) in self.pairs.iter().zip(&self.sums) {
            let v = s / nb;
            hsic[i * l + j] = v;
            hsic[j * l + i] = v;
        }
        let exps = self.exps.clone().unwrap_or_else(|| vec![0; l]);
        let bandwidths = match self.kernel {
            Kernel::Linear => vec![f64::NAN; l],
            Kernel::Rbf { .. } => self
                .bw_sums
                .iter()
                .zip(&self.nonfinite)
                .zip(&exps)
                .map(|((b, nf), &e)| {
                    if nf.is_some() {
                        f64::NAN
                    } else {
                        ldexp(b / nb, e)
                    }
                })
                .collect(),
        };
        Ok(MinibatchHsic {
            dims: self.dims,
            names: self.names,
            kernel: self.kernel,
            batch_size: self.batch_size,
            num_a: self.num_a,
            batches: self.batches,
            rows_used: self.rows_used,
            rows_seen: self.rows_seen,
            hsic,
            bandwidths,
            nonfinite: self.nonfinite,
            scale_exp: exps,
        })
    }
}

impl MinibatchHsic {
    fn check(&self, i: usize) -> Result<()> {
        let l = self.dims.len();
        if i >= l {
            return Err(Error::invalid(format!(
                "layer index {i} out of range for {l} layers"
            )));
        }
        Ok(())
    }

    /// `mean HSIC₁(i, j) / sqrt(mean HSIC₁(i, i) · mean HSIC₁(j, j))` under the NaN rule of
    /// [`cka_ratio`] (exactly 1 on the diagonal; NaN when a mean self-HSIC is not positive
    /// or the pair was not computed).
    pub fn cka(&self, i: usize, j: usize) -> Result<f64> {
        self.check(i)?;
        self.check(j)?;
        Ok(cka_of(&self.hsic, self.dims.len(), i, j))
    }

    /// CKA of every `(rows[a], cols[b])` pair, row-major `rows.len() × cols.len()`.
    pub fn cka_matrix(&self, rows: &[usize], cols: &[usize]) -> Result<Vec<f64>> {
        cka_table(&self.hsic, self.dims.len(), rows, cols)
    }
}

fn cka_of(hsic: &[f64], l: usize, i: usize, j: usize) -> f64 {
    cka_ratio(hsic[i * l + j], hsic[i * l + i], hsic[j * l + j], i == j)
}

/// [`MinibatchHsic::cka_matrix`] from mean HSICs alone (`hsic`: row-major `l × l`, e.g.
/// the batch-weighted means of the row ranges of a distributed run).
pub fn cka_table(hsic: &[f64], l: usize, rows: &[usize], cols: &[usize]) -> Result<Vec<f64>> {
    if hsic.len() != l * l {
        return Err(Error::invalid(format!(
            "{} HSIC values are not {l} × {l}",
            hsic.len()
        )));
    }
    let mut out = Vec::with_capacity(rows.len() * cols.len());
    for &i in rows {
        for &j in cols {
            if i >= l || j >= l {
                return Err(Error::invalid(format!(
                    "layer index {} out of range for {l} layers",
                    i.max(j)
                )));
            }
            out.push(cka_of(hsic, l, i, j));
        }
    }
    Ok(out)
}

/// Stream every row of `src` (the selected layers of one store, of two row-aligned stores
/// side by side — the caller has checked that their row ids agree — or of in-memory arrays)
/// through `acc` (whose widths must match the source's) and finish it. Blocks come from the
/// one block reader ([`crate::store::stream::run`], a reader thread one block ahead) in whole
/// minibatches of about 32 MiB, so mmap reads and bf16/f16 conversion overlap the Gram work.
pub fn minibatch_pass(
    src: &dyn RowSource,
    acc: MinibatchCka,
    block_rows: Option<usize>,
    monitor: &dyn Monitor,
) -> Result<MinibatchHsic> {
    let dims = src.dims();
    if dims != acc.dims {
        return Err(Error::Mismatch(format!(
            "selected layer widths {dims:?} differ from the accumulator's {:?}",
            acc.dims
        )));
    }
    let bs = acc.batch_size;
    let block_rows = match block_rows {
        Some(0) => return Err(Error::invalid("block_rows must be at least 1")),
        Some(b) => b,
        None => {
            let d: usize = dims.iter().sum();
            let per = (32usize << 20) / (bs.saturating_mul(d).saturating_mul(4).max(1));
            bs.saturating_mul(per.clamp(1, 64))
        }
    };
    let mut acc = acc.with_expected_rows(src.num_rows());
    if src.has_f64() {
        stream::run::<f64>(src, block_rows, monitor, |b, rows| {
            acc.update(b, rows, monitor)
        })?;
    } else {
        stream::run::<f32>(src, block_rows, monitor, |b, rows| {
            acc.update(b, rows, monitor)
        })?;
    }
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::NoMonitor;

    use crate::testdata::data;

    /// Unbiased HSIC straight from Song et al. eq. 5 on the raw (uncentred) linear Gram.
    fn naive_hsic1(x: &[f64], y: &[f64], m: usize, dx: usize, dy: usize) -> f64 {
        let g = |z: &[f64], d: usize| -> Vec<f64> {
            let mut k = vec![0.0; m * m];
            for a in 0..m {
                for b in 0..m {
                    if a != b {
                        k[a * m + b] = (0..d).map(|c| z[a * d + c] * z[b * d + c]).sum();
                    }
                }
            }
            k
        };
        let (k, l) = (g(x, dx), g(y, dy));
        let mf = m as f64;
        let tr: f64 = (0..m * m).map(|i| k[i] * l[i]).sum();
        let sk: f64 = k.iter().sum();
        let sl: f64 = l.iter().sum();
        let kl: f64 = (0..m)
            .map(|a| {
                let ka: f64 = k[a * m..(a + 1) * m].iter().sum();
                let la: f64 = l[a * m..(a + 1) * m].iter().sum();
                ka * la
            })
            .sum();
        (tr + sk * sl / ((mf - 1.0) * (mf - 2.0)) - 2.0 * kl / (mf - 2.0)) / (mf * (mf - 3.0))
    }

    #[test]
    fn linear_matches_per_batch_reference_across_blocks() {
        let (n, dx, dy, bs) = (50usize, 3usize, 4usize, 12usize);
        let x = data(n, dx, 1, 0.0);
        let mut y = data(n, dy, 2, 0.0);
        for a in 0..n {
            y[a * dy] += 3.0 * x[a * dx];
        }
        // Reference: batches 0..12, 12..24, 24..36, 36..48, then 48..50 (2 rows) dropped.
        let mut sxy = 0.0;
        let mut sxx = 0.0;
        let mut syy = 0.0;
        for s in (0..48).step_by(bs) {
            let xs = &x[s * dx..(s + bs) * dx];
            let ys = &y[s * dy..(s + bs) * dy];
            sxy += naive_hsic1(xs, ys, bs, dx, dy);
            sxx += naive_hsic1(xs, xs, bs, dx, dx);
            syy += naive_hsic1(ys, ys, bs, dy, dy);
        }
        let want = sxy / (sxx * syy).sqrt();
        // Fed in uneven blocks that straddle batch boundaries.
        let mut acc = MinibatchCka::new(&[dx, dy], Kernel::Linear, bs).unwrap();
        for (a, b) in [(0, 5), (5, 30), (30, 31), (31, 50)] {
            acc.update(&[&x[a * dx..b * dx], &y[a * dy..b * dy]], b - a, &NoMonitor)
                .unwrap();
        }
        let r = acc.finish().unwrap();
        assert_eq!((r.batches, r.rows_used, r.rows_seen), (4, 48, 50));
        let got = r.cka(0, 1).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert_eq!(r.cka(0, 0).unwrap(), 1.0);
        assert!(r.cka(0, 2).is_err());
    }

    #[test]
    fn offsets_identical_layers_and_errors() {
        let (n, d) = (40usize, 5usize);
        let x = data(n, d, 3, 500.0);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let xw: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let y = data(n, d, 4, 0.0);
        let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        let yw: Vec<f64> = y32.iter().map(|&v| v as f64).collect();
        let mut acc = MinibatchCka::new(&[d, d, d], Kernel::Linear, 40).unwrap();
        acc.update(&[&x32[..], &x32[..], &y32[..]], n, &NoMonitor)
            .unwrap();
        let r = acc.finish().unwrap();
        assert_eq!(r.cka(0, 1).unwrap(), 1.0);
        // The raw-Gram reference is useless on offset data (its self-HSIC cancels to a
        // negative number); HSIC₁ is translation invariant, so centre it first (two-pass f64).
        let centre = |z: &[f64]| -> Vec<f64> {
            let mu: Vec<f64> = (0..d)
                .map(|c| (0..n).map(|a| z[a * d + c]).sum::<f64>() / n as f64)
                .collect();
            z.iter().enumerate().map(|(i, v)| v - mu[i % d]).collect()
        };
        let raw = naive_hsic1(&xw, &xw, n, d, d);
        let (xc, yc) = (centre(&xw), centre(&yw));
        let want = naive_hsic1(&xc, &yc, n, d, d)
            / (naive_hsic1(&xc, &xc, n, d, d) * naive_hsic1(&yc, &yc, n, d, d)).sqrt();
        let got = r.cka(0, 2).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let good = naive_hsic1(&xc, &xc, n, d, d);
        assert!((raw - good).abs() > 1e-3 * good.abs(), "{raw} vs {good}");
        // Non-finite: error by default, NaN cells when allowed.
        let mut bad = x32.clone();
        bad[7 * d + 2] = f32::NAN;
        let mut acc = MinibatchCka::new(&[d, d], Kernel::Linear, 8)
            .unwrap()
            .with_names(&["a".into(), "b".into()])
            .unwrap();
        match acc.update(&[&y32[..], &bad[..]], n, &NoMonitor) {
            Err(Error::NonFinite(m)) => assert!(m.contains("\"b\"") && m.contains("row 7"), "{m}"),
            other => panic!("{other:?}"),
        }
        let mut acc = MinibatchCka::new(&[d, d, d], Kernel::Linear, 8)
            .unwrap()
            .with_check_finite(false);
        acc.update(&[&y32[..], &bad[..], &x32[..]], n, &NoMonitor)
            .unwrap();
        let r = acc.finish().unwrap();
        assert_eq!(r.nonfinite, vec![None, Some(7), None]);
        assert!(r.cka(0, 1).unwrap().is_nan());
        assert!(r.cka(0, 2).unwrap().is_finite());
        // Argument errors.
        assert!(MinibatchCka::new(&[d], Kernel::Linear, 3).is_err());
        assert!(MinibatchCka::new(&[], Kernel::Linear, 8).is_err());
        assert!(MinibatchCka::new(&[0], Kernel::Linear, 8).is_err());
        assert!(MinibatchCka::new(&[d], Kernel::Rbf { sigma: 0.0 }, 8).is_err());
        assert!(matches!(
            MinibatchCka::new(&[768; 13], Kernel::Linear, 4096)
                .unwrap()
                .with_budget(&Budget::argument(1 << 20).unwrap()),
            Err(Error::Memory(_))
        ));
        let mut acc = MinibatchCka::new(&[d], Kernel::Linear, 8).unwrap();
        assert!(matches!(
            acc.update(&[&x32[..3]], 1, &NoMonitor),
            Err(Error::Mismatch(_))
        ));
        acc.update(&[&x32[..3 * d]], 3, &NoMonitor).unwrap();
        assert!(acc.finish().is_err()); // 3 rows: no batch
    }

    #[test]
    fn cross_pairs_and_rbf_single_batch() {
        let (n, d) = (30usize, 4usize);
        let x = data(n, d, 5, 0.0);
        let y: Vec<f64> = x.iter().map(|v| v.tanh() * 2.0).collect();
        let mut acc = MinibatchCka::new(&[d, d], Kernel::Rbf { sigma: 1.0 }, 64)
            .unwrap()
            .with_num_a(1)
            .unwrap();
        acc.update(&[&x[..], &y[..]], n, &NoMonitor).unwrap();
        let r = acc.finish().unwrap();
        // One batch of all rows: equals the debiased RBF CKA of the kernel module.
        let k = crate::measures::cka::rbf::rbf_hsic(
            &[(&x, d)],
            Some(&[(&y, d)]),
            n,
            1.0,
            true,
            &Budget::unchecked(),
            &NoMonitor,
        )
        .unwrap();
        let want = k.table.xy[0] / (k.table.xx[0] * k.table.yy[0]).sqrt();
        let got = r.cka(0, 1).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((r.bandwidths[0] - k.bw_a[0]).abs() < 1e-12);
        assert!(MinibatchCka::new(&[d], Kernel::Linear, 8)
            .unwrap()
            .with_num_a(2)
            .is_err());
    }
}
