//! The Gram route: exact linear CKA from per-layer centred `n × n` Gram matrices, for when
//! the rows are few against the widths (`n ≪ D`: the all-pairs moments cost `n · D² / 2`
//! multiply-adds, the Grams `n² · d / 2` per layer).
//!
//! For each layer `x` (all `n` rows read at once), centred at its exact column means (f64)
//! and rounded to the compute type, `K̄_x = X̄ X̄ᵀ` by the packed SYRK (f32 or f64 products,
//! f64 accumulation, as the moment engine). The linear CKA statistics then follow from the
//! Grams alone (`tr(K̄_x K̄_y) = ‖X̄ᵀȲ‖_F²`, `diag K̄_x = r̄_x`):
//!
//! ```text
//! ‖C_xy‖_F² = ⟨K̄_x, K̄_y⟩_F      Σ_a r̄_x r̄_y = Σ_a (K̄_x)_aa (K̄_y)_aa      tr C_xx = tr K̄_x
//! ```
//!
//! i.e. the same [`PairStats`] as the moment route, and the same CKA formula (biased, and
//! the unbiased HSIC of Song et al. 2012) — the ReSi benchmark's switch to `n × n` Grams
//! when `n < D`, without its cost of a Gram per pair.
//!
//! Memory: as many Grams as the budget holds (`n² · 8` bytes each) plus the one being
//! built; when not all fit, rounds hold a group of layers and stream the others past it,
//! one Gram at a time (a streamed Gram is rebuilt once per round: FLOPs grow, memory not).
use super::pairs::PairStats;
use super::plan::PassShape;
use super::state::{f32_products_ok, ldexp, max_deviation, scale_exponent, Compute};
use crate::error::{Error, Result};
use crate::linalg::packed::{syrk_upper_add, PackedElem, Strided};
use crate::memory::{fmt_bytes, try_vec, Budget};
use crate::monitor::Monitor;
use crate::store::stream::{ReadAs, RowSource};
use crate::store::Element;
use rayon::prelude::*;

/// The rounds of a Gram-route pass (see the module docs).
#[derive(Clone, Debug)]
pub struct GramPlan {
    pub dims: Vec<usize>,
    pub num_a: usize,
    pub n: usize,
    /// Grams held at once (besides the one being built).
    pub held: usize,
    pub compute: Compute,
    pub peak_bytes: u128,
    /// Each round: the layers whose Grams are held, and those streamed past them.
    pub rounds: Vec<(Vec<usize>, Vec<usize>)>,
}

/// Peak bytes of the Gram route holding `held` Grams of `n` rows (plus one being built when
/// `streaming`), for layers at most `dmax` wide: the Grams, the layer's rows as read (f64 at
/// most) and centred (compute type), and the SYRK's packed panels.
pub fn gram_bytes(n: usize, held: usize, streaming: bool, dmax: usize, compute: Compute) -> u128 {
    let (n, dmax) = (n as u128, dmax as u128);
    let grams = (held as u128 + u128::from(streaming)) * n * n * 8;
    let (es, kc) = match compute {
        Compute::F64 => (8u128, <f64 as PackedElem>::KC as u128),
        Compute::F32 => (4u128, <f32 as PackedElem>::KC as u128),
    };
    grams + n * dmax * (8 + es) + 2 * n * kc.min(dmax) * es
}

impl GramPlan {
    /// The plan for `n` rows of layers of widths `dims` (`0..num_a` from the first source):
    /// as many Grams held as fit `budget` (all of them when they fit). [`Error::Memory`] with
    /// the minimum (two Grams and one layer's rows) when nothing fits.
    pub fn new(shape: &PassShape<'_>, budget: &Budget) -> Result<GramPlan> {
        let (dims, num_a, n, compute) = (shape.dims, shape.num_a, shape.n, shape.compute);
        let n = usize::try_from(n).map_err(|_| Error::Memory(format!("{n} rows")))?;
        let l = dims.len();
        let dmax = dims.iter().copied().max().unwrap_or(0);
        let cap = budget.bytes as u128;
        let cross = num_a < l;
        // Everything held at once?
        if gram_bytes(n, l, false, dmax, compute) <= cap {
            return Ok(GramPlan {
                dims: dims.to_vec(),
                num_a,
                n,
                held: l,
                compute,
                peak_bytes: gram_bytes(n, l, false, dmax, compute),
                rounds: vec![((0..l).collect(), Vec::new())],
            });
        }
        // Groups of the first side held, the others streamed one at a time.
        let side = if cross { num_a } else { l };
        let mut m = 0;
        while m < side && gram_bytes(n, m + 1, true, dmax, compute) <= cap {
            m += 1;
        }
        if m == 0 {
            let need = gram_bytes(n, 1, true, dmax, compute);
            budget.check(
                need,
                format_args!(
                    "the Gram route for {n} rows (two {n} × {n} Grams and a layer of width {dmax})"
                ),
                format!(
                    "a budget of at least {} is needed for it (fewer rows with sample=..., or \
                     the moment route, which does not grow with n)",
                    fmt_bytes(need)
                ),
            )?;
            return Err(Error::Memory("the memory budget is too small".into()));
        }
        let mut rounds = Vec::new();
        for start in (0..side).step_by(m) {
            let held: Vec<usize> = (start..(start + m).min(side)).collect();
            let last = *held.last().unwrap_or(&start);
            let streamed: Vec<usize> = if cross {
                (num_a..l).collect()
            } else {
                (last + 1..l).collect()
            };
            rounds.push((held, streamed));
        }
        Ok(GramPlan {
            dims: dims.to_vec(),
            num_a,
            n,
            held: m,
            compute,
            peak_bytes: gram_bytes(n, m, true, dmax, compute),
            rounds,
        })
    }

    /// How many times each layer's Gram is built (= read).
    pub fn layer_reads(&self) -> Vec<u64> {
        let mut r = vec![0u64; self.dims.len()];
        for (held, streamed) in &self.rounds {
            for &x in held.iter().chain(streamed) {
                r[x] += 1;
            }
        }
        r
    }

    /// Multiply-adds: the Grams' SYRKs (`n (n + 1) / 2 · d` each build) and the pairs' inner
    /// products (`n (n + 1) / 2` each).
    pub fn madds(&self) -> u128 {
        let tri = (self.n as u128) * (self.n as u128 + 1) / 2;
        let builds: u128 = self
            .layer_reads()
            .iter()
            .zip(&self.dims)
            .map(|(&r, &d)| r as u128 * d as u128)
            .sum();
        let pairs: u128 = self
            .rounds
            .iter()
            .map(|(h, s)| (h.len() * (h.len() + 1) / 2 + h.len() * s.len() + s.len()) as u128)
            .sum();
        tri * (builds + pairs)
    }

    /// Number of Gram builds (the unit of progress).
    pub fn builds(&self) -> u64 {
        self.layer_reads().iter().sum()
    }

    /// Run the plan over `src` (the layers of `self.dims`, named `names`).
    pub fn run(
        &self,
        src: &dyn RowSource,
        names: &[String],
        check_finite: bool,
        monitor: &dyn Monitor,
    ) -> Result<PairStats> {
        let l = self.dims.len();
        if src.dims() != self.dims || names.len() != l || src.num_rows() != self.n as u64 {
            return Err(Error::Mismatch(format!(
                "the Gram plan is for {} rows of layers of widths {:?}; the source has {} rows of {:?}",
                self.n,
                self.dims,
                src.num_rows(),
                src.dims()
            )));
        }
        let mut st = PairStats {
            n: self.n as u64,
            dims: self.dims.clone(),
            names: names.to_vec(),
            sq: vec![f64::NAN; l * l],
            rr: vec![f64::NAN; l * l],
            trace: vec![f64::NAN; l],
            known: vec![false; l * l],
            nonfinite: vec![None; l],
            shift_offset: 0.0,
        };
        let total = self.builds();
        let mut done = 0u64;
        monitor.progress(0, total)?;
        type Build = fn(&dyn RowSource, usize, usize, usize, Compute, &str, bool) -> Result<Gram>;
        let build_as: Build = if src.has_f64() {
            Gram::build::<f64>
        } else {
            Gram::build::<f32>
        };
        let mut build = |x: usize, st: &mut PairStats| -> Result<Gram> {
            let g = build_as(
                src,
                x,
                self.n,
                self.dims[x],
                self.compute,
                &names[x],
                check_finite,
            )?;
            st.nonfinite[x] = g.nonfinite;
            st.trace[x] = g.diag.iter().sum();
            done += 1;
            monitor.progress(done, total)?;
            Ok(g)
        };
        let set = |st: &mut PairStats, x: usize, y: usize, a: &Gram, b: &Gram| {
            let (sq, rr) = (
                a.inner(b),
                a.diag.iter().zip(&b.diag).map(|(p, q)| p * q).sum(),
            );
            for (i, j) in [(x, y), (y, x)] {
                st.sq[i * l + j] = sq;
                st.rr[i * l + j] = rr;
                st.known[i * l + j] = true;
            }
        };
        for (held, streamed) in &self.rounds {
            let mut grams: Vec<Gram> = Vec::with_capacity(held.len());
            for &x in held {
                let g = build(x, &mut st)?;
                for (&y, h) in held.iter().zip(&grams) {
                    if self.num_a == l || (x < self.num_a) != (y < self.num_a) {
                        set(&mut st, y, x, h, &g);
                    }
                }
                set(&mut st, x, x, &g, &g);
                grams.push(g);
            }
            for &y in streamed {
                let g = build(y, &mut st)?;
                set(&mut st, y, y, &g, &g);
                for (&x, h) in held.iter().zip(&grams) {
                    set(&mut st, x, y, h, &g);
                }
            }
        }
        Ok(st)
    }
}

/// One layer's centred Gram (upper triangle, column-major `n × n`) and its diagonal.
struct Gram {
    n: usize,
    k: Vec<f64>,
    diag: Vec<f64>,
    nonfinite: Option<u64>,
}

impl Gram {
    fn build<T: ReadAs>(
        src: &dyn RowSource,
        layer: usize,
        n: usize,
        d: usize,
        compute: Compute,
        name: &str,
        check_finite: bool,
    ) -> Result<Gram> {
        let mut x = try_vec(
            n.saturating_mul(d),
            T::default(),
            format_args!("the {n} rows of layer {name:?} (width {d})"),
        )?;
        T::read_layer(src, layer, 0..n as u64, &mut x)?;
        src.release(0, n as u64)?;
        let bad = x
            .chunks_exact(d)
            .position(|r| r.iter().any(|v| !v.to_f64().is_finite()))
            .map(|a| a as u64);
        if let (Some(a), true) = (bad, check_finite) {
            return Err(Error::NonFinite(format!(
                "layer {name:?}: non-finite value (NaN/Inf) in row {a}"
            )));
        }
        // Exact column means (f64), then the centred values in the compute type.
        let mut mean = vec![0.0f64; d];
        for r in x.chunks_exact(d) {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v.to_f64();
            }
        }
        for m in mean.iter_mut() {
            *m /= n as f64;
        }
        // A layer far from unit scale (its largest deviation over all its rows beyond
        // 2^±SCALE_BAND) is multiplied by 2^-e (exact): the Gram's entries and their
        // products stay inside the f32/f64 ranges; every statistic of a pair then carries
        // the same factor for each layer, which CKA cancels.
        let max = max_deviation(&x, &mean);
        let f = ldexp(1.0, -scale_exponent(max));
        let mut k = crate::linalg::hinted_vec(n * n, format_args!("a {n} × {n} Gram matrix"))?;
        // f32 products only where they are as accurate as usual (no column far below the
        // layer's unit, none above f32's safe range); else this layer's Gram in f64
        let compute = match compute {
            Compute::F32 if !f32_products_ok(|i| (x[i].to_f64() - mean[i % d]) * f, n, d) => {
                Compute::F64
            }
            c => c,
        };
        match compute {
            Compute::F64 => Self::syrk(&x, &mean, f, n, d, &mut k, |v| v)?,
            Compute::F32 => Self::syrk(&x, &mean, f, n, d, &mut k, |v| v as f32)?,
        }
        let diag = (0..n).map(|a| k[a * n + a]).collect();
        Ok(Gram {
            n,
            k,
            diag,
            nonfinite: bad,
        })
    }

    fn syrk<T: Element, C: PackedElem>(
        x: &[T],
        mean: &[f64],
        f: f64,
        n: usize,
        d: usize,
        k: &mut [f64],
        round: fn(f64) -> C,
    ) -> Result<()> {
        let mut c: Vec<C> = try_vec(n * d, C::default(), "the centred rows of a layer")?;
        c.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
            for ((o, v), m) in o.iter_mut().zip(r).zip(mean) {
                *o = round((v.to_f64() - m) * f);
            }
        });
        // K = X̄ X̄ᵀ = UᵀU with U = X̄ᵀ (d × n): element (p, a) = c[a·d + p].
        let view = Strided {
            u: &c,
            k: d,
            n,
            rs: 1,
            cs: d,
        };
        syrk_upper_add(k, n, view, &mut Vec::new())
    }

    /// `⟨K, L⟩_F` of two symmetric Grams from their upper triangles.
    fn inner(&self, other: &Gram) -> f64 {
        let n = self.n;
        let cols: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|j| {
                let (a, b) = (&self.k[j * n..j * n + j], &other.k[j * n..j * n + j]);
                2.0 * a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>()
                    + self.k[j * n + j] * other.k[j * n + j]
            })
            .collect();
        cols.iter().sum()
    }
}
