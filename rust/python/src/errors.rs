//! Core errors as Python exceptions, with one `match`, and the one way a binding runs core
//! work: [`detach`] (GIL released, Ctrl-C polled, errors converted).
//!
//! The classes live in `layerscope.errors` (each subclasses `LayerscopeError` and the
//! matching builtin: `MismatchError` is a `ValueError`, `StoreNotFoundError` a
//! `FileNotFoundError`, …). The core names no Python class; every core error variant has
//! exactly one class here, and a variant without one does not compile.
use layerscope_core::Error;
use pyo3::import_exception;
use pyo3::prelude::*;

import_exception!(layerscope.errors, FormatError);
import_exception!(layerscope.errors, MismatchError);
import_exception!(layerscope.errors, MissingLayerError);
import_exception!(layerscope.errors, StoreNotFoundError);
import_exception!(layerscope.errors, StoreExistsError);
import_exception!(layerscope.errors, StoreLockedError);
import_exception!(layerscope.errors, NonFiniteError);
import_exception!(layerscope.errors, InvalidArgumentError);
import_exception!(layerscope.errors, MemoryBudgetError);
import_exception!(layerscope.errors, StoreIOError);
import_exception!(layerscope.errors, Interrupted);

/// The Python exception of a core error (its message is the error's `Display`).
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Format { .. } => FormatError::new_err(msg),
        Error::Mismatch(_) => MismatchError::new_err(msg),
        Error::MissingLayer(_) => MissingLayerError::new_err(msg),
        Error::NotFound { .. } => StoreNotFoundError::new_err(msg),
        Error::Exists { .. } => StoreExistsError::new_err(msg),
        Error::Locked { .. } => StoreLockedError::new_err(msg),
        Error::NonFinite(_) => NonFiniteError::new_err(msg),
        Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
        Error::Memory(_) => MemoryBudgetError::new_err(msg),
        Error::Io { .. } => StoreIOError::new_err(msg),
        Error::Interrupted => Interrupted::new_err(msg),
    }
}

/// `Result<T, core::Error>` → `PyResult<T>`.
pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Run core work `f` with the GIL released (other Python threads run meanwhile); its error
/// becomes the matching Python exception, and a Ctrl-C pressed while it ran is raised as
/// soon as it returns (long work polls Ctrl-C itself, through its monitor).
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Send + FnOnce() -> Result<T, Error>,
    T: Send,
{
    let out = py.detach(f).py_err()?;
    py.check_signals()?;
    Ok(out)
}
