//! Error mapping: every core error becomes an instance of the `layerscope.errors` class
//! named by `Error::kind_name()` (each subclasses `LayerscopeError` and a matching builtin).
use layerscope_core::Error;
use pyo3::prelude::*;

pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| {
        if matches!(err, Error::Interrupted) {
            return pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted");
        }
        let msg = err.to_string();
        let made = py
            .import("layerscope.errors")
            .and_then(|m| m.getattr(err.kind_name()))
            .and_then(|cls| cls.call1((msg.clone(),)));
        match made {
            Ok(obj) => PyErr::from_value(obj),
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
        }
    })
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
