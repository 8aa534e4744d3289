//! The writer lock of a store folder: one writer at a time, never stale (an advisory
//! `flock` the kernel releases when its holder exits), naming who holds it when refused.
use crate::error::{Error, Result};
use serde_json::Value;
use std::fs::{self, File};
use std::path::Path;

/// The writer lock's file in a store folder (not part of the store; docs/FORMAT.md): an
/// advisory `flock` that every writer holds, so that a store has one writer at a time. The
/// kernel releases it when its holder exits, however it exits, so it is never stale; the
/// file keeps who took it last, which is what a refused writer is told.
pub const LOCK_NAME: &str = ".layerscope.lock";

/// Take the writer lock of the folder `dir` (see [`LOCK_NAME`]) or fail with
/// [`Error::Locked`] naming its holder; records this process as the holder.
pub(super) fn lock_store(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let path = dir.join(LOCK_NAME);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let md = f.metadata().map_err(|e| Error::io(&path, e))?;
    if !md.is_file() {
        return Err(Error::format(
            &path,
            "the writer lock is not a regular file",
        ));
    }
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::Locked {
                path: dir.to_path_buf(),
                msg: format!(
                    "another writer is writing this store ({}); a store has one writer at a \
                     time: wait for it to finish or stop it (its finished shards are kept)",
                    holder(&f)
                ),
            });
        }
        return Err(Error::io(&path, err));
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let info = serde_json::json!({
        "pid": std::process::id(),
        "host": hostname(),
        "started_unix": started,
        "argv": std::env::args().collect::<Vec<_>>(),
    });
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        f.set_len(0)?;
        f.write_all_at(info.to_string().as_bytes(), 0)
    };
    write().map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

/// The holder recorded in a lock file, in words.
fn holder(f: &File) -> String {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 16];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    let Ok(v) = serde_json::from_slice::<Value>(&buf[..n]) else {
        return "holder unknown".into();
    };
    let cmd: Vec<&str> = v["argv"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut cmd = cmd.join(" ");
    if cmd.chars().count() > 120 {
        cmd = cmd.chars().take(117).collect::<String>() + "...";
    }
    format!(
        "pid {} on {}, started at unix time {}: {}",
        v["pid"],
        v["host"].as_str().unwrap_or("?"),
        v["started_unix"],
        cmd
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
