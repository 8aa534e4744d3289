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
