//! One mapped shard of a store ([`Shard`]): opened and validated against the manifest
//! ([`open_shard`]), checked unchanged before each read ([`Stamp`]) and, on demand, against
//! its sha256; its pages released after a block is read ([`advise_dont_need`]).
use super::files;
use super::manifest::{Manifest, ShardInfo, ROW_ID};
use super::shard::{parse_header, TensorDType, TensorEntry};
use crate::error::{Error, Result};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What a shard file was when the store was opened (`stat`): a read first checks that the
/// file at the shard's path is still that file, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        }
    }
}

/// One mapped shard with the byte ranges of its tensors (absolute within the file).
pub(super) struct Shard {
    pub(super) info: ShardInfo,
    pub(super) path: PathBuf,
    pub(super) map: Mmap,
    /// Per manifest layer.
    pub(super) layers: Vec<Range<usize>>,
    pub(super) row_id: Range<usize>,
    /// Per manifest column.
    pub(super) columns: Vec<Range<usize>>,
    stamp: Stamp,
    /// With `verify_checksums`: the outcome of the sha256 check (the message of a mismatch).
    pub(super) verified: OnceLock<std::result::Result<(), String>>,
}

impl Shard {
    /// Whether the file at the shard's path is still the one mapped, unchanged (same device,
    /// inode, size and modification time); a typed error before a read that could otherwise
    /// crash the process (SIGBUS on a truncated mapping) or see other bytes.
    pub(super) fn check_unchanged(&self) -> Result<()> {
        let changed = |now: String| {
            Error::Mismatch(format!(
                "{}: the shard {now} after the store was opened (it was {} bytes): refused to \
                 read it (a truncated mapping would crash the process with SIGBUS, a modified \
                 one give other numbers); reopen the store",
                self.path.display(),
                self.stamp.len
            ))
        };
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(changed("was removed".into()))
            }
            Err(e) => Err(Error::io(&self.path, e)),
            Ok(md) => {
                let now = Stamp::of(&md);
                if now == self.stamp {
                    Ok(())
                } else if (now.dev, now.ino) != (self.stamp.dev, self.stamp.ino) {
                    Err(changed("was replaced by another file".into()))
                } else if now.len != self.stamp.len {
                    Err(changed(format!(
                        "was truncated or extended to {} bytes",
                        now.len
                    )))
                } else {
                    Err(changed("was modified".into()))
                }
            }
        }
    }

    /// The sha256 of the mapped bytes against the manifest's.
    pub(super) fn check_sha256(&self) -> std::result::Result<(), String> {
        let got = sha256_hex(&self.map);
        if got != self.info.sha256 {
            return Err(format!(
                "{}: sha256 {got} differs from the manifest's {} (the shard was modified or corrupted)",
                self.path.display(),
                self.info.sha256
            ));
        }
        Ok(())
    }
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `madvise(MADV_DONTNEED)` on `[off, off + len)` of a read-only file mapping (clamped to the
/// map). Errors are ignored: this is only a hint about resident memory.
pub(super) fn advise_dont_need(map: &Mmap, off: usize, len: usize) {
    #[cfg(unix)]
    {
        let end = off.saturating_add(len).min(map.len());
        if off < end {
            // SAFETY: the mapping is read-only and backed by a file that is never modified
            // through it, so dropping its pages loses nothing: a later access maps the same
            // bytes again from the file (page cache). No Rust reference into the mapping is
            // invalidated, since the contents seen through it do not change.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, end - off)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, off, len);
}

/// Opens, maps and validates one shard against the manifest.
pub(super) fn open_shard(root: &Path, info: &ShardInfo, m: &Manifest) -> Result<Shard> {
    let path = root.join(&info.file);
    let real = files::confined(root, &path, "shard listed in the manifest")?;
    let (file, md) = files::open_regular(&real, "the shard")?;
    let size = md.len();
    // what a later read compares with: the file at the listed path (a link's target)
    let stamp = Stamp::of(&std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?);
    if stamp != Stamp::of(&md) {
        return Err(Error::Mismatch(format!(
            "{}: the shard changed while the store was opened; open it again",
            path.display()
        )));
    }
    if size < 8 {
        return Err(Error::format(
            &path,
            format!("file of {size} bytes is too short for a safetensors header (truncated?)"),
        ));
    }
    // SAFETY: read-only private map of a regular file; see the note on `Store`.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let entries = parse_header(&map, &path)?;
    let by_name: HashMap<&str, &TensorEntry> =
        entries.iter().map(|t| (t.name.as_str(), t)).collect();
    // rows consistent across the layers of this shard first (a shard-internal format error)
    let mut first: Option<(&str, u64)> = None;
    for l in &m.layers {
        if let Some(t) = by_name.get(l.name.as_str()) {
            if let Some(&r) = t.shape.first() {
                match first {
                    None => first = Some((&l.name, r)),
                    Some((n0, r0)) if r0 != r => {
                        return Err(Error::format(
                            &path,
                            format!("rows differ across layers: tensor {n0:?} has {r0} rows, tensor {:?} has {r}", l.name),
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
    let rows = info.rows;
    let mut layers = Vec::with_capacity(m.layers.len());
    for l in &m.layers {
        let t = by_name.get(l.name.as_str()).ok_or_else(|| {
            Error::Mismatch(format!(
                "{}: layer {:?} of the manifest is not in the shard",
                path.display(),
                l.name
            ))
        })?;
        match t.dtype {
            TensorDType::Float(d) if d == l.dtype => {}
            other => {
                return Err(Error::Mismatch(format!(
                    "{}: tensor {:?} has dtype {}, the manifest says {}",
                    path.display(),
                    l.name,
                    other.name(),
                    l.dtype
                )))
            }
        }
        if t.shape.len() != 2 {
            return Err(Error::format(
                &path,
                format!(
                    "tensor {:?}: expected a 2-D [rows, dim] tensor, got shape {:?}",
                    l.name, t.shape
                ),
            ));
        }
        if t.shape[1] != l.dim as u64 {
            return Err(Error::Mismatch(format!(
                "{}: tensor {:?} has dim {}, the manifest says {}",
                path.display(),
                l.name,
                t.shape[1],
                l.dim
            )));
        }
        if t.shape[0] != rows {
            return Err(Error::Mismatch(format!(
                "{}: tensor {:?} has {} rows, the manifest says {rows}",
                path.display(),
                l.name,
                t.shape[0]
            )));
        }
        layers.push(t.range.clone());
    }
    let i64_col = |name: &str| -> Result<Range<usize>> {
        let t = by_name.get(name).ok_or_else(|| {
            Error::format(
                &path,
                format!("tensor {name:?} missing (every shard needs it)"),
            )
        })?;
        if t.dtype != TensorDType::I64 || t.shape != [rows] {
            return Err(Error::format(
                &path,
                format!(
                    "tensor {name:?}: expected I64 [{rows}], got {} {:?}",
                    t.dtype.name(),
                    t.shape
                ),
            ));
        }
        Ok(t.range.clone())
    };
    let row_id = i64_col(ROW_ID)?;
    let columns = m
        .columns
        .iter()
        .map(|c| i64_col(c))
        .collect::<Result<Vec<_>>>()?;
    if let Some(extra) = entries.iter().find(|t| {
        t.name != ROW_ID
            && !m.columns.contains(&t.name)
            && !m.layers.iter().any(|l| l.name == t.name)
    }) {
        return Err(Error::Mismatch(format!(
            "{}: tensor {:?} is not in the manifest",
            path.display(),
            extra.name
        )));
    }
    if size != info.bytes {
        return Err(Error::Mismatch(format!(
            "{}: shard has {size} bytes but the manifest says {}",
            path.display(),
            info.bytes
        )));
    }
    Ok(Shard {
        info: info.clone(),
        path,
        map,
        layers,
        row_id,
        columns,
        stamp,
        verified: OnceLock::new(),
    })
}
