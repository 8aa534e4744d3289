//! Views of another [`RowSource`], themselves sources: [`Subset`] (given rows of it, a seeded
//! sample streamed like the whole), [`RowRange`] (consecutive rows `[start, stop)`, the row
//! range of one distributed task) and [`Columns`] (column ranges of its layers as layers, the
//! pieces of a tiled pass).
use super::stream::{typed_reads, ReadAs, RowSource};
use crate::error::{check_out_len, check_outs, Error, Result};
use crate::memory::try_with_capacity;
use std::ops::Range;

/// The rows `index` (each `< src.num_rows()`, in the order given) of another source, as a
/// source of `index.len()` rows: a seeded sample streamed like the whole.
pub struct Subset<'a> {
    src: &'a dyn RowSource,
    index: &'a [u64],
}

impl<'a> Subset<'a> {
    /// Checks every index.
    pub fn new(src: &'a dyn RowSource, index: &'a [u64]) -> Result<Self> {
        let n = src.num_rows();
        if let Some(&bad) = index.iter().find(|&&r| r >= n) {
            return Err(Error::invalid(format!(
                "sampled row {bad} out of range ({n} rows)"
            )));
        }
        Ok(Subset { src, index })
    }

    fn rows(&self, start: u64, stop: u64) -> Result<&[u64]> {
        self.index
            .get(start as usize..stop as usize)
            .ok_or_else(|| Error::invalid(format!("row range [{start}, {stop}) out of range")))
    }

    fn read<T: ReadAs>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        let rows = self.rows(start, stop)?;
        outs.iter_mut()
            .enumerate()
            .try_for_each(|(l, o)| T::take(self.src, l, rows, o))
    }

    fn read_layer<T: ReadAs>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (start, stop) = (range.start, range.end);
        T::take(self.src, layer, self.rows(start, stop)?, out)
    }

    fn take<T: ReadAs>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let mapped = rows
            .iter()
            .map(|&r| self.index.get(r as usize).copied())
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| Error::invalid("sampled row out of range"))?;
        T::take(self.src, layer, &mapped, out)
    }
}

impl RowSource for Subset<'_> {
    fn num_rows(&self) -> u64 {
        self.index.len() as u64
    }
    typed_reads!(of src);
    /// Scattered reads map whole neighbourhoods of pages (fault-around), anywhere in the
    /// source: a block of sampled rows releases all of it.
    fn release(&self, _start: u64, _stop: u64) -> Result<()> {
        self.src.release(0, self.src.num_rows())
    }
}

/// Rows `[start, stop)` of another source, seen as a source of `stop − start` rows: the
/// share of one distributed task (row `r` here is row `start + r` there).
pub struct RowRange<'a> {
    src: &'a dyn RowSource,
    start: u64,
    stop: u64,
}

impl<'a> RowRange<'a> {
    /// Checks `start <= stop <= src.num_rows()`.
    pub fn new(src: &'a dyn RowSource, rows: Range<u64>) -> Result<Self> {
        let n = src.num_rows();
        if rows.start > rows.end || rows.end > n {
            return Err(Error::invalid(format!(
                "row range [{}, {}) is not within the source's {n} rows",
                rows.start, rows.end
            )));
        }
        Ok(RowRange {
            src,
            start: rows.start,
            stop: rows.end,
        })
    }

    fn shifted(&self, start: u64, stop: u64) -> Result<(u64, u64)> {
        if start > stop || stop > self.stop - self.start {
            return Err(Error::invalid(format!(
                "row range [{start}, {stop}) out of range ({} rows)",
                self.stop - self.start
            )));
        }
        Ok((self.start + start, self.start + stop))
    }

    fn read<T: ReadAs>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        let (a, b) = self.shifted(start, stop)?;
        T::read(self.src, a, b, outs)
    }

    fn read_layer<T: ReadAs>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (a, b) = self.shifted(range.start, range.end)?;
        T::read_layer(self.src, layer, a..b, out)
    }

    fn take<T: ReadAs>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let len = self.stop - self.start;
        if let Some(&bad) = rows.iter().find(|&&r| r >= len) {
            return Err(Error::invalid(format!(
                "row {bad} out of range ({len} rows)"
            )));
        }
        let mut mapped = try_with_capacity(rows.len(), "the row indices of a gather")?;
        mapped.extend(rows.iter().map(|&r| r + self.start));
        T::take(self.src, layer, &mapped, out)
    }
}

impl RowSource for RowRange<'_> {
    fn num_rows(&self) -> u64 {
        self.stop - self.start
    }
    typed_reads!(of src);
    fn release(&self, start: u64, stop: u64) -> Result<()> {
        let (a, b) = self.shifted(start, stop.min(self.stop - self.start))?;
        self.src.release(a, b)
    }
}

/// Column ranges of another source's layers, each seen as a layer of its own (the pieces of
/// a tiled pass: a group of layers, or a block of the feature columns of a layer too wide
/// for the memory budget). A piece that is a whole layer is read in place; a part of a layer
/// is read through one temporary buffer of the whole layer's rows, shared by consecutive
/// pieces of the same layer in one block.
pub struct Columns<'a> {
    src: &'a dyn RowSource,
    pieces: Vec<(usize, std::ops::Range<usize>)>,
    src_dims: Vec<usize>,
}

impl<'a> Columns<'a> {
    /// `pieces`: `(layer of src, column range)`, each range non-empty and within the layer.
    pub fn new(
        src: &'a dyn RowSource,
        pieces: Vec<(usize, std::ops::Range<usize>)>,
    ) -> Result<Self> {
        let src_dims = src.dims();
        for (l, c) in &pieces {
            let d = *src_dims.get(*l).ok_or_else(|| {
                Error::invalid(format!(
                    "layer {l} out of range ({} layers)",
                    src_dims.len()
                ))
            })?;
            if c.start >= c.end || c.end > d {
                return Err(Error::invalid(format!(
                    "columns {}..{} are not a non-empty range of layer {l} (width {d})",
                    c.start, c.end
                )));
            }
        }
        Ok(Columns {
            src,
            pieces,
            src_dims,
        })
    }

    fn piece(&self, i: usize) -> Result<(usize, std::ops::Range<usize>, usize)> {
        let (l, c) = self.pieces.get(i).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "piece {i} out of range ({} pieces)",
                self.pieces.len()
            ))
        })?;
        Ok((l, c, self.src_dims[l]))
    }

    fn read<T: ReadAs>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        check_outs(outs.len(), self.pieces.len(), "pieces")?;
        let rows = usize::try_from(stop.saturating_sub(start))
            .map_err(|_| Error::Memory(format!("a block of {} rows", stop - start)))?;
        // The whole-layer rows last read (layer index, values).
        let mut held: Option<(usize, Vec<T>)> = None;
        for (i, out) in outs.iter_mut().enumerate() {
            let (l, c, d) = self.piece(i)?;
            if c.len() == d {
                T::read_layer(self.src, l, start..stop, out)?;
                continue;
            }
            check_out_len(out.len(), rows, c.len())?;
            if held.as_ref().map(|h| h.0) != Some(l) {
                let len = rows
                    .checked_mul(d)
                    .ok_or_else(|| Error::Memory(format!("a block of {rows} rows × {d} values")))?;
                let mut buf = match held.take() {
                    Some((_, b)) if b.capacity() >= len => b,
                    _ => try_with_capacity(
                        len,
                        format_args!("a block of {rows} rows × {d} (a column piece's layer)"),
                    )?,
                };
                buf.resize(len, T::default());
                T::read_layer(self.src, l, start..stop, &mut buf)?;
                held = Some((l, buf));
            }
            let whole = &held.as_ref().map(|h| &h.1[..]).unwrap_or(&[]);
            copy_columns(whole, d, c, out);
        }
        Ok(())
    }

    fn read_layer<T: ReadAs>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (start, stop) = (range.start, range.end);
        let (l, c, d) = self.piece(layer)?;
        if c.len() == d {
            return T::read_layer(self.src, l, start..stop, out);
        }
        let rows = usize::try_from(stop.saturating_sub(start))
            .map_err(|_| Error::Memory(format!("a block of {} rows", stop - start)))?;
        let mut whole = crate::memory::try_vec(
            rows.saturating_mul(d),
            T::default(),
            format_args!("a block of {rows} rows × {d} (a column piece's layer)"),
        )?;
        T::read_layer(self.src, l, start..stop, &mut whole)?;
        check_out_len(out.len(), rows, c.len())?;
        copy_columns(&whole, d, c, out);
        Ok(())
    }

    fn take<T: ReadAs>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let (l, c, d) = self.piece(layer)?;
        if c.len() == d {
            return T::take(self.src, l, rows, out);
        }
        let mut whole = crate::memory::try_vec(
            rows.len().saturating_mul(d),
            T::default(),
            format_args!("{} rows × {d} (a column piece's layer)", rows.len()),
        )?;
        T::take(self.src, l, rows, &mut whole)?;
        check_out_len(out.len(), rows.len(), c.len())?;
        copy_columns(&whole, d, c, out);
        Ok(())
    }
}

/// Columns `c` of the row-major `· × d` matrix `whole` into the row-major `out`.
fn copy_columns<T: Copy>(whole: &[T], d: usize, c: std::ops::Range<usize>, out: &mut [T]) {
    let w = c.len();
    for (o, row) in out.chunks_exact_mut(w).zip(whole.chunks_exact(d)) {
        o.copy_from_slice(&row[c.clone()]);
    }
}

impl RowSource for Columns<'_> {
    fn num_rows(&self) -> u64 {
        self.src.num_rows()
    }
    fn dims(&self) -> Vec<usize> {
        self.pieces.iter().map(|(_, c)| c.len()).collect()
    }
    fn has_f64(&self) -> bool {
        self.src.has_f64()
    }
    typed_reads!();
    fn release(&self, start: u64, stop: u64) -> Result<()> {
        self.src.release(start, stop)
    }
}
