//! [`PairStats`]: what linear CKA needs of every layer pair — `‖C_ij‖_F²`, `Σ_a r̄_i r̄_j`,
//! `tr C_ii` and `n` — whether they come from one pass's [`Moments`], from the Gram route or
//! are summed over the tiles of a tiled pass. The CKA formula itself is a measure:
//! `crate::measures::cka::linear`.
use super::finalised::Moments;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Per-pair sums of the centred data of `L` layers (row-major `L × L` where a pair).
#[derive(Clone, Debug)]
pub struct PairStats {
    pub n: u64,
    pub dims: Vec<usize>,
    pub names: Vec<String>,
    /// `‖C_ij‖_F²`.
    pub sq: Vec<f64>,
    /// `Σ_a r̄_{i,a} r̄_{j,a}`, `r̄_{i,a} = ‖x_{i,a} − x̄_i‖²`.
    pub rr: Vec<f64>,
    /// `tr C_ii`.
    pub trace: Vec<f64>,
    /// Which pairs were computed (a tiled pass computes only the pairs asked for).
    pub known: Vec<bool>,
    /// First row holding a NaN/Inf per layer (only when finiteness was not enforced).
    pub nonfinite: Vec<Option<u64>>,
    /// As [`Moments::shift_offset`] (the largest over a tiled pass's tiles).
    pub shift_offset: f64,
}

impl PairStats {
    /// Statistics computed elsewhere (the torch device engine's Gram route): `sq`, `rr` and
    /// `known` row-major `L × L` (symmetric), `trace` and `nonfinite` per layer; checked for
    /// shape and symmetry, moved as they are.
    #[allow(clippy::too_many_arguments)]
    pub fn from_sums(
        n: u64,
        dims: &[usize],
        names: &[String],
        sq: Vec<f64>,
        rr: Vec<f64>,
        trace: Vec<f64>,
        known: Vec<bool>,
        nonfinite: Vec<Option<u64>>,
    ) -> Result<Self> {
        let l = dims.len();
        let ok = l > 0
            && names.len() == l
            && sq.len() == l * l
            && rr.len() == l * l
            && known.len() == l * l
            && trace.len() == l
            && nonfinite.len() == l;
        if !ok {
            return Err(Error::Mismatch(format!(
                "pair statistics of {l} layers need {l} names, traces and first non-finite \
                 rows and {l}×{l} sums and flags; got {}, {}, {}, {}, {}, {}",
                names.len(),
                trace.len(),
                nonfinite.len(),
                sq.len(),
                rr.len(),
                known.len()
            )));
        }
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for i in 0..l {
            for j in 0..i {
                let (a, b) = (i * l + j, j * l + i);
                if known[a] != known[b] || !same(sq[a], sq[b]) || !same(rr[a], rr[b]) {
                    return Err(Error::invalid(format!(
                        "pair statistics must be symmetric (layers {j} and {i} are not)"
                    )));
                }
            }
        }
        Ok(PairStats {
            n,
            dims: dims.to_vec(),
            names: names.to_vec(),
            sq,
            rr,
            trace,
            known,
            nonfinite,
            shift_offset: 0.0,
        })
    }

    /// The statistics of the pairs `(rows[a], cols[b])` (and every layer with itself)
    /// from a single pass's moments; each block norm computed once, in parallel.
    pub fn from_moments(m: &Moments, rows: &[usize], cols: &[usize]) -> Result<Self> {
        let l = m.dims.len();
        for &i in rows.iter().chain(cols) {
            if i >= l {
                return Err(Error::invalid(format!(
                    "layer index {i} out of range for {l} layers"
                )));
            }
        }
        let mut known = vec![false; l * l];
        for &i in rows.iter().chain(cols) {
            known[i * l + i] = true;
        }
        for &i in rows {
            for &j in cols {
                known[i * l + j] = true;
                known[j * l + i] = true;
            }
        }
        let pairs: Vec<(usize, usize)> = (0..l * l)
            .filter(|&k| known[k] && k / l <= k % l)
            .map(|k| (k / l, k % l))
            .collect();
        let norms: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| m.block_sq_norm(i, j))
            .collect::<Result<_>>()?;
        let mut sq = vec![f64::NAN; l * l];
        for (&(i, j), v) in pairs.iter().zip(norms) {
            sq[i * l + j] = v;
            sq[j * l + i] = v;
        }
        Ok(PairStats {
            n: m.n,
            dims: m.dims.clone(),
            names: m.names.clone(),
            sq,
            rr: m.rr.clone(),
            trace: (0..l).map(|k| m.trace(k)).collect::<Result<_>>()?,
            known,
            nonfinite: m.nonfinite.clone(),
            shift_offset: m.shift_offset,
        })
    }
}
