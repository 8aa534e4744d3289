//! Bindings of the spectrum and alignment measures (layerscope-core `measures::spectrum`,
//! `measures::align`). They read the finalised moments (the symmetric `D × D` centred
//! cross-product matrix) without copying it, release the GIL for all the linear algebra, and
//! return plain dicts of numpy arrays that `layerscope.alignment` wraps in result objects.
use crate::convert::IntoPy;
use crate::monitor::PyMonitor;
use layerscope_core::measures::align::{
    eigs_bytes as core_eigs_bytes, measures_from_cov, AlignOptions, AlignSpec, AlignmentMatrix,
    CovView, KSpec, Method,
};
use layerscope_core::measures::spectrum::Spectrum;
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use numpy::{IntoPyArray, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn spectra_to_py<'py>(py: Python<'py>, sp: Vec<Spectrum>) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for s in sp {
        let d = PyDict::new(py);
        for (name, v) in s.measures() {
            d.set_item(name, v)?;
        }
        d.set_item("eigenvalues", s.eigenvalues.into_pyarray(py))?;
        d.set_item(
            "explained_variance_ratio",
            s.explained_variance_ratio.into_pyarray(py),
        )?;
        out.append(d)?;
    }
    Ok(out)
}

fn align_to_py<'py>(py: Python<'py>, a: AlignmentMatrix) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("nrows", a.nrows)?;
    d.set_item("ncols", a.ncols)?;
    d.set_item("values", a.values.into_pyarray(py))?;
    let cos = PyList::empty(py);
    for c in a.cosines {
        cos.append(c.into_pyarray(py))?;
    }
    d.set_item("cosines", cos)?;
    let ex = PyDict::new(py);
    for (name, v) in a.extras {
        ex.set_item(name, v.into_pyarray(py))?;
    }
    d.set_item("extras", ex)?;
    d.set_item("row_k", a.row_k)?;
    d.set_item("col_k", a.col_k)?;
    d.set_item("row_ridge", a.row_ridge)?;
    d.set_item("col_ridge", a.col_ridge)?;
    Ok(d)
}

/// Spectra and/or alignment from a finalised centred cross-product matrix.
///
/// `cov`: the symmetric `D × D` matrix `C` (C-contiguous float64, read without copying),
/// `dims`: layer widths (their sum is D), `n`: rows accumulated, `names`: layer names.
/// `spectrum_layers`: layer indices to report spectra for. `align`: when `rows` is given,
/// alignment of rows × cols with `method` ("subspace", "svcca", "pwcca", "cca",
/// "procrustes"), `space` ("samples" | "features"), `k` (an int) or `variance` (a fraction,
/// SVCCA's 0.99 rule), `ridge_eps` (CCA ridge `ε·tr(C)/d` when `n ≤ d` or `C` singular),
/// `symmetric` (rows == cols of one source: each pair once).
/// Returns `{"spectra": [dict per layer], "alignment": dict | None}`.
#[pyfunction]
#[pyo3(signature = (cov, dims, n, names, spectrum_layers, rows=None, cols=None, method="subspace",
    space="samples", k=None, variance=None, ridge_eps=1e-4, symmetric=false, max_memory=None,
    progress=None))]
#[allow(clippy::too_many_arguments)]
fn moment_measures<'py>(
    py: Python<'py>,
    cov: PyReadonlyArray2<'py, f64>,
    dims: Vec<usize>,
    n: usize,
    names: Vec<String>,
    spectrum_layers: Vec<usize>,
    rows: Option<Vec<usize>>,
    cols: Option<Vec<usize>>,
    method: &str,
    space: &str,
    k: Option<usize>,
    variance: Option<f64>,
    ridge_eps: f64,
    symmetric: bool,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let budget = Budget::resolve(max_memory).py_err()?;
    let slice = crate::convert::c_slice(&cov, "cov")?;
    let view = CovView::new(slice, dims, n).py_err()?;
    let spec = match rows {
        None => None,
        Some(rows) => {
            let cols = cols.unwrap_or_else(|| rows.clone());
            let kspec = match (k, variance) {
                (Some(k), None) => KSpec::Fixed(k),
                (None, Some(f)) => KSpec::Variance(f),
                (None, None) => KSpec::Fixed(32),
                (Some(_), Some(_)) => {
                    return Err(Error::invalid("give either k or variance, not both")).py_err()
                }
            };
            Some(AlignSpec {
                rows,
                cols,
                opts: AlignOptions {
                    method: Method::parse(method, space).py_err()?,
                    k: kspec,
                    ridge_eps,
                },
                symmetric,
            })
        }
    };
    let mon = PyMonitor::new(progress);
    let (sp, al) = py
        .detach(|| {
            measures_from_cov(
                &view,
                &names,
                &spectrum_layers,
                spec.as_ref(),
                &budget,
                &mon,
            )
        })
        .py_err()?;
    let out = PyDict::new(py);
    out.set_item("spectra", spectra_to_py(py, sp)?)?;
    match al {
        Some(a) => out.set_item("alignment", align_to_py(py, a)?)?,
        None => out.set_item("alignment", py.None())?,
    }
    Ok(out)
}

/// Peak bytes of the eigendecompositions behind spectra and alignment of layers of widths
/// `dims` (every layer's eigenvectors held, one solver workspace per worker thread).
#[pyfunction]
fn eigs_bytes(dims: Vec<usize>) -> u128 {
    core_eigs_bytes(&dims)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(moment_measures, m)?)?;
    m.add_function(wrap_pyfunction!(eigs_bytes, m)?)?;
    Ok(())
}
