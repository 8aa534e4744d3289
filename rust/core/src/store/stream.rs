//! THE block reader: row-aligned layers read block by block by one reader thread that stays
//! ahead of the consumer. Every streaming engine (the moment pass, minibatch CKA, the store
//! benchmarks) is a consumer of [`run`]; nothing else in the crate loops over row blocks.
//!
//! * [`RowSource`]: anything that can fill row blocks of some layers (`num_rows`, `dims`,
//!   `read_f32`/`read_f64`, `take_f64`, `release`).
//! * [`StoreRows`]: a selection of layers of one [`Store`] (mmap + dtype conversion in
//!   parallel, mapped pages released after each block).
//! * [`ArrayRows`]: borrowed in-memory layers (numpy / CPU torch buffers, row-strided views
//!   read where they lie), decoded by the store's own conversions: arrays are just another
//!   source.
//! * views of another source (`views.rs`): [`Subset`](super::Subset) (given rows: a seeded
//!   sample), [`RowRange`](super::RowRange) (consecutive rows: one distributed task's range)
//!   and [`Columns`](super::Columns) (column ranges of its layers as layers: the pieces of a
//!   tiled pass).
//! * [`Rows`]: several sources side by side (the selected layers of two models on the same
//!   inputs), checked to have the same number of rows; the caller has checked that their row
//!   ids agree.
//! * [`run`]: one pass over rows `0..n` of a source in blocks of `block_rows` rows.
use super::dtype::{DType, Element, Values};
use super::reader::Store;
use crate::error::{check_out_len, check_outs, Error, Result};
use crate::memory::try_with_capacity;
use crate::monitor::Monitor;
use std::ops::Range;

/// Row-aligned layers that can be read in row blocks. Implementations are shared with the
/// reader thread: every read is a pure function of immutable data.
pub trait RowSource: Sync {
    /// Number of rows (the same for every layer).
    fn num_rows(&self) -> u64;
    /// Widths of the layers, in order.
    fn dims(&self) -> Vec<usize>;
    /// Whether any layer holds f64 values (then a pass reads f64; else f32 loses nothing).
    fn has_f64(&self) -> bool;
    /// Rows `[start, stop)` of every layer into `outs` (one buffer per layer, each of exactly
    /// `(stop − start) × dim` elements), converted to f32 (f16/bf16 exactly).
    fn read_f32(&self, start: u64, stop: u64, outs: &mut [&mut [f32]]) -> Result<()>;
    /// As [`RowSource::read_f32`], in f64.
    fn read_f64(&self, start: u64, stop: u64, outs: &mut [&mut [f64]]) -> Result<()>;
    /// Rows `[start, stop)` of layer `layer` alone into `out` (`(stop − start) × dim`), as f32.
    fn read_layer_f32(&self, layer: usize, range: Range<u64>, out: &mut [f32]) -> Result<()>;
    /// As [`RowSource::read_layer_f32`], in f64.
    fn read_layer_f64(&self, layer: usize, range: Range<u64>, out: &mut [f64]) -> Result<()>;
    /// Rows `rows` (each `< num_rows`, any order, repeats allowed) of layer `layer` as f64
    /// into `out` (`rows.len() × dim`). Pages stay mapped: a caller gathering scattered rows
    /// calls [`RowSource::release`] when done.
    fn take_f64(&self, layer: usize, rows: &[u64], out: &mut [f64]) -> Result<()>;
    /// As [`RowSource::take_f64`], in f32.
    fn take_f32(&self, layer: usize, rows: &[u64], out: &mut [f32]) -> Result<()>;
    /// A hint that rows `[start, stop)` will not be read again soon (drop mapped pages).
    fn release(&self, _start: u64, _stop: u64) -> Result<()> {
        Ok(())
    }
}

/// The element types a pass reads ([`f32`] or [`f64`]): dispatches to the source's reader.
pub trait ReadAs: Element {
    fn read(src: &dyn RowSource, start: u64, stop: u64, outs: &mut [&mut [Self]]) -> Result<()>;
    fn take(src: &dyn RowSource, layer: usize, rows: &[u64], out: &mut [Self]) -> Result<()>;
    fn read_layer(
        src: &dyn RowSource,
        layer: usize,
        range: Range<u64>,
        out: &mut [Self],
    ) -> Result<()>;
}
/// [`ReadAs`] for one element type: its three reads are the source's reads of that type.
macro_rules! read_as {
    ($t:ty, $read:ident, $take:ident, $read_layer:ident) => {
        impl ReadAs for $t {
            fn read(
                src: &dyn RowSource,
                start: u64,
                stop: u64,
                outs: &mut [&mut [$t]],
            ) -> Result<()> {
                src.$read(start, stop, outs)
            }
            fn take(src: &dyn RowSource, layer: usize, rows: &[u64], out: &mut [$t]) -> Result<()> {
                src.$take(layer, rows, out)
            }
            fn read_layer(
                src: &dyn RowSource,
                layer: usize,
                range: Range<u64>,
                out: &mut [$t],
            ) -> Result<()> {
                src.$read_layer(layer, range, out)
            }
        }
    };
}
read_as!(f32, read_f32, take_f32, read_layer_f32);
read_as!(f64, read_f64, take_f64, read_layer_f64);

/// The six typed reads of [`RowSource`], forwarded to the implementing type's generic
/// `read` (a block), `take` (gathered rows) and `read_layer` (one layer's block); `(of src)`
/// also forwards `dims` and `has_f64` to `self.src` (a view of another source).
macro_rules! typed_reads {
    // A view of `self.src`: the same widths and storage.
    (of src) => {
        fn dims(&self) -> Vec<usize> {
            self.src.dims()
        }
        fn has_f64(&self) -> bool {
            self.src.has_f64()
        }
        typed_reads!();
    };
    () => {
        typed_reads!(f32, read_f32, take_f32, read_layer_f32);
        typed_reads!(f64, read_f64, take_f64, read_layer_f64);
    };
    ($t:ty, $read:ident, $take:ident, $read_layer:ident) => {
        fn $read(&self, start: u64, stop: u64, outs: &mut [&mut [$t]]) -> Result<()> {
            self.read(start, stop, outs)
        }
        fn $take(&self, layer: usize, rows: &[u64], out: &mut [$t]) -> Result<()> {
            self.take(layer, rows, out)
        }
        fn $read_layer(&self, layer: usize, range: Range<u64>, out: &mut [$t]) -> Result<()> {
            self.read_layer(layer, range, out)
        }
    };
}
pub(super) use typed_reads;

/// A selection of layers (indices into `store.layers()`, in order, repeats allowed) of one
/// store. By default a block's mapped pages are dropped from the resident set once read
/// ([`Store::release`]); [`StoreRows::keeping_pages`] leaves them mapped.
pub struct StoreRows<'a> {
    store: &'a Store,
    layers: Vec<usize>,
    keep_pages: bool,
}

impl<'a> StoreRows<'a> {
    /// Checks every layer index.
    pub fn new(store: &'a Store, layers: Vec<usize>) -> Result<Self> {
        if let Some(&l) = layers.iter().find(|&&l| l >= store.layers().len()) {
            return Err(Error::invalid(format!(
                "layer index {l} out of range for {} ({} layers)",
                store.path().display(),
                store.layers().len()
            )));
        }
        Ok(StoreRows {
            store,
            layers,
            keep_pages: false,
        })
    }

    /// Leaves read rows mapped ([`RowSource::release`] does nothing): for a reader that will
    /// come back to them.
    pub fn keeping_pages(mut self) -> Self {
        self.keep_pages = true;
        self
    }

    /// The store read from.
    pub fn store(&self) -> &'a Store {
        self.store
    }

    /// The selected layer indices, in order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }
}

impl RowSource for StoreRows<'_> {
    fn num_rows(&self) -> u64 {
        self.store.num_rows()
    }
    fn dims(&self) -> Vec<usize> {
        let info = self.store.layers();
        self.layers.iter().map(|&l| info[l].dim).collect()
    }
    fn has_f64(&self) -> bool {
        let info = self.store.layers();
        self.layers.iter().any(|&l| info[l].dtype == DType::F64)
    }
    typed_reads!();
    fn release(&self, start: u64, stop: u64) -> Result<()> {
        if self.keep_pages {
            return Ok(());
        }
        self.store.release(start, stop)
    }
}

impl StoreRows<'_> {
    fn read<T: Element>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        self.store.read_block_into(&self.layers, start, stop, outs)
    }

    fn index(&self, layer: usize) -> Result<usize> {
        self.layers.get(layer).copied().ok_or_else(|| {
            Error::invalid(format!(
                "layer {layer} out of range ({} selected)",
                self.layers.len()
            ))
        })
    }

    fn take<T: Element>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        self.store.take_into(self.index(layer)?, rows, out)
    }

    fn read_layer<T: Element>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (start, stop) = (range.start, range.end);
        self.store
            .read_rows_into(self.index(layer)?, start, stop, out)
    }
}

/// Several row sources side by side (e.g. the selected layers of two models on the same
/// inputs): the layers of `parts[0]`, then those of `parts[1]`, … All parts must have the
/// same number of rows.
pub struct Rows<'a> {
    parts: Vec<&'a dyn RowSource>,
    counts: Vec<usize>,
    rows: u64,
}

impl<'a> Rows<'a> {
    /// [`Error::Mismatch`] when the parts' row counts differ; at least one part.
    pub fn new(parts: Vec<&'a dyn RowSource>) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("no source selected"))?;
        let rows = first.num_rows();
        if let Some(p) = parts.iter().find(|p| p.num_rows() != rows) {
            return Err(Error::Mismatch(format!(
                "sources have {rows} and {} rows",
                p.num_rows()
            )));
        }
        let counts = parts.iter().map(|p| p.dims().len()).collect();
        Ok(Rows {
            parts,
            counts,
            rows,
        })
    }

    /// The part holding layer `layer` of the whole, and the layer's index within it.
    fn locate(&self, mut layer: usize) -> Result<(&'a dyn RowSource, usize)> {
        for (p, &k) in self.parts.iter().zip(&self.counts) {
            if layer < k {
                return Ok((*p, layer));
            }
            layer -= k;
        }
        Err(Error::invalid(format!(
            "layer index out of range ({} layers)",
            self.counts.iter().sum::<usize>()
        )))
    }

    fn take<T: ReadAs>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let (p, l) = self.locate(layer)?;
        T::take(p, l, rows, out)
    }

    fn read_layer<T: ReadAs>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (p, l) = self.locate(layer)?;
        T::read_layer(p, l, range, out)
    }

    fn read<T: ReadAs>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        let total: usize = self.counts.iter().sum();
        check_outs(outs.len(), total, "layers")?;
        let mut rest = outs;
        for (p, &k) in self.parts.iter().zip(&self.counts) {
            let (mine, tail) = rest.split_at_mut(k);
            T::read(*p, start, stop, mine)?;
            rest = tail;
        }
        Ok(())
    }
}

impl RowSource for Rows<'_> {
    fn num_rows(&self) -> u64 {
        self.rows
    }
    fn dims(&self) -> Vec<usize> {
        self.parts.iter().flat_map(|p| p.dims()).collect()
    }
    fn has_f64(&self) -> bool {
        self.parts.iter().any(|p| p.has_f64())
    }
    typed_reads!();
    fn release(&self, start: u64, stop: u64) -> Result<()> {
        self.parts.iter().try_for_each(|p| p.release(start, stop))
    }
}

/// One borrowed in-memory layer: `rows` rows of `dim` values, row `r` starting at element
/// `r · row_stride` of `values` (a row-major array, or a view of one with rows or trailing
/// columns cut away: read where it lies, never copied whole).
pub struct ArrayLayer<'a> {
    bytes: &'a [u8],
    dtype: DType,
    rows: u64,
    dim: usize,
    row_stride: usize,
}

impl<'a> ArrayLayer<'a> {
    /// Checks that `values` holds every row (`(rows − 1) · row_stride + dim` elements at
    /// least) and that rows do not overlap (`row_stride ≥ dim`).
    pub fn new(values: Values<'a>, rows: usize, dim: usize, row_stride: usize) -> Result<Self> {
        if rows > 1 && row_stride < dim {
            return Err(Error::invalid(format!(
                "row stride {row_stride} is smaller than the width {dim}"
            )));
        }
        let need = match rows {
            0 => Some(0),
            _ => (rows - 1)
                .checked_mul(row_stride)
                .and_then(|x| x.checked_add(dim)),
        };
        if need.is_none_or(|need| values.len() < need) {
            return Err(Error::invalid(format!(
                "{} values cannot hold {rows} rows of width {dim} {row_stride} apart",
                values.len()
            )));
        }
        if cfg!(target_endian = "big") {
            return Err(Error::invalid(
                "in-memory arrays are read as little-endian values; this machine is big-endian",
            ));
        }
        let bytes = match values {
            Values::F32(v) => as_bytes(v),
            Values::F64(v) => as_bytes(v),
            Values::F16Bits(v) | Values::BF16Bits(v) => as_bytes(v),
        };
        Ok(ArrayLayer {
            bytes,
            dtype: values.dtype(),
            rows: rows as u64,
            dim,
            row_stride,
        })
    }

    /// Row `r` (`< rows`) converted into `out` (`dim` elements) by the store's own decoder.
    fn row_into<T: Element>(&self, r: usize, out: &mut [T]) {
        let size = self.dtype.size();
        let at = r * self.row_stride * size;
        T::convert(self.dtype, &self.bytes[at..at + self.dim * size], out);
    }
}

/// The bytes of a slice of plain numbers (little-endian on the machines this builds for).
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32/f64/u16 have no padding and every byte pattern is a valid u8; the byte
    // slice covers exactly the memory of `v` and borrows it for the same lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Borrowed in-memory layers (numpy buffers, CPU torch tensors) with the same number of rows:
/// a row source like a store's, decoded by the same conversions (f16/bf16 exactly, f64 → f32
/// rounded to nearest), so arrays and stores go through one pass.
pub struct ArrayRows<'a> {
    layers: Vec<ArrayLayer<'a>>,
    rows: u64,
}

impl<'a> ArrayRows<'a> {
    /// [`Error::Mismatch`] when the layers' row counts differ.
    pub fn new(layers: Vec<ArrayLayer<'a>>) -> Result<Self> {
        let rows = layers.first().map_or(0, |l| l.rows);
        if let Some((i, l)) = layers.iter().enumerate().find(|(_, l)| l.rows != rows) {
            return Err(Error::Mismatch(format!(
                "array {i} has {} rows, array 0 has {rows} (layers must be row-aligned)",
                l.rows
            )));
        }
        Ok(ArrayRows { layers, rows })
    }

    fn layer(&self, layer: usize) -> Result<&ArrayLayer<'a>> {
        self.layers.get(layer).ok_or_else(|| {
            Error::invalid(format!(
                "layer {layer} out of range ({} arrays)",
                self.layers.len()
            ))
        })
    }

    fn read<T: Element>(&self, start: u64, stop: u64, outs: &mut [&mut [T]]) -> Result<()> {
        if start > stop || stop > self.rows {
            return Err(Error::invalid(format!(
                "row range [{start}, {stop}) is not within [0, {}]",
                self.rows
            )));
        }
        check_outs(outs.len(), self.layers.len(), "layers")?;
        let rows = (stop - start) as usize;
        for (l, o) in self.layers.iter().zip(outs.iter()) {
            check_out_len(o.len(), rows, l.dim)?;
        }
        outs.iter_mut()
            .enumerate()
            .try_for_each(|(l, o)| self.read_layer(l, start..stop, o))
    }

    fn read_layer<T: Element>(&self, layer: usize, range: Range<u64>, out: &mut [T]) -> Result<()> {
        let (start, stop) = (range.start, range.end);
        use rayon::prelude::*;
        let l = self.layer(layer)?;
        if start > stop || stop > self.rows {
            return Err(Error::invalid(format!(
                "row range [{start}, {stop}) is not within [0, {}]",
                self.rows
            )));
        }
        check_out_len(out.len(), (stop - start) as usize, l.dim)?;
        if l.dim == 0 {
            return Ok(());
        }
        let chunk = (PAR_ELEMS / l.dim).max(1);
        out.par_chunks_mut(chunk * l.dim)
            .enumerate()
            .for_each(|(c, part)| {
                for (k, row) in part.chunks_exact_mut(l.dim).enumerate() {
                    l.row_into(start as usize + c * chunk + k, row);
                }
            });
        Ok(())
    }

    fn take<T: Element>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let l = self.layer(layer)?;
        check_out_len(out.len(), rows.len(), l.dim)?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(Error::invalid(format!(
                "row {bad} out of range ({} rows)",
                self.rows
            )));
        }
        if l.dim > 0 {
            for (o, &r) in out.chunks_exact_mut(l.dim).zip(rows) {
                l.row_into(r as usize, o);
            }
        }
        Ok(())
    }
}

/// Elements converted per parallel task when arrays are read.
const PAR_ELEMS: usize = 1 << 18;

impl RowSource for ArrayRows<'_> {
    fn num_rows(&self) -> u64 {
        self.rows
    }
    fn dims(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.dim).collect()
    }
    fn has_f64(&self) -> bool {
        self.layers.iter().any(|l| l.dtype == DType::F64)
    }
    typed_reads!();
}

/// Rows `[start, stop)` of every layer of `src` into `blk` (one buffer per layer; reused
/// buffers are resized, growing only by a fallible allocation), then release those rows.
fn fill<T: ReadAs>(
    src: &dyn RowSource,
    dims: &[usize],
    start: u64,
    stop: u64,
    blk: &mut Vec<Vec<T>>,
) -> Result<()> {
    blk.resize_with(dims.len(), Vec::new);
    let rows = usize::try_from(stop - start)
        .map_err(|_| Error::Memory(format!("a block of {} rows", stop - start)))?;
    for (b, &d) in blk.iter_mut().zip(dims) {
        let len = rows
            .checked_mul(d)
            .ok_or_else(|| Error::Memory(format!("a block of {rows} rows × {d} values")))?;
        if len > b.capacity() {
            *b = try_with_capacity(
                len,
                format_args!("a block buffer of {rows} rows × {d} (rows {start}..{stop})"),
            )?;
        }
        b.resize(len, T::default());
    }
    let mut outs: Vec<&mut [T]> = blk.iter_mut().map(|b| b.as_mut_slice()).collect();
    read_into(src, start, stop, &mut outs)
}

/// One block: rows `[start, stop)` of every layer of `src` into `outs` (one buffer per layer,
/// each of exactly `(stop − start) × dim` elements), then [`RowSource::release`] those rows.
/// The unit [`run`] repeats, and what a pull-mode reader (the Python `store.blocks()`
/// iterator) calls once per block.
pub fn read_into<T: ReadAs>(
    src: &dyn RowSource,
    start: u64,
    stop: u64,
    outs: &mut [&mut [T]],
) -> Result<()> {
    T::read(src, start, stop, outs)?;
    src.release(start, stop)
}

/// One pass over rows `0..n` of `src`, `block_rows` at a time: a reader thread stays one
/// block ahead (mmap reads and f16/bf16 conversion overlap `f`), releases each block's mapped
/// pages once read (a hint: the OS page cache keeps them, so the resident set does not grow
/// with `n`), and `f(blocks, rows)` gets every layer's row-major block in order;
/// `monitor.progress(done, n)` after each block (Ctrl-C). At most three block buffer sets
/// exist (one with the consumer, one in the channel, one being filled: a fourth would add
/// memory, not overlap); consumed sets are refilled, not reallocated (fresh buffers of tens
/// of MB per block cost a page fault and a kernel page clear per 4 KiB). Stops at the first
/// error from reading, `f` or the monitor.
pub fn run<T: ReadAs>(
    src: &dyn RowSource,
    block_rows: usize,
    monitor: &dyn Monitor,
    mut f: impl FnMut(&[&[T]], usize) -> Result<()>,
) -> Result<()> {
    if block_rows == 0 {
        return Err(Error::invalid("block_rows must be at least 1"));
    }
    let n = src.num_rows();
    let dims = src.dims();
    monitor.progress(0, n)?;
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<Vec<T>>)>>(1);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<Vec<T>>>();
        let dims = &dims;
        scope.spawn(move || {
            let mut sets = 0;
            let mut start = 0u64;
            while start < n {
                let stop = (start + block_rows as u64).min(n);
                let mut blk = match back_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if sets < 3 => {
                        sets += 1;
                        Vec::new()
                    }
                    Err(_) => match back_rx.recv() {
                        Ok(b) => b,
                        Err(_) => return, // the consumer stopped
                    },
                };
                let msg = fill(src, dims, start, stop, &mut blk).map(|_| (stop, blk));
                let failed = msg.is_err();
                if tx.send(msg).is_err() || failed {
                    return;
                }
                start = stop;
            }
        });
        let mut done = 0u64;
        for msg in rx {
            let (stop, blk) = msg?;
            let rows = (stop - done) as usize;
            let refs: Vec<&[T]> = blk.iter().map(|v| v.as_slice()).collect();
            f(&refs, rows)?;
            let _ = back_tx.send(blk); // the reader may have finished: then it is dropped
            done = stop;
            monitor.progress(done, n)?;
        }
        if done != n {
            return Err(Error::invalid(format!(
                "internal: the block reader stopped at row {done} of {n}"
            )));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{FlagMonitor, NoMonitor};
    use crate::store::{Subset, Values};
    use std::sync::atomic::AtomicBool;

    /// A store of `n` rows (shards of a few rows) with layers of widths 3 and 5.
    fn store(dir: &std::path::Path, name: &str, n: usize) -> (Store, Vec<Vec<f32>>) {
        let dims = [3usize, 5];
        let xs: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| (0..n * d).map(|i| (i * (l + 2)) as f32 * 0.25).collect())
            .collect();
        let st = crate::testdata::f32_store(&dir.join(name), &xs, &dims, 7, 256);
        (st, xs)
    }

    #[test]
    fn one_and_two_stores_stream_every_row_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let n = 40;
        let (s, xs) = store(dir.path(), "a", n);
        let (t, ys) = store(dir.path(), "b", n);
        assert!(
            s.shards().len() > 3,
            "several shards: blocks cross shard edges"
        );
        let a = StoreRows::new(&s, vec![1, 0]).unwrap();
        let b = StoreRows::new(&t, vec![0]).unwrap();
        let both = Rows::new(vec![&a, &b]).unwrap();
        assert_eq!(both.dims(), vec![5, 3, 3]);
        assert!(!both.has_f64());
        for br in [1usize, 6, 7, 40, 100] {
            let mut seen = 0usize;
            run::<f64>(&both, br, &NoMonitor, |blk, rows| {
                assert!(rows <= br && rows > 0);
                for r in 0..rows {
                    let g = seen + r;
                    for c in 0..5 {
                        assert_eq!(blk[0][r * 5 + c], xs[1][g * 5 + c] as f64);
                    }
                    for c in 0..3 {
                        assert_eq!(blk[1][r * 3 + c], xs[0][g * 3 + c] as f64);
                        assert_eq!(blk[2][r * 3 + c], ys[0][g * 3 + c] as f64);
                    }
                }
                seen += rows;
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, n);
        }
        // One block read by hand (the pull-mode unit), pages kept or released: same rows.
        for keep in [false, true] {
            let mut one = StoreRows::new(&s, vec![0]).unwrap();
            if keep {
                one = one.keeping_pages();
            }
            let mut buf = [0f32; 4 * 3];
            read_into(&one, 10, 14, &mut [&mut buf[..]]).unwrap();
            assert_eq!(buf[..], xs[0][30..42]);
            assert!(read_into(&one, 10, 14, &mut [&mut buf[..3]]).is_err());
        }
        let mut out = vec![0.0; 2 * 3];
        both.take_f64(2, &[39, 0], &mut out).unwrap();
        assert_eq!(out[3..], [0.0, 0.5, 1.0]);
        assert_eq!(out[0], ys[0][39 * 3] as f64);
        both.take_f64(0, &[1], &mut out[..5]).unwrap();
        assert_eq!(out[0], xs[1][5] as f64);
        assert!(both.take_f64(3, &[1], &mut out[..3]).is_err());
        assert!(a.take_f64(1, &[40], &mut out[..3]).is_err());
    }

    #[test]
    fn errors_and_interrupts_stop_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(dir.path(), "a", 20);
        let (t, _) = store(dir.path(), "b", 21);
        assert!(StoreRows::new(&s, vec![2]).is_err());
        let sel = StoreRows::new(&s, vec![0]).unwrap();
        assert!(run::<f32>(&sel, 0, &NoMonitor, |_, _| Ok(())).is_err());
        let mut calls = 0;
        let r = run::<f32>(&sel, 3, &NoMonitor, |_, _| {
            calls += 1;
            if calls == 2 {
                Err(Error::invalid("stop"))
            } else {
                Ok(())
            }
        });
        assert!(r.is_err() && calls == 2);
        let flag = AtomicBool::new(true);
        assert!(matches!(
            run::<f32>(&sel, 3, &FlagMonitor(&flag), |_, _| Ok(())),
            Err(Error::Interrupted)
        ));
        let longer = StoreRows::new(&t, vec![0]).unwrap();
        assert!(matches!(
            Rows::new(vec![&sel, &longer]),
            Err(Error::Mismatch(_))
        ));
        assert!(Rows::new(vec![]).is_err());
        // An empty selection streams its rows with no layer data.
        let none = StoreRows::new(&s, vec![]).unwrap();
        let mut rows = 0;
        run::<f32>(&none, 8, &NoMonitor, |blk, r| {
            assert!(blk.is_empty());
            rows += r;
            Ok(())
        })
        .unwrap();
        assert_eq!(rows, 20);
    }

    #[test]
    fn arrays_and_samples_stream_like_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let n = 40;
        let (s, xs) = store(dir.path(), "a", n);
        let st = StoreRows::new(&s, vec![0, 1]).unwrap();
        // Layer 0 as bf16 bits (exact: the values are multiples of 0.25 below 256), layer 1
        // as f64 inside a wider buffer (a column slice: row stride 7, width 5).
        let bits: Vec<u16> = xs[0]
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let mut wide = vec![f64::NAN; n * 7];
        for r in 0..n {
            for c in 0..5 {
                wide[r * 7 + c] = xs[1][r * 5 + c] as f64;
            }
        }
        let arr = ArrayRows::new(vec![
            ArrayLayer::new(Values::BF16Bits(&bits), n, 3, 3).unwrap(),
            ArrayLayer::new(Values::F64(&wide[..(n - 1) * 7 + 5]), n, 5, 7).unwrap(),
        ])
        .unwrap();
        assert!(arr.has_f64() && !st.has_f64());
        let collect = |src: &dyn RowSource, br: usize| {
            let mut out = vec![Vec::new(), Vec::new()];
            run::<f32>(src, br, &NoMonitor, |blk, _| {
                out[0].extend_from_slice(blk[0]);
                out[1].extend_from_slice(blk[1]);
                Ok(())
            })
            .unwrap();
            out
        };
        for br in [1, 3, 40] {
            assert_eq!(collect(&arr, br), collect(&st, 8));
        }
        let idx = [39u64, 0, 7, 7, 20];
        for src in [&arr as &dyn RowSource, &st] {
            let sub = Subset::new(src, &idx).unwrap();
            assert_eq!(sub.num_rows(), 5);
            let got = collect(&sub, 2);
            for (k, &r) in idx.iter().enumerate() {
                let r = r as usize;
                assert_eq!(got[0][k * 3..k * 3 + 3], xs[0][r * 3..r * 3 + 3]);
                assert_eq!(got[1][k * 5..k * 5 + 5], xs[1][r * 5..r * 5 + 5]);
            }
            let mut one = [0.0f64; 5];
            sub.take_f64(1, &[1], &mut one).unwrap();
            assert_eq!(one[0], xs[1][0] as f64);
            assert!(sub.take_f64(1, &[5], &mut one).is_err());
            assert!(Subset::new(src, &[40]).is_err());
        }
        // Bad shapes are errors, never out-of-bounds reads.
        let a = [1.0f32; 6];
        assert!(ArrayLayer::new(Values::F32(&a), 3, 3, 3).is_err());
        assert!(ArrayLayer::new(Values::F32(&a), 2, 3, 2).is_err());
        assert!(ArrayLayer::new(Values::F32(&a), 0, 3, 3).is_ok());
        assert!(matches!(
            ArrayRows::new(vec![
                ArrayLayer::new(Values::F32(&a), 2, 3, 3).unwrap(),
                ArrayLayer::new(Values::F32(&a), 3, 2, 2).unwrap(),
            ]),
            Err(Error::Mismatch(_))
        ));
        let mut out = vec![0.0f32; 3];
        assert!(arr.read_f32(39, 41, &mut [&mut out, &mut []]).is_err());
        assert!(arr.take_f32(0, &[40], &mut out).is_err());
    }
}
