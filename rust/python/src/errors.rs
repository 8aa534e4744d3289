//! Core errors as Python exceptions, with one `match`, and the one way a binding runs core
//! work: [`detach`] (GIL released, Ctrl-C polled, errors converted).
//!
//! The classes live in `layerscope.errors` (each subclasses `LayerscopeError` and the
//! matching builtin: `MismatchError` is a `ValueError`, `StoreNotFoundError` a
//! `FileNotFoundError`, …). The core names no Python class; every core error variant has
//! exactly one class here, and a variant without one does not compile.
use layerscope_core::monitor::SigintGuard;
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
/// soon as it returns.
///
/// Ctrl-C during the work: Python only runs its signal handlers on the main thread, between
/// bytecodes, so a check from the work's threads sees nothing. On the main thread, while
/// SIGINT has Python's default handler (KeyboardInterrupt), the call runs under a
/// [`SigintGuard`]: the signal also sets the core's interrupt request, every monitor and long
/// loop stops at its next block with `Interrupted`, and Python's KeyboardInterrupt is raised
/// here once the work has returned (its buffers freed, nothing half-written). Nested calls
/// (a Python callback calling layerscope) and other threads run as before.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Send + FnOnce() -> Result<T, Error>,
    T: Send,
{
    let guard = if on_main_thread() && !GUARDED.with(|g| g.get()) && default_sigint(py) {
        SigintGuard::install()
    } else {
        None
    };
    if guard.is_some() {
        GUARDED.with(|g| g.set(true));
    }
    let out = py.detach(f);
    if guard.is_some() {
        GUARDED.with(|g| g.set(false));
    }
    drop(guard); // the previous handler back, the request withdrawn
    py.check_signals()?; // KeyboardInterrupt first: the work's `Interrupted` is its echo
    out.py_err()
}

thread_local! {
    /// Whether this thread is inside a call that holds the SIGINT guard.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn on_main_thread() -> bool {
    // SAFETY: getpid/gettid have no preconditions; Linux: the main thread's id is the pid.
    unsafe { libc::getpid() == libc::gettid() }
}

/// Whether SIGINT's Python handler is `signal.default_int_handler` (a user's own handler
/// keeps its meaning: a signal does not stop the work for it).
fn default_sigint(py: Python<'_>) -> bool {
    // (signal.getsignal, signal.default_int_handler), looked up once
    static FNS: pyo3::sync::PyOnceLock<(Py<PyAny>, Py<PyAny>)> = pyo3::sync::PyOnceLock::new();
    let Ok((getsignal, default)) = FNS.get_or_try_init(py, || -> PyResult<_> {
        let signal = py.import("signal")?;
        Ok((
            signal.getattr("getsignal")?.unbind(),
            signal.getattr("default_int_handler")?.unbind(),
        ))
    }) else {
        return false;
    };
    match getsignal.call1(py, (2,)) {
        Ok(h) => h.is(default),
        Err(_) => false,
    }
}

/// A binding object's core value that one call consumes (an accumulator finalised, a
/// builder finished): every later use is an InvalidArgumentError saying `gone`.
pub struct Consumed<T> {
    value: Option<T>,
    gone: &'static str,
}

impl<T> Consumed<T> {
    pub fn new(value: T, gone: &'static str) -> Self {
        Consumed {
            value: Some(value),
            gone,
        }
    }
    fn err(&self) -> PyErr {
        to_py(Error::invalid(self.gone))
    }
    pub fn get(&self) -> PyResult<&T> {
        self.value.as_ref().ok_or_else(|| self.err())
    }
    pub fn get_mut(&mut self) -> PyResult<&mut T> {
        let err = self.err();
        self.value.as_mut().ok_or(err)
    }
    /// The value, consumed.
    pub fn take(&mut self) -> PyResult<T> {
        let err = self.err();
        self.value.take().ok_or(err)
    }
}
