//! Typed errors of the core. Every failure is one of these — the core never panics on bad
//! input. The Python binding maps each kind to a Python exception class of the same name
//! (see `python/layerscope/errors.py`), so the variant names are part of the API.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is not a valid shard / manifest (bad header, bad JSON, offsets, dtype, …).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// Two things that must agree do not (manifest vs shard, row ids of two stores, shapes).
    #[error("{0}")]
    Mismatch(String),
    /// A layer (or column) name is not in the store.
    #[error("{0}")]
    MissingLayer(String),
    /// A file or folder is not there.
    #[error("{path}: {msg}")]
    NotFound { path: PathBuf, msg: String },
    /// Refusing to overwrite something that exists.
    #[error("{path}: {msg}")]
    Exists { path: PathBuf, msg: String },
    /// Another writer holds the store's lock (its holder named in the message).
    #[error("{path}: {msg}")]
    Locked { path: PathBuf, msg: String },
    /// NaN or ±Inf in data where a finite number is required.
    #[error("{0}")]
    NonFinite(String),
    /// A parameter is out of its domain (k larger than the rank, empty layer list, …).
    #[error("{0}")]
    InvalidArgument(String),
    /// The computation would need more memory than allowed.
    #[error("{0}")]
    Memory(String),
    /// The caller asked to stop (Ctrl-C through the monitor).
    #[error("interrupted")]
    Interrupted,
    /// An operating-system I/O error, with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// The value named `name` in `options`, else [`Error::InvalidArgument`]
/// "{what} must be 'a', 'b' or 'c', got \"name\"" (the names in the order given).
pub fn choice<T: Clone>(what: &str, name: &str, options: &[(&str, T)]) -> Result<T> {
    if let Some((_, v)) = options.iter().find(|(n, _)| *n == name) {
        return Ok(v.clone());
    }
    let quoted: Vec<String> = options.iter().map(|(n, _)| format!("'{n}'")).collect();
    let listed = match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    };
    Err(Error::invalid(format!(
        "{what} must be {listed}, got {name:?}"
    )))
}

/// [`Error::InvalidArgument`] unless a read was handed one output buffer per layer
/// (`what`: "layers", "pieces").
pub fn check_outs(outs: usize, layers: usize, what: &str) -> Result<()> {
    if outs != layers {
        return Err(Error::invalid(format!(
            "{outs} output buffers for {layers} {what}"
        )));
    }
    Ok(())
}

/// [`Error::InvalidArgument`] unless an output buffer of `len` values holds exactly `rows`
/// rows of `width`.
pub fn check_out_len(len: usize, rows: usize, width: usize) -> Result<()> {
    if Some(len) != rows.checked_mul(width) {
        return Err(Error::invalid(format!(
            "output buffer has {len} elements, {rows} rows of width {width} need {}",
            rows.saturating_mul(width)
        )));
    }
    Ok(())
}
