//! Error mapping: every core error becomes an instance of the `layerscope.errors` class
//! named by `Error::kind_name()` (each subclasses `LayerscopeError` and a matching builtin).
use layerscope_core::Error;
use numpy::{PyReadonlyArray, PyReadwriteArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// The data of a C-contiguous (row-major) numpy array. rust-numpy's `as_slice` accepts any
/// contiguous array, Fortran order included, which every row-major kernel here would read
/// transposed — silently wrong numbers — so non-C-ordered arrays are refused.
pub fn c_slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(to_py(Error::invalid(format!(
            "{what}: expected a C-contiguous (row-major) array; use np.ascontiguousarray"
        ))));
    }
    a.as_slice()
        .map_err(|e| to_py(Error::invalid(format!("{what}: {e}"))))
}

/// [`c_slice`] for a writable array.
pub fn c_slice_mut<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a mut PyReadwriteArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(to_py(Error::invalid(format!(
            "{what}: expected a C-contiguous (row-major) array; use np.ascontiguousarray"
        ))));
    }
    a.as_slice_mut()
        .map_err(|e| to_py(Error::invalid(format!("{what}: {e}"))))
}

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
