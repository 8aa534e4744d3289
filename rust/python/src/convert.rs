//! Type conversion between numpy arrays and the core's slices.
use crate::errors::{to_py, IntoPy};
use layerscope_core::Error;
use numpy::{PyReadonlyArray, PyReadonlyArray2, PyReadwriteArray, PyUntypedArrayMethods};
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

/// One block of rows per layer, all float32 or all float64 (what accumulators' `update` take).
pub enum Blocks<'py> {
    F32(Vec<PyReadonlyArray2<'py, f32>>),
    F64(Vec<PyReadonlyArray2<'py, f64>>),
}

/// Read a list of 2-D arrays as [`Blocks`] (all float32, else all float64).
pub fn extract_blocks<'py>(arrays: &[Bound<'py, PyAny>]) -> PyResult<Blocks<'py>> {
    if let Ok(v) = arrays
        .iter()
        .map(|a| a.extract::<PyReadonlyArray2<f32>>())
        .collect::<Result<Vec<_>, _>>()
    {
        return Ok(Blocks::F32(v));
    }
    let mut out = Vec::with_capacity(arrays.len());
    for (i, a) in arrays.iter().enumerate() {
        out.push(a.extract::<PyReadonlyArray2<f64>>().map_err(|_| {
            to_py(Error::invalid(format!(
                "block {i}: expected 2-D arrays that are all float32 or all float64"
            )))
        })?);
    }
    Ok(Blocks::F64(out))
}

/// The row-major data of every block and their common row count.
pub fn block_slices<'a, T: numpy::Element>(
    v: &'a [PyReadonlyArray2<'_, T>],
) -> PyResult<(Vec<&'a [T]>, usize)> {
    let rows = v.first().map_or(0, |a| a.shape()[0]);
    if v.iter().any(|a| a.shape()[0] != rows) {
        return Err(Error::Mismatch(
            "blocks of one update must have the same number of rows".into(),
        ))
        .py_err();
    }
    let slices = v
        .iter()
        .map(|a| c_slice(a, "block"))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((slices, rows))
}

/// A new row-major `shape` numpy array holding `values` (their count is the product of the
/// shape; a mismatch is an internal error, reported as such).
pub fn array2<T: numpy::Element>(
    py: Python<'_>,
    shape: (usize, usize),
    values: Vec<T>,
) -> PyResult<Bound<'_, numpy::PyArray2<T>>> {
    use numpy::IntoPyArray;
    numpy::ndarray::Array2::from_shape_vec(shape, values)
        .map_err(|e| Error::invalid(format!("internal shape error: {e}")))
        .py_err()
        .map(|a| a.into_pyarray(py))
}
