//! The store writer: append row batches, rotate shards by size, commit each shard atomically
//! (temp file → fsync → rename → fsync folder) and rewrite the manifest atomically after each.
use super::dtype::{DType, Values};
use super::lock::{lock_store, LOCK_NAME};
use super::manifest::{
    is_column_name, is_layer_name, is_plain_file_name, LayerInfo, Manifest, ShardInfo,
    MANIFEST_NAME, ROW_ID,
};
use super::shard::build_header;
use crate::error::{Error, Result};
use crate::monitor::{Monitor, NoMonitor};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A 2-D row-major batch handed to [`StoreWriter::append`].
#[derive(Debug, Clone, Copy)]
pub struct ArrayData<'a> {
    pub values: Values<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> ArrayData<'a> {
    pub fn new(values: Values<'a>, rows: usize, cols: usize) -> Self {
        ArrayData { values, rows, cols }
    }
}

/// Options of [`StoreWriter::create`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Target shard size in bytes (layers + row columns); a shard holds
    /// `max(1, shard_bytes / bytes_per_row)` rows.
    pub shard_bytes: u64,
    /// Replace an existing store (see [`StoreWriter::create`] for exactly what is removed).
    pub overwrite: bool,
    /// Free-form JSON object stored in the manifest.
    pub metadata: Value,
    /// Store dtype of every layer; `None` keeps each layer's input dtype of the first append.
    pub dtype: Option<DType>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            shard_bytes: 256 << 20,
            overwrite: false,
            metadata: Value::Object(Default::default()),
            dtype: None,
        }
    }
}

/// The rows a writer holds until it has a shard's worth: per layer the values encoded in the
/// store dtype, the row ids and the per-row columns.
#[derive(Debug, Default)]
struct Pending {
    values: Vec<Vec<u8>>,
    ids: Vec<i64>,
    cols: Vec<Vec<i64>>,
    rows: usize,
}

impl Pending {
    /// Empty buffers for `layers` layers and `cols` columns.
    fn new(layers: usize, cols: usize) -> Self {
        Pending {
            values: vec![Vec::new(); layers],
            cols: vec![Vec::new(); cols],
            ..Default::default()
        }
    }

    /// Empties the buffers, keeping their allocations.
    fn clear(&mut self) {
        self.values.iter_mut().for_each(Vec::clear);
        self.cols.iter_mut().for_each(Vec::clear);
        self.ids.clear();
        self.rows = 0;
    }
}

/// Incremental writer. Dropping it without [`StoreWriter::finish`] discards only the rows
/// buffered since the last shard: the folder stays a valid store of the finished shards
/// (manifest `"complete": false`).
#[derive(Debug)]
pub struct StoreWriter {
    path: PathBuf,
    opts: WriterOptions,
    manifest: Manifest,
    /// The rows appended since the last shard.
    pending: Pending,
    rows_per_shard: usize,
    rows_appended: u64,
    /// Set when an append failed part-way: the buffers no longer match `rows_appended`.
    poisoned: bool,
    /// The store's writer lock, held while this writer lives (closing it releases it).
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `dir/.NAME.PID.tmp` (a name of this process's own), fsyncs, renames to
/// `dir/NAME`, fsyncs the folder.
fn atomic_write(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let dst = dir.join(name);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        for p in parts {
            f.write_all(p).map_err(io(&tmp))?;
        }
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &dst).map_err(io(&dst))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    sync_dir(dir)
}

/// True for names this writer creates (and may remove when overwriting).
fn is_own_file(name: &str) -> bool {
    let shard = |n: &str| {
        n.strip_prefix("shard-")
            .and_then(|r| r.strip_suffix(".safetensors"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    // `.NAME.tmp` (older writers) or `.NAME.PID.tmp`
    let temp = |r: &str| {
        let base = match r.rsplit_once('.') {
            Some((b, pid)) if !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit()) => b,
            _ => r,
        };
        base == MANIFEST_NAME || shard(base)
    };
    name == MANIFEST_NAME
        || shard(name)
        || name
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".tmp"))
            .is_some_and(temp)
}

impl StoreWriter {
    /// Creates the store folder (and parents) and writes an empty manifest.
    ///
    /// * The folder does not exist or is empty → it is used.
    /// * It exists and is not empty → `Error::Exists`, unless `overwrite`.
    /// * With `overwrite`, the old manifest is removed first (so the folder stops being a
    ///   store at once), then the shard files the old manifest lists and any file named like
    ///   this writer's files (`shard-NNNNN.safetensors`, `.…tmp`). Nothing else is touched:
    ///   unrelated files in the folder stay. A path that is a file → `Error::Exists` always.
    pub fn create(path: &Path, opts: WriterOptions) -> Result<StoreWriter> {
        if opts.shard_bytes == 0 {
            return Err(Error::invalid("shard_bytes must be positive"));
        }
        if !opts.metadata.is_object() {
            return Err(Error::invalid("metadata must be a JSON object"));
        }
        let exists = match fs::symlink_metadata(path) {
            Ok(_) if !path.is_dir() => {
                return Err(Error::Exists {
                    path: path.to_path_buf(),
                    msg: "exists and is not a folder".into(),
                })
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(path, e)),
        };
        // One writer per store: the lock before anything in the folder changes, so that a
        // second writer (with overwrite too) never removes the files of one still writing.
        // A folder that is not empty is refused before a lock file is put in it (a writer
        // still at work there has one: that is the error then).
        let mut lock = None;
        if exists && !opts.overwrite {
            if fs::symlink_metadata(path.join(LOCK_NAME)).is_ok() {
                lock = Some(lock_store(path)?);
            }
            Self::check_empty(path)?;
        }
        if !exists {
            fs::create_dir_all(path).map_err(io(path))?;
        }
        let lock = match lock {
            Some(l) => l,
            None => lock_store(path)?,
        };
        let names = Self::entries(path)?;
        if !names.is_empty() {
            if !opts.overwrite {
                Self::check_empty(path)?;
            }
            Self::remove_old(path, &names)?;
        }
        let manifest = Manifest {
            layers: vec![],
            columns: vec![],
            shards: vec![],
            num_rows: 0,
            complete: false,
            metadata: opts.metadata.clone(),
        };
        let w = StoreWriter {
            path: path.to_path_buf(),
            opts,
            manifest,
            pending: Pending::default(),
            rows_per_shard: 1,
            rows_appended: 0,
            poisoned: false,
            _lock: lock,
        };
        w.write_manifest()?;
        Ok(w)
    }

    /// The names in the folder `path`, less the writer lock's file.
    fn entries(path: &Path) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(path).map_err(io(path))? {
            let e = e.map_err(io(path))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != LOCK_NAME {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// [`Error::Exists`] unless the folder `path` is empty (its writer lock aside).
    fn check_empty(path: &Path) -> Result<()> {
        let names = Self::entries(path)?;
        if names.is_empty() {
            return Ok(());
        }
        Err(Error::Exists {
            path: path.to_path_buf(),
            msg: format!(
                "folder is not empty ({}); pass overwrite=True, or --overwrite on the command line, to replace a store",
                if names.iter().any(|n| n == MANIFEST_NAME) {
                    "an existing store"
                } else {
                    "other files"
                }
            ),
        })
    }

    fn remove_old(path: &Path, names: &[String]) -> Result<()> {
        let mpath = path.join(MANIFEST_NAME);
        let mut listed: Vec<String> = Vec::new();
        if let Ok(bytes) =
            super::files::read_regular(&mpath, "the manifest", super::manifest::MAX_MANIFEST_BYTES)
        {
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                if let Some(arr) = v.get("shards").and_then(Value::as_array) {
                    for s in arr {
                        if let Some(f) = s.get("file").and_then(Value::as_str) {
                            if is_plain_file_name(f) {
                                listed.push(f.to_string());
                            }
                        }
                    }
                }
            }
            fs::remove_file(&mpath).map_err(io(&mpath))?;
        }
        for n in names.iter().filter(|n| is_own_file(n)).chain(listed.iter()) {
            let p = path.join(n);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_file() || md.file_type().is_symlink() => {
                    fs::remove_file(&p).map_err(io(&p))?;
                }
                _ => {}
            }
        }
        sync_dir(path)
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::invalid(format!(
                "an earlier append to {} stopped part-way (interrupted or an I/O error); the \
                 store keeps the {} rows of its finished shards; open a new writer to rewrite it",
                self.path.display(),
                self.manifest.num_rows
            )));
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        atomic_write(&self.path, MANIFEST_NAME, &[&self.manifest.to_bytes()])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Rows passed to `append` so far (finished shards + buffer).
    pub fn rows_appended(&self) -> u64 {
        self.rows_appended
    }
    /// Rows in finished shards (what a reader would see now).
    pub fn rows_committed(&self) -> u64 {
        self.manifest.num_rows
    }
    /// The layers, fixed by the first append (empty before).
    pub fn layers(&self) -> &[LayerInfo] {
        &self.manifest.layers
    }

    fn bytes_per_row(&self) -> u64 {
        let l: u64 = self
            .manifest
            .layers
            .iter()
            .map(|l| (l.dim * l.dtype.size()) as u64)
            .sum();
        l + 8 * (1 + self.manifest.columns.len() as u64)
    }

    /// Appends a batch: every layer `rows × dim` (row-major), the same `rows` for all.
    /// `row_ids` default to the running row count; `columns` are optional I64 row columns
    /// (`__sample__`, …). The first append fixes layer names (in the given order), dims,
    /// store dtypes and column names; later ones must match (Error::Mismatch).
    pub fn append(
        &mut self,
        layers: &[(&str, ArrayData)],
        row_ids: Option<&[i64]>,
        columns: &[(&str, &[i64])],
    ) -> Result<()> {
        self.append_monitored(layers, row_ids, columns, &NoMonitor)
    }

    /// [`StoreWriter::append`] calling `monitor.progress(rows_done, rows)` before each piece
    /// of at most one shard, so that a long append can be interrupted (Ctrl-C). An error
    /// that stops an append part-way (interrupt, I/O error) leaves the store valid with the
    /// shards finished so far, and the writer refuses further appends and `finish`
    /// (the rows buffered at that point are not written). Argument errors (mismatched
    /// layers, rows, ids) are raised before anything is buffered and leave the writer usable.
    pub fn append_monitored(
        &mut self,
        layers: &[(&str, ArrayData)],
        row_ids: Option<&[i64]>,
        columns: &[(&str, &[i64])],
        monitor: &dyn Monitor,
    ) -> Result<()> {
        self.check_usable()?;
        if layers.is_empty() {
            return Err(Error::invalid("append needs at least one layer"));
        }
        let rows = layers[0].1.rows;
        for (name, a) in layers {
            if a.rows.checked_mul(a.cols) != Some(a.values.len()) {
                return Err(Error::invalid(format!(
                    "layer {name:?}: {} values do not make a {} × {} array",
                    a.values.len(),
                    a.rows,
                    a.cols
                )));
            }
            if a.rows != rows {
                return Err(Error::Mismatch(format!(
                    "layer {name:?} has {} rows but layer {:?} has {rows} (all layers must be row-aligned)",
                    a.rows, layers[0].0
                )));
            }
        }
        if let Some(ids) = row_ids {
            if ids.len() != rows {
                return Err(Error::Mismatch(format!(
                    "row_ids has {} entries for {rows} rows",
                    ids.len()
                )));
            }
        }
        for (c, v) in columns {
            if v.len() != rows {
                return Err(Error::Mismatch(format!(
                    "column {c:?} has {} entries for {rows} rows",
                    v.len()
                )));
            }
        }
        if self.manifest.layers.is_empty() {
            self.init_schema(layers, columns)?;
        } else {
            self.check_schema(layers, columns)?;
        }
        // order inputs by manifest layer order / column order
        let order: Vec<ArrayData> = self
            .manifest
            .layers
            .iter()
            .map(|l| {
                layers
                    .iter()
                    .find(|(n, _)| *n == l.name)
                    .map(|(_, a)| *a)
                    .ok_or_else(|| Error::invalid("internal: layer order"))
            })
            .collect::<Result<_>>()?;
        let cols: Vec<&[i64]> = self
            .manifest
            .columns
            .iter()
            .map(|c| {
                columns
                    .iter()
                    .find(|(n, _)| *n == c)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| Error::invalid("internal: column order"))
            })
            .collect::<Result<_>>()?;
        match self.write_rows(&order, &cols, row_ids, rows, monitor) {
            Ok(()) => {
                self.rows_appended += rows as u64;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Encodes `rows` rows into the buffers, committing a shard whenever one is full.
    fn write_rows(
        &mut self,
        order: &[ArrayData],
        cols: &[&[i64]],
        row_ids: Option<&[i64]>,
        rows: usize,
        monitor: &dyn Monitor,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < rows {
            monitor.progress(done as u64, rows as u64)?;
            let take = (self.rows_per_shard - self.pending.rows).min(rows - done);
            for (li, (a, l)) in order.iter().zip(&self.manifest.layers).enumerate() {
                let buf = self
                    .pending
                    .values
                    .get_mut(li)
                    .ok_or_else(|| Error::invalid("internal: layer buffer"))?;
                a.values
                    .encode_into(done * l.dim, (done + take) * l.dim, l.dtype, buf)?;
            }
            match row_ids {
                Some(ids) => self.pending.ids.extend_from_slice(&ids[done..done + take]),
                None => {
                    let base = self.rows_appended + done as u64;
                    self.pending
                        .ids
                        .extend((base..base + take as u64).map(|r| r as i64));
                }
            }
            for (b, c) in self.pending.cols.iter_mut().zip(cols) {
                b.extend_from_slice(&c[done..done + take]);
            }
            self.pending.rows += take;
            done += take;
            if self.pending.rows >= self.rows_per_shard {
                self.flush_shard()?;
            }
        }
        monitor.progress(rows as u64, rows as u64)
    }

    fn init_schema(
        &mut self,
        layers: &[(&str, ArrayData)],
        columns: &[(&str, &[i64])],
    ) -> Result<()> {
        let mut infos: Vec<LayerInfo> = Vec::with_capacity(layers.len());
        for (name, a) in layers {
            if !is_layer_name(name) {
                return Err(Error::invalid(format!(
                    "invalid layer name {name:?} (empty, or starts with \"__\")"
                )));
            }
            if infos.iter().any(|l| l.name == *name) {
                return Err(Error::invalid(format!("duplicate layer name {name:?}")));
            }
            if a.cols == 0 {
                return Err(Error::invalid(format!("layer {name:?} has 0 columns")));
            }
            infos.push(LayerInfo {
                name: name.to_string(),
                dim: a.cols,
                dtype: self.opts.dtype.unwrap_or(a.values.dtype()),
            });
        }
        let mut cols: Vec<String> = Vec::new();
        for (c, _) in columns {
            if !is_column_name(c) {
                return Err(Error::invalid(format!(
                    "invalid column name {c:?} (expected \"__name__\", e.g. __sample__)"
                )));
            }
            if cols.iter().any(|x| x == c) {
                return Err(Error::invalid(format!("duplicate column {c:?}")));
            }
            cols.push(c.to_string());
        }
        self.pending = Pending::new(infos.len(), cols.len());
        self.manifest.layers = infos;
        self.manifest.columns = cols;
        self.rows_per_shard = (self.opts.shard_bytes / self.bytes_per_row())
            .max(1)
            .min(usize::MAX as u64) as usize;
        Ok(())
    }

    fn check_schema(&self, layers: &[(&str, ArrayData)], columns: &[(&str, &[i64])]) -> Result<()> {
        let want = self.manifest.layer_names();
        let mut got: Vec<&str> = layers.iter().map(|(n, _)| *n).collect();
        got.sort_unstable();
        let mut w = want.clone();
        w.sort_unstable();
        if got != w {
            return Err(Error::Mismatch(format!(
                "append got layers [{}], but the store has [{}] (fixed by the first append)",
                layers
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                want.join(", ")
            )));
        }
        for (name, a) in layers {
            if let Some(l) = self.manifest.layers.iter().find(|l| l.name == *name) {
                if l.dim != a.cols {
                    return Err(Error::Mismatch(format!(
                        "layer {name:?}: dim {} but the store has {}",
                        a.cols, l.dim
                    )));
                }
            }
        }
        let mut gc: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        gc.sort_unstable();
        let mut wc: Vec<&str> = self.manifest.columns.iter().map(|s| s.as_str()).collect();
        wc.sort_unstable();
        if gc != wc {
            return Err(Error::Mismatch(format!(
                "append got columns [{}], but the store has [{}]",
                gc.join(", "),
                wc.join(", ")
            )));
        }
        Ok(())
    }

    /// Writes the buffered rows as the next shard and rewrites the manifest.
    fn flush_shard(&mut self) -> Result<()> {
        if self.pending.rows == 0 {
            return Ok(());
        }
        let rows = self.pending.rows as u64;
        let k = self.manifest.shards.len();
        let name = format!("shard-{k:05}.safetensors");
        let mut tensors: Vec<(&str, &str, Vec<u64>, u64)> = Vec::new();
        tensors.push((ROW_ID, "I64", vec![rows], 8 * rows));
        for c in &self.manifest.columns {
            tensors.push((c, "I64", vec![rows], 8 * rows));
        }
        for l in &self.manifest.layers {
            tensors.push((
                &l.name,
                l.dtype.name(),
                vec![rows, l.dim as u64],
                rows * (l.dim * l.dtype.size()) as u64,
            ));
        }
        let header = build_header(
            &tensors,
            &[("format", "layerscope-shard"), ("format_version", "1")],
        );
        let ids: Vec<u8> = self
            .pending
            .ids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let cols: Vec<Vec<u8>> = self
            .pending
            .cols
            .iter()
            .map(|c| c.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let mut parts: Vec<&[u8]> = vec![&header, &ids];
        parts.extend(cols.iter().map(|c| c.as_slice()));
        parts.extend(self.pending.values.iter().map(|b| b.as_slice()));
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        // Hash on one thread while the other writes and fsyncs the temp file.
        let (sha256, written) = rayon::join(
            || {
                let mut h = Sha256::new();
                for p in &parts {
                    h.update(p);
                }
                h.finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            },
            || atomic_write(&self.path, &name, &parts),
        );
        written?;
        let start_row = self.manifest.num_rows;
        self.manifest.shards.push(ShardInfo {
            file: name,
            rows,
            bytes,
            sha256,
            start_row,
        });
        self.manifest.num_rows += rows;
        self.write_manifest()?;
        self.pending.clear();
        Ok(())
    }

    /// Writes the remaining rows and marks the manifest complete.
    pub fn finish(self) -> Result<()> {
        self.finish_as(true)
    }

    /// Writes the remaining rows; the manifest says `"complete": complete` — false for a
    /// writer stopped by an error or Ctrl-C: its rows are valid, but not all that was meant
    /// to be written (docs/FORMAT.md).
    pub fn finish_as(mut self, complete: bool) -> Result<()> {
        self.check_usable()?;
        // The manifest written after the last shard is already the final one (one atomic
        // manifest write fewer). Should that shard fail, no manifest says complete.
        self.manifest.complete = complete;
        if self.pending.rows > 0 {
            self.flush_shard()
        } else {
            self.write_manifest()
        }
    }
}
