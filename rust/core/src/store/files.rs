//! Opening a user's file without trusting what it is: only regular files are opened for
//! reading, never a FIFO (whose `open` blocks until a writer comes), a socket, a device
//! (`/dev/zero` reads forever) or a folder; every read is bounded by a size known before it
//! starts; a path that resolves outside its folder is refused.
use crate::error::{Error, Result};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a non-regular file is, in words.
fn kind(md: &Metadata) -> &'static str {
    let t = md.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// `path` opened read-only if it is a regular file: checked before opening (`stat`, which
/// follows symlinks), opened non-blocking (a file swapped for a FIFO in between does not
/// block) and checked again on the open descriptor. `what` names the file in the error:
/// [`Error::Format`] for anything else, [`Error::NotFound`] when it does not exist.
pub fn open_regular(path: &Path, what: &str) -> Result<(File, Metadata)> {
    let refuse = |md: &Metadata| {
        Error::format(
            path,
            format!("{what} is {}, not a regular file: refused", kind(md)),
        )
    };
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: path.to_path_buf(),
            msg: format!("{what} is missing"),
        },
        _ => Error::io(path, e),
    })?;
    if !md.is_file() {
        return Err(refuse(&md));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let md = file.metadata().map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(refuse(&md));
    }
    Ok((file, md))
}

/// The whole of the regular file `path` (see [`open_regular`]), refused before reading when
/// it is larger than `limit` bytes; a file that grows while read is cut at its size when
/// opened plus one byte and refused.
pub fn read_regular(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let (file, md) = open_regular(path, what)?;
    let len = md.len();
    if len > limit {
        return Err(Error::format(
            path,
            format!("{what} of {len} bytes exceeds the {limit}-byte limit"),
        ));
    }
    let mut out = crate::memory::try_with_capacity(len as usize + 1, format_args!("{what}"))?;
    file.take(len + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    if out.len() as u64 != len {
        return Err(Error::format(
            path,
            format!(
                "{what} changed size while read ({len} bytes when opened, {} read)",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// `dir/name` resolved (symlinks followed) and required to lie directly in `root` (the
/// store folder, itself resolved): a store's files may be links, but only to its own files.
pub fn confined(root: &Path, dir_entry: &Path, what: &str) -> Result<PathBuf> {
    let real = dir_entry.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: dir_entry.to_path_buf(),
            msg: format!("{what} is missing"),
        },
        _ => Error::io(dir_entry, e),
    })?;
    if real.parent() != Some(root) {
        return Err(Error::format(
            dir_entry,
            format!(
                "{what} resolves to {} which is outside the store folder",
                real.display()
            ),
        ));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ls-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tmp("fifo");
        let p = d.join("pipe");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&p, "the manifest").unwrap_err().to_string();
        assert!(e.contains("named pipe"), "{e}");
        let e = read_regular(&p, "the manifest", 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn devices_folders_and_missing_files() {
        let e = read_regular(Path::new("/dev/zero"), "x", 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device"), "{e}");
        let d = tmp("dir");
        let e = open_regular(&d, "x").unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        assert!(matches!(
            open_regular(&d.join("nope"), "x"),
            Err(Error::NotFound { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_are_bounded_and_links_confined() {
        let d = tmp("bound");
        let p = d.join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_regular(&p, "f", 10).unwrap(), b"0123456789");
        let e = read_regular(&p, "f", 9).unwrap_err().to_string();
        assert!(e.contains("exceeds the 9-byte limit"), "{e}");
        let root = d.canonicalize().unwrap();
        std::os::unix::fs::symlink("f", d.join("inside")).unwrap();
        assert_eq!(
            confined(&root, &d.join("inside"), "x").unwrap(),
            root.join("f")
        );
        std::os::unix::fs::symlink("/dev/zero", d.join("out")).unwrap();
        let e = confined(&root, &d.join("out"), "the manifest")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the store folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
