//! The driver: one pass over every row of any [`RowSource`] (the selected layers of a store,
//! of two stores side by side, in-memory arrays, a seeded subset) into a
//! [`MomentAccumulator`], through the one block reader, with the reference shift sampled
//! over the whole source ([`sample_shift`]).
use super::accumulator::MomentAccumulator;
use super::plan::{check_memory, default_block_rows_for};
use super::state::{column_sums, Compute};
use crate::error::{Error, Result};
use crate::memory::{try_vec, Budget};
use crate::monitor::Monitor;
use crate::store::stream::{self, RowSource};

/// One streaming pass over every row of `src` (the selected layers of one store, of two
/// row-aligned stores side by side — the caller has checked that their row ids agree — or of
/// in-memory arrays) into a [`MomentAccumulator`] named `names`, shifted by
/// [`sample_shift`].
///
/// Blocks come from the one block reader ([`crate::store::stream::run`]: converted to f32 —
/// or f64 when a layer holds f64 — by a reader thread one block ahead of the SYRK). Fails
/// with [`Error::Memory`] before reading a row when the pass does not fit `budget`
/// ([`check_memory`]).
pub fn accumulate(
    src: &dyn RowSource,
    names: &[String],
    block_rows: Option<usize>,
    check_finite: bool,
    budget: &Budget,
    compute: Compute,
    monitor: &dyn Monitor,
) -> Result<MomentAccumulator> {
    let dims = src.dims();
    let block_rows = block_rows.unwrap_or_else(|| default_block_rows_for(&dims, compute));
    if block_rows == 0 {
        return Err(Error::invalid("block_rows must be at least 1"));
    }
    check_memory(&dims, block_rows, compute, budget)?;
    let shift = sample_shift(src)?;
    let acc = MomentAccumulator::new(&dims)?
        .with_names(names)?
        .with_check_finite(check_finite)
        .with_compute(compute);
    accumulate_into(acc, src, block_rows, shift.as_deref(), monitor)
}

/// The pass of [`accumulate`] into `acc` (made by the caller: names, finiteness, arithmetic,
/// the source row of its first row) under a given reference `shift` (`None`: the first
/// block's column means), its memory already checked: every task of a distributed pass uses
/// the shift sampled once over the whole source.
pub fn accumulate_into(
    mut acc: MomentAccumulator,
    src: &dyn RowSource,
    block_rows: usize,
    shift: Option<&[f64]>,
    monitor: &dyn Monitor,
) -> Result<MomentAccumulator> {
    if block_rows == 0 {
        return Err(Error::invalid("block_rows must be at least 1"));
    }
    if acc.dims() != src.dims().as_slice() {
        return Err(Error::Mismatch(format!(
            "an accumulator of widths {:?} for a source of widths {:?}",
            acc.dims(),
            src.dims()
        )));
    }
    if let Some(shift) = shift {
        acc.set_shift(shift)?;
    }
    if src.has_f64() {
        stream::run::<f64>(src, block_rows, monitor, |b, rows| acc.update(b, rows))?;
    } else {
        stream::run::<f32>(src, block_rows, monitor, |b, rows| acc.update(b, rows))?;
    }
    Ok(acc)
}

/// Rows used by [`sample_shift`].
pub const SHIFT_SAMPLE_ROWS: u64 = 1024;

/// The column means of up to [`SHIFT_SAMPLE_ROWS`] rows spread evenly over all of `src`
/// (row `⌊(2i+1)·n / 2m⌋`, `i < m`): the reference shift of a pass, so that a first block
/// unlike the rest (sorted, concatenated or drifting data) does not leave the shifted values
/// large. `None` when a sampled value is not finite (the pass then reports the first bad row
/// itself) or there are no rows.
pub fn sample_shift(src: &dyn RowSource) -> Result<Option<Vec<f64>>> {
    let n = src.num_rows();
    if n == 0 {
        return Ok(None);
    }
    let m = n.min(SHIFT_SAMPLE_ROWS);
    let rows: Vec<u64> = (0..m).map(|i| ((2 * i + 1) * n) / (2 * m)).collect();
    let mut shift = Vec::new();
    for (l, dim) in src.dims().into_iter().enumerate() {
        let mut x = try_vec(
            rows.len() * dim,
            0.0,
            format_args!("{m} sampled rows of width {dim}"),
        )?;
        src.take_f64(l, &rows, &mut x)?;
        // Scattered reads map whole neighbourhoods of pages (fault-around): drop them again
        // at once, or most of the store would sit in this process's resident set.
        src.release(0, n)?;
        let mut mean = column_sums(&x, dim);
        for mu in mean.iter_mut() {
            *mu /= m as f64;
        }
        if !mean.iter().all(|v| v.is_finite()) {
            return Ok(None);
        }
        shift.extend(mean);
    }
    Ok(Some(shift))
}

/// Per layer of `layers` (indices into `src`), the scale exponent
/// ([`super::state::scale_exponent`]) of its largest deviation from its mean over the
/// rows [`sample_shift`] uses, all columns of the layer: the same on every task and tile of a
/// pass (a deterministic function of the source), so that the pieces of one layer share one
/// unit. Read in chunks of 128 rows (bounded memory whatever the width); non-finite values
/// are skipped (the pass reports them).
pub fn sample_scale(src: &dyn RowSource, layers: &[usize]) -> Result<Vec<i32>> {
    let n = src.num_rows();
    let dims = src.dims();
    if n == 0 {
        return Ok(vec![0; layers.len()]);
    }
    let m = n.min(SHIFT_SAMPLE_ROWS);
    let rows: Vec<u64> = (0..m).map(|i| ((2 * i + 1) * n) / (2 * m)).collect();
    const CHUNK: usize = 128;
    let mut out = Vec::with_capacity(layers.len());
    for &l in layers {
        let dim = *dims
            .get(l)
            .ok_or_else(|| Error::invalid(format!("layer {l} out of range")))?;
        let mut x = try_vec(
            CHUNK * dim,
            0.0,
            format_args!("{CHUNK} sampled rows of width {dim}"),
        )?;
        let mut mean = vec![0.0f64; dim];
        let mut count = vec![0u64; dim];
        for pass in 0..2 {
            let mut max = 0.0f64;
            for chunk in rows.chunks(CHUNK) {
                let buf = &mut x[..chunk.len() * dim];
                src.take_f64(l, chunk, buf)?;
                if pass == 1 {
                    max = max.max(super::state::max_deviation(buf, &mean));
                    continue;
                }
                for r in buf.chunks_exact(dim) {
                    for (c, &v) in r.iter().enumerate() {
                        if v.is_finite() {
                            mean[c] += v;
                            count[c] += 1;
                        }
                    }
                }
            }
            if pass == 0 {
                for (mu, &k) in mean.iter_mut().zip(&count) {
                    *mu /= k.max(1) as f64;
                }
            } else {
                out.push(super::state::scale_exponent(max));
            }
        }
        src.release(0, n)?;
    }
    Ok(out)
}
