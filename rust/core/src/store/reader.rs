//! The validated, memory-mapped store reader.
use super::dtype::{DType, Element};
use super::files;
use super::manifest::{LayerInfo, Manifest, ShardInfo, MANIFEST_NAME, MAX_MANIFEST_BYTES, ROW_ID};
use super::mapped::{advise_dont_need, open_shard, Shard};
use crate::error::{Error, Result};
use crate::memory::{try_vec, try_with_capacity};
use rayon::prelude::*;
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Elements per parallel task when converting (about 1 MiB of f32 output).
const PAR_CHUNK_ELEMS: usize = 1 << 18;

/// Options of [`Store::open_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Check each shard's sha256 against the manifest before the first read of any of its
    /// rows (once per shard, during the pass that first reads it: no extra pass over the
    /// data); [`Store::verify`] checks every shard now.
    pub verify_checksums: bool,
}

/// An opened activation store (see docs/FORMAT.md). Cheap to share across threads (`Sync`):
/// every read is a pure function of the immutable mapped files.
///
/// Safety note on mmap: the shards are mapped read-only; a shard truncated by another process
/// while mapped makes the OS raise SIGBUS on access. The writer never modifies a finished
/// shard (it writes new files and renames them), so this only happens when someone else edits
/// a store; every read first checks that each shard it touches is still the file opened, with
/// the same size and modification time (an `Error::Mismatch` otherwise), so only a truncation
/// in the microseconds between that check and the copy can still crash the process.
pub struct Store {
    path: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    shard_starts: Vec<u64>,
    verify_checksums: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("layers", &self.manifest.layers)
            .field("num_rows", &self.manifest.num_rows)
            .field("shards", &self.manifest.shards.len())
            .finish()
    }
}

impl Store {
    /// Opens and validates a store (sizes always; checksums only with
    /// [`Store::open_with`]`(.., OpenOptions { verify_checksums: true })` or [`Store::verify`]).
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, OpenOptions::default())
    }

    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<Store> {
        let md = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
                msg: "no such store folder".into(),
            },
            _ => Error::io(path, e),
        })?;
        if !md.is_dir() {
            return Err(Error::format(
                path,
                "a store is a folder (with layerscope.json); this is a file",
            ));
        }
        let root = path.canonicalize().map_err(|e| Error::io(path, e))?;
        let mpath = path.join(MANIFEST_NAME);
        if std::fs::symlink_metadata(&mpath).is_err() {
            return Err(Error::NotFound {
                path: mpath.clone(),
                msg: "no manifest: not a layerscope store (or the writer never finished a shard)"
                    .into(),
            });
        }
        // A link, like a shard's, only to a file of the store; only a regular file, read
        // within the manifest's size limit (never a FIFO that blocks or /dev/zero).
        let real = files::confined(&root, &mpath, "the manifest")?;
        let mbytes = files::read_regular(&real, "the manifest", MAX_MANIFEST_BYTES)?;
        let manifest = Manifest::parse(&mbytes, &mpath)?;
        let shards = manifest
            .shards
            .par_iter()
            .map(|info| open_shard(&root, info, &manifest))
            .collect::<Vec<Result<_>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?; // the first bad shard in order, on every run
        let shard_starts = manifest.shards.iter().map(|s| s.start_row).collect();
        Ok(Store {
            path: path.to_path_buf(),
            manifest,
            shards,
            shard_starts,
            verify_checksums: opts.verify_checksums,
        })
    }

    /// Recomputes the sha256 of every shard file now and compares it with the manifest.
    /// Error::Mismatch naming the first shard (in order) that differs.
    pub fn verify(&self) -> Result<()> {
        let res: Vec<Result<()>> = self
            .shards
            .par_iter()
            .map(|s| {
                s.check_unchanged()?;
                let r = s.check_sha256();
                let _ = s.verified.set(r.clone());
                r.map_err(Error::Mismatch)
            })
            .collect();
        res.into_iter().collect()
    }

    /// Whether every read checks the sha256 of the shards it touches (once per shard).
    pub fn verifies_checksums(&self) -> bool {
        self.verify_checksums
    }

    /// Before a read of the shards `idx`: each is still the file opened (always; cheap) and,
    /// with `verify_checksums`, its sha256 matches the manifest (hashed once, at its first
    /// read).
    fn check_shards(&self, idx: impl IntoIterator<Item = usize>) -> Result<()> {
        for i in idx {
            let s = self.shards.get(i).ok_or_else(|| internal(&self.path))?;
            s.check_unchanged()?;
            if self.verify_checksums {
                s.verified
                    .get_or_init(|| s.check_sha256())
                    .clone()
                    .map_err(Error::Mismatch)?;
            }
        }
        Ok(())
    }

    /// The shards holding rows `[start, stop)` (empty when the range is).
    fn shards_of(&self, start: u64, stop: u64) -> Range<usize> {
        if start >= stop {
            return 0..0;
        }
        self.shard_of(start)..self.shard_of(stop - 1) + 1
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn layers(&self) -> &[LayerInfo] {
        &self.manifest.layers
    }
    pub fn num_rows(&self) -> u64 {
        self.manifest.num_rows
    }
    pub fn metadata(&self) -> &Value {
        &self.manifest.metadata
    }
    pub fn shards(&self) -> &[ShardInfo] {
        &self.manifest.shards
    }
    /// Names of the optional row columns (`__sample__`, …) present in every shard.
    pub fn columns(&self) -> &[String] {
        &self.manifest.columns
    }
    /// False when the writer did not call `finish` (interrupted capture).
    pub fn is_complete(&self) -> bool {
        self.manifest.complete
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Total bytes of all shard files.
    pub fn total_bytes(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.bytes).sum()
    }

    /// Index of a layer by name; Error::MissingLayer listing the available names.
    pub fn layer_index(&self, name: &str) -> Result<usize> {
        self.manifest
            .layers
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| {
                let names = self.manifest.layer_names();
                Error::MissingLayer(format!(
                    "layer {name:?} not found in {}; available: {}",
                    self.path.display(),
                    names.join(", ")
                ))
            })
    }

    fn layer(&self, layer: usize) -> Result<&LayerInfo> {
        self.manifest.layers.get(layer).ok_or_else(|| {
            Error::invalid(format!(
                "layer index {layer} out of range (the store has {} layers)",
                self.manifest.layers.len()
            ))
        })
    }

    fn check_range(&self, start: u64, stop: u64) -> Result<()> {
        if start > stop || stop > self.manifest.num_rows {
            return Err(Error::invalid(format!(
                "row range [{start}, {stop}) is not within [0, {}]",
                self.manifest.num_rows
            )));
        }
        Ok(())
    }

    /// Index of the shard holding global row `row` (row < num_rows).
    fn shard_of(&self, row: u64) -> usize {
        self.shard_starts
            .partition_point(|&s| s <= row)
            .saturating_sub(1)
    }

    fn read_i64(&self, pick: impl Fn(&Shard) -> &Range<usize>) -> Result<Vec<i64>> {
        let mut out = try_with_capacity(
            usize::try_from(self.manifest.num_rows).unwrap_or(usize::MAX),
            "the row ids",
        )?;
        self.check_shards(0..self.shards.len())?;
        for s in &self.shards {
            let bytes = s
                .map
                .get(pick(s).clone())
                .ok_or_else(|| internal(&s.path))?;
            out.extend(bytes.chunks_exact(8).map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                i64::from_le_bytes(a)
            }));
        }
        Ok(out)
    }

    /// The `__row_id__` of every row, in order.
    pub fn row_ids(&self) -> Result<Vec<i64>> {
        self.read_i64(|s| &s.row_id)
    }

    /// An optional row column (`__sample__`, …); `None` when the store does not have it.
    pub fn column(&self, name: &str) -> Result<Option<Vec<i64>>> {
        if name == ROW_ID {
            return self.row_ids().map(Some);
        }
        match self.manifest.columns.iter().position(|c| c == name) {
            None => Ok(None),
            Some(i) => self.read_i64(|s| &s.columns[i]).map(Some),
        }
    }

    /// Serial fill of `out` (a whole number of rows) with rows from `row` on.
    fn fill<T: Element>(
        &self,
        layer: usize,
        dtype: DType,
        dim: usize,
        mut row: u64,
        mut out: &mut [T],
    ) -> Result<()> {
        let esize = dtype.size();
        while !out.is_empty() {
            let si = self.shard_of(row);
            let s = self.shards.get(si).ok_or_else(|| internal(&self.path))?;
            let local = (row - s.info.start_row) as usize;
            let avail = s.info.rows as usize - local;
            let take = avail.min(out.len() / dim);
            if take == 0 {
                return Err(internal(&s.path));
            }
            let r = s.layers.get(layer).ok_or_else(|| internal(&s.path))?;
            let b0 = r.start + local * dim * esize;
            let src = s
                .map
                .get(b0..b0 + take * dim * esize)
                .ok_or_else(|| internal(&s.path))?;
            let (head, tail) = out.split_at_mut(take * dim);
            T::convert(dtype, src, head);
            out = tail;
            row += take as u64;
        }
        Ok(())
    }

    /// Rows `[start, stop)` of one layer, row-major (`(stop-start) × dim`), across shards,
    /// converted to `T` (bf16/f16 exactly; f64 → f32 rounds). Nothing is dropped: NaN/Inf
    /// come through as stored (see [`Store::find_nonfinite`]). Parallel over row chunks.
    pub fn read_rows<T: Element>(&self, layer: usize, start: u64, stop: u64) -> Result<Vec<T>> {
        let n = self.block_len(layer, start, stop)?;
        let mut out = try_vec(
            n,
            T::default(),
            format_args!("a block of {} rows", stop - start),
        )?;
        self.read_rows_into(layer, start, stop, &mut out)?;
        Ok(out)
    }

    /// Elements of rows `[start, stop)` of `layer` (`(stop - start) × dim`), after checking
    /// the layer and the range.
    pub fn block_len(&self, layer: usize, start: u64, stop: u64) -> Result<usize> {
        let dim = self.layer(layer)?.dim;
        self.check_range(start, stop)?;
        usize::try_from(stop - start)
            .ok()
            .and_then(|r| r.checked_mul(dim))
            .ok_or_else(|| Error::Memory("requested block too large".into()))
    }

    /// [`Store::read_rows`] into a caller's buffer of exactly `(stop - start) × dim`
    /// elements (e.g. a numpy array, or a buffer reused across blocks: no allocation here).
    pub fn read_rows_into<T: Element>(
        &self,
        layer: usize,
        start: u64,
        stop: u64,
        out: &mut [T],
    ) -> Result<()> {
        let n = self.block_len(layer, start, stop)?;
        if out.len() != n {
            return Err(Error::invalid(format!(
                "output buffer has {} elements, rows [{start}, {stop}) of the layer need {n}",
                out.len()
            )));
        }
        let info = self.layer(layer)?;
        let (dim, dtype) = (info.dim, info.dtype);
        self.check_shards(self.shards_of(start, stop))?;
        let chunk_rows = (PAR_CHUNK_ELEMS / dim).max(1);
        if n <= PAR_CHUNK_ELEMS {
            self.fill(layer, dtype, dim, start, out)
        } else {
            out.par_chunks_mut(chunk_rows * dim)
                .enumerate()
                .try_for_each(|(i, c)| {
                    self.fill(layer, dtype, dim, start + (i * chunk_rows) as u64, c)
                })
        }
    }

    /// [`Store::read_block`] into caller buffers (`outs[i]` for `layers[i]`, each of exactly
    /// `(stop - start) × dim` elements). Parallel over layers and row chunks.
    pub fn read_block_into<T: Element>(
        &self,
        layers: &[usize],
        start: u64,
        stop: u64,
        outs: &mut [&mut [T]],
    ) -> Result<()> {
        crate::error::check_outs(outs.len(), layers.len(), "layers")?;
        outs.par_iter_mut()
            .zip(layers.par_iter())
            .try_for_each(|(o, &l)| self.read_rows_into(l, start, stop, o))
    }

    /// Rows `[start, stop)` of several layers (one row-major Vec per layer, in the given
    /// order). Parallel over layers and row chunks.
    pub fn read_block<T: Element>(
        &self,
        layers: &[usize],
        start: u64,
        stop: u64,
    ) -> Result<Vec<Vec<T>>> {
        for &l in layers {
            self.layer(l)?;
        }
        self.check_range(start, stop)?;
        layers
            .par_iter()
            .map(|&l| self.read_rows(l, start, stop))
            .collect()
    }

    /// The rows at `rows` (any order, repeats allowed; each < num_rows) of one layer,
    /// row-major `rows.len() × dim`.
    pub fn take<T: Element>(&self, layer: usize, rows: &[u64]) -> Result<Vec<T>> {
        let dim = self.layer(layer)?.dim;
        let n = rows
            .len()
            .checked_mul(dim)
            .ok_or_else(|| Error::Memory("requested block too large".into()))?;
        let mut out = try_vec(n, T::default(), format_args!("{} sampled rows", rows.len()))?;
        self.take_into(layer, rows, &mut out)?;
        Ok(out)
    }

    /// [`Store::take`] into a caller's buffer of exactly `rows.len() × dim` elements.
    pub fn take_into<T: Element>(&self, layer: usize, rows: &[u64], out: &mut [T]) -> Result<()> {
        let info = self.layer(layer)?;
        let (dim, dtype) = (info.dim, info.dtype);
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.manifest.num_rows) {
            return Err(Error::invalid(format!(
                "row {bad} out of range (the store has {} rows)",
                self.manifest.num_rows
            )));
        }
        crate::error::check_out_len(out.len(), rows.len(), dim)?;
        let mut touched = vec![false; self.shards.len()];
        for &r in rows {
            touched[self.shard_of(r)] = true;
        }
        self.check_shards((0..touched.len()).filter(|&i| touched[i]))?;
        out.par_chunks_mut(dim)
            .zip(rows.par_iter())
            .with_min_len((PAR_CHUNK_ELEMS / dim).max(1))
            .try_for_each(|(o, &r)| self.fill(layer, dtype, dim, r, o))
    }

    /// Drops the memory-mapped pages of rows `[start, stop)` (every layer and row column)
    /// from this process's resident set: a streaming reader calls it after it has used a
    /// block, so that its peak RSS stays about one block instead of growing to the whole
    /// store. The data stays readable (a later read maps the pages again, from the OS page
    /// cache, which keeps them); pages shared with neighbouring rows may be dropped too,
    /// which only costs a re-map. A no-op on non-Unix systems.
    pub fn release(&self, start: u64, stop: u64) -> Result<()> {
        self.check_range(start, stop)?;
        if start == stop {
            return Ok(());
        }
        let first = self.shard_of(start);
        for s in self.shards.iter().skip(first) {
            let s_start = s.info.start_row;
            if s_start >= stop {
                break;
            }
            let lo = start.max(s_start) - s_start;
            let hi = stop.min(s_start + s.info.rows) - s_start;
            if lo >= hi {
                continue;
            }
            let (lo, hi) = (lo as usize, hi as usize);
            for (r, l) in s.layers.iter().zip(&self.manifest.layers) {
                let row_bytes = l.dim * l.dtype.size();
                advise_dont_need(&s.map, r.start + lo * row_bytes, (hi - lo) * row_bytes);
            }
            for r in std::iter::once(&s.row_id).chain(&s.columns) {
                advise_dont_need(&s.map, r.start + lo * 8, (hi - lo) * 8);
            }
        }
        Ok(())
    }

    /// The first row of `layer` holding a NaN or ±Inf, or `None` when all are finite.
    pub fn find_nonfinite(&self, layer: usize) -> Result<Option<u64>> {
        let info = self.layer(layer)?;
        let (dim, dtype) = (info.dim, info.dtype);
        let esize = dtype.size();
        self.check_shards(0..self.shards.len())?;
        // (shard, chunk) tasks in row order; find_map_first keeps the earliest hit.
        let mut tasks = Vec::new();
        for (si, s) in self.shards.iter().enumerate() {
            let rows = s.info.rows as usize;
            let step = (PAR_CHUNK_ELEMS / dim).max(1);
            let mut r = 0;
            while r < rows {
                tasks.push((si, r, (r + step).min(rows)));
                r += step;
            }
        }
        let hit = tasks.par_iter().find_map_first(|&(si, r0, r1)| {
            let s = self.shards.get(si)?;
            let b0 = s.layers.get(layer)?.start + r0 * dim * esize;
            let bytes = s.map.get(b0..b0 + (r1 - r0) * dim * esize)?;
            dtype
                .first_nonfinite(bytes)
                .map(|i| s.info.start_row + (r0 + i / dim) as u64)
        });
        Ok(hit)
    }
}

fn internal(path: &Path) -> Error {
    Error::format(
        path,
        "internal inconsistency between validated header and data (please report)",
    )
}
