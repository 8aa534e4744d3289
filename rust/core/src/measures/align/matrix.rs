//! All layer pairs: [`align_matrix`] over prepared layers, and the entry points from a
//! covariance ([`measures_from_cov`]) or a moment pass ([`measures_from_moments`]).
use super::{align_pair, prepare, AlignOptions, Method, PairAlignment, Prepared, Space};
use crate::engine::moments::Moments;
use crate::error::{Error, Result};
use crate::measures::spectrum::{layer_eigs, LayerEig, Spectrum};
use crate::memory::Budget;
use crate::monitor::Monitor;
use faer::MatRef;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A rows × cols table of pair alignments.
#[derive(Debug, Clone)]
pub struct AlignmentMatrix {
    pub nrows: usize,
    pub ncols: usize,
    /// Row-major `nrows × ncols` summary values.
    pub values: Vec<f64>,
    /// Row-major per-pair cosines.
    pub cosines: Vec<Vec<f64>>,
    /// `(name, row-major values)` per extra of the method.
    pub extras: Vec<(&'static str, Vec<f64>)>,
    /// What was kept of each row layer and each column layer.
    pub rows: Vec<LayerFacts>,
    pub cols: Vec<LayerFacts>,
}

/// What the alignment kept of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerFacts {
    /// Kept directions (0 when the method keeps none).
    pub k: usize,
    /// CCA ridge added to `C_ii` (0 when none).
    pub ridge: f64,
    /// Numerical rank of `C_ii`.
    pub rank: usize,
}

/// Alignment for every pair (rows × cols) of layers indexed into `eigs`/`names`.
///
/// `block(i, j)` returns `C_ij` for global layer indices `i`, `j`. With `symmetric = true`
/// (rows == cols, same source), each unordered pair is computed once and mirrored (PWCCA
/// fills the mirror with the column-weighted value). Pairs run in parallel (rayon);
/// `monitor` is told after each pair.
#[allow(clippy::too_many_arguments)]
pub fn align_matrix<'a, F>(
    eigs: &[LayerEig],
    names: &[String],
    rows: &[usize],
    cols: &[usize],
    block: F,
    symmetric: bool,
    opts: &AlignOptions,
    monitor: &dyn Monitor,
) -> Result<AlignmentMatrix>
where
    F: Fn(usize, usize) -> Result<MatRef<'a, f64>> + Sync,
{
    if eigs.len() != names.len() {
        return Err(Error::invalid("one name per layer is required"));
    }
    if rows.is_empty() || cols.is_empty() {
        return Err(Error::invalid("no layers to align"));
    }
    if symmetric && rows != cols {
        return Err(Error::invalid("symmetric alignment needs rows == cols"));
    }
    for &i in rows.iter().chain(cols) {
        if i >= eigs.len() {
            return Err(Error::invalid(format!("layer index {i} out of range")));
        }
    }
    if let Method::Subspace(Space::Features) = opts.method {
        for &i in rows {
            for &j in cols {
                if eigs[i].dim() != eigs[j].dim() {
                    return Err(Error::invalid(format!(
                        "space='features' needs equal widths: {:?} has {}, {:?} has {}",
                        names[i],
                        eigs[i].dim(),
                        names[j],
                        eigs[j].dim()
                    )));
                }
            }
        }
    }
    // Prepare each distinct layer once.
    let mut used: Vec<usize> = rows.iter().chain(cols).copied().collect();
    used.sort_unstable();
    used.dedup();
    // Collect every result, then report the first failing layer in order (a parallel
    // `collect::<Result<_>>` returns whichever error a thread hit first: not reproducible).
    let prepared: Vec<(usize, Prepared)> = used
        .par_iter()
        .map(|&i| prepare(&eigs[i], &names[i], opts).map(|p| (i, p)))
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<_>>()?;
    let prep = |i: usize| -> &Prepared {
        // `used` holds every index of rows/cols, sorted.
        let pos = used.binary_search(&i).unwrap_or(0);
        &prepared[pos].1
    };
    let (nr, nc) = (rows.len(), cols.len());
    let pairs: Vec<(usize, usize)> = if symmetric {
        (0..nr).flat_map(|r| (r..nc).map(move |c| (r, c))).collect()
    } else {
        (0..nr).flat_map(|r| (0..nc).map(move |c| (r, c))).collect()
    };
    let total = pairs.len() as u64;
    let done = AtomicU64::new(0);
    let results: Vec<PairAlignment> = pairs
        .par_iter()
        .map(|&(r, c)| {
            let (i, j) = (rows[r], cols[c]);
            let cij = block(i, j)?;
            let res = if i == j && opts.method == Method::Shape {
                // a layer with itself: exactly 0 (the angle's round-off would be ~1e-8)
                PairAlignment::symmetric(0.0, Vec::new(), vec![0.0, 1.0])
            } else {
                align_pair(cij, &eigs[i], &eigs[j], prep(i), prep(j), opts)?
            };
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            monitor.progress(k, total)?;
            Ok(res)
        })
        .collect::<Result<_>>()?;
    let ne = opts.method.extra_names().len();
    let mut values = vec![f64::NAN; nr * nc];
    let mut cosines = vec![Vec::new(); nr * nc];
    let mut extras: Vec<Vec<f64>> = vec![vec![f64::NAN; nr * nc]; ne];
    for (&(r, c), res) in pairs.iter().zip(results) {
        values[r * nc + c] = res.value;
        for (x, &e) in extras.iter_mut().zip(&res.extras) {
            x[r * nc + c] = e;
        }
        if symmetric && r != c {
            values[c * nc + r] = res.value_t;
            for (x, &e) in extras.iter_mut().zip(&res.extras) {
                x[c * nc + r] = e;
            }
            cosines[c * nc + r] = res.cosines.clone();
        }
        cosines[r * nc + c] = res.cosines;
    }
    Ok(AlignmentMatrix {
        nrows: nr,
        ncols: nc,
        values,
        cosines,
        extras: opts
            .method
            .extra_names()
            .iter()
            .copied()
            .zip(extras)
            .collect(),
        rows: rows.iter().map(|&i| prep(i).facts()).collect(),
        cols: cols.iter().map(|&i| prep(i).facts()).collect(),
    })
}

/// A borrowed view of finalised moments: `cov` is the symmetric `D × D` centred cross-product
/// matrix (so row- and column-major agree), layers in `dims` order.
pub struct CovView<'a> {
    cov: &'a [f64],
    dims: Vec<usize>,
    offsets: Vec<usize>,
    n: usize,
}

impl<'a> CovView<'a> {
    pub fn new(cov: &'a [f64], dims: Vec<usize>, n: usize) -> Result<Self> {
        let mut offsets = vec![0usize];
        for &d in &dims {
            let last = offsets[offsets.len() - 1];
            offsets.push(
                last.checked_add(d)
                    .ok_or_else(|| Error::invalid("width overflow"))?,
            );
        }
        let d = offsets[offsets.len() - 1];
        if d.checked_mul(d) != Some(cov.len()) {
            return Err(Error::Mismatch(format!(
                "moment matrix has {} entries, layer widths sum to {d}",
                cov.len()
            )));
        }
        Ok(CovView {
            cov,
            dims,
            offsets,
            n,
        })
    }

    pub fn block(&self, i: usize, j: usize) -> Result<MatRef<'a, f64>> {
        let l = self.dims.len();
        if i >= l || j >= l {
            return Err(Error::invalid(format!(
                "layer index ({i}, {j}) out of range for {l} layers"
            )));
        }
        let d = self.offsets[l];
        Ok(MatRef::from_column_major_slice(self.cov, d, d).submatrix(
            self.offsets[i],
            self.offsets[j],
            self.dims[i],
            self.dims[j],
        ))
    }

    /// Eigendecompositions of the listed layers (parallel across layers).
    pub fn eigs(&self, layers: &[usize], monitor: &dyn Monitor) -> Result<Vec<LayerEig>> {
        let blocks: Vec<MatRef<'a, f64>> = layers
            .iter()
            .map(|&i| self.block(i, i))
            .collect::<Result<_>>()?;
        layer_eigs(&blocks, self.n, monitor)
    }
}

/// Rows × cols alignment request for [`measures_from_cov`].
pub struct AlignSpec {
    pub rows: Vec<usize>,
    pub cols: Vec<usize>,
    pub opts: AlignOptions,
    pub symmetric: bool,
}

/// Peak bytes of the eigendecompositions of layers of widths `dims`: every layer's
/// eigenvectors are kept (`d²` values each) and up to one solver workspace (the input copy,
/// its factors and scratch: about `4 d²`) per worker thread is live at a time.
pub fn eigs_bytes(dims: &[usize]) -> u128 {
    let held: u128 = dims.iter().map(|&d| d as u128 * d as u128 * 8).sum();
    let dmax = dims.iter().copied().max().unwrap_or(0) as u128;
    let workers = rayon::current_num_threads().min(dims.len()) as u128;
    held + workers * 4 * dmax * dmax * 8
}

/// Spectra of `spectrum_layers` and/or the alignment `align`, from one `C`: every layer used
/// is eigendecomposed once (in parallel) and shared. Fails with [`Error::Memory`] before
/// any work when the decompositions ([`eigs_bytes`]) do not fit `budget`.
pub fn measures_from_cov(
    view: &CovView<'_>,
    names: &[String],
    spectrum_layers: &[usize],
    align: Option<&AlignSpec>,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<(Vec<Spectrum>, Option<AlignmentMatrix>)> {
    if names.len() != view.dims.len() {
        return Err(Error::invalid("one name per layer is required"));
    }
    let mut used: Vec<usize> = spectrum_layers.to_vec();
    if let Some(a) = align {
        used.extend(a.rows.iter().chain(&a.cols));
    }
    used.sort_unstable();
    used.dedup();
    let dims: Vec<usize> = used
        .iter()
        .filter_map(|&i| view.dims.get(i).copied())
        .collect();
    budget.check(
        eigs_bytes(&dims),
        format_args!(
            "the eigendecompositions of {} layers (widest {})",
            dims.len(),
            dims.iter().max().unwrap_or(&0)
        ),
        "select fewer layers per call",
    )?;
    let eigs = view.eigs(&used, monitor)?;
    let local = |i: usize| {
        used.binary_search(&i)
            .map_err(|_| Error::invalid("layer index not prepared"))
    };
    let spectra = spectrum_layers
        .iter()
        .map(|&i| Ok(Spectrum::from_eig(&eigs[local(i)?])))
        .collect::<Result<Vec<_>>>()?;
    let al = match align {
        None => None,
        Some(a) => {
            let rows: Vec<usize> = a.rows.iter().map(|&i| local(i)).collect::<Result<_>>()?;
            let cols: Vec<usize> = a.cols.iter().map(|&i| local(i)).collect::<Result<_>>()?;
            let lnames: Vec<String> = used.iter().map(|&i| names[i].clone()).collect();
            let used_ref = &used;
            Some(align_matrix(
                &eigs,
                &lnames,
                &rows,
                &cols,
                |i, j| view.block(used_ref[i], used_ref[j]),
                a.symmetric,
                &a.opts,
                monitor,
            )?)
        }
    };
    Ok((spectra, al))
}

/// [`measures_from_cov`] on a pass's finalised moments (the layer names and widths are
/// theirs).
pub fn measures_from_moments(
    m: &Moments,
    spectrum_layers: &[usize],
    align: Option<&AlignSpec>,
    budget: &Budget,
    monitor: &dyn Monitor,
) -> Result<(Vec<Spectrum>, Option<AlignmentMatrix>)> {
    let n = usize::try_from(m.n).map_err(|_| Error::invalid("row count overflow"))?;
    // The shape metric with 0 < α < 1 mixes α with λ^(−1/2): it depends on a layer's unit,
    // which the pass changed for a layer stored beyond 2^±40 (α = 0 and α = 1 do not).
    let rescaled = |l: usize| m.exp(l) != 0;
    if let Some(spec) = align.filter(|s| s.opts.method == Method::Shape) {
        let a = spec.opts.alpha;
        if let Some(&l) = spec.rows.iter().chain(&spec.cols).find(|&&l| rescaled(l)) {
            if a > 0.0 && a < 1.0 {
                return Err(Error::invalid(format!(
                    "layer {:?} is stored at a scale of 2^{} (beyond 2^±40), which the moment \
                     pass divides out; the shape metric with 0 < alpha < 1 depends on that \
                     unit: use alpha=0 or alpha=1, or store the layer nearer unit scale",
                    m.names.get(l).map_or("?", |s| s.as_str()),
                    m.exp(l)
                )));
            }
        }
    }
    let view = CovView::new(&m.cov, m.dims.clone(), n)?;
    let (spectra, mut al) =
        measures_from_cov(&view, &m.names, spectrum_layers, align, budget, monitor)?;
    // the absolute values back in the data's units: the spectra's and the CCA ridges (the
    // alignment measures themselves are free of each layer's unit)
    if let (Some(al), Some(spec)) = (al.as_mut(), align) {
        for (facts, layers) in [(&mut al.rows, &spec.rows), (&mut al.cols, &spec.cols)] {
            for (f, &l) in facts.iter_mut().zip(layers) {
                f.ridge = crate::engine::moments::ldexp(f.ridge, 2 * m.exp(l));
            }
        }
    }
    // α = 1: the Euclidean shape distance is in the data's units, which a rescaled layer
    // lost: NaN there (the Python layer says why)
    if let (Some(al), Some(spec)) = (al.as_mut(), align) {
        if spec.opts.method == Method::Shape && spec.opts.alpha > 0.0 {
            let nc = spec.cols.len();
            for (name, vals) in al.extras.iter_mut() {
                if *name != "euclidean" {
                    continue;
                }
                for (r, &lr) in spec.rows.iter().enumerate() {
                    for (c, &lc) in spec.cols.iter().enumerate() {
                        if rescaled(lr) || rescaled(lc) {
                            vals[r * nc + c] = f64::NAN;
                        }
                    }
                }
            }
        }
    }
    let spectra = spectra
        .into_iter()
        .zip(spectrum_layers)
        .map(|(s, &l)| s.rescaled(2 * m.exp(l)))
        .collect();
    Ok((spectra, al))
}
