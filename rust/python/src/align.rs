//! Bindings of the spectrum and alignment measures (layerscope-core `measures::spectrum`,
//! `measures::align`), reached as `Moments.spectrum()` / `Moments.alignment()`: the core
//! reads the finalised moments where they are, the GIL is released for all the linear
//! algebra, and plain dicts of numpy arrays come back for `layerscope.alignment` to wrap.
use crate::errors::detach;
use crate::errors::IntoPy;
use crate::monitor::PyMonitor;
use layerscope_core::engine::moments::Moments;
use layerscope_core::measures::align::{
    eigs_bytes as core_eigs_bytes, measures_from_moments, AlignSpec, AlignmentMatrix, DEFAULT_K,
};
use layerscope_core::measures::spectrum::Spectrum;
use layerscope_core::memory::Budget;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

fn spectra_to_py<'py>(
    py: Python<'py>,
    sp: Vec<Spectrum>,
    pca_threshold: Option<f64>,
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for s in sp {
        let d = PyDict::new(py);
        for (name, v) in s.measures() {
            d.set_item(name, v)?;
        }
        if let Some(t) = pca_threshold {
            d.set_item("pca_id", s.pca_id(t))?;
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
    for (side, facts) in [("row", &a.rows), ("col", &a.cols)] {
        d.set_item(
            format!("{side}_k"),
            facts.iter().map(|f| f.k).collect::<Vec<_>>(),
        )?;
        d.set_item(
            format!("{side}_ridge"),
            facts.iter().map(|f| f.ridge).collect::<Vec<_>>(),
        )?;
        d.set_item(
            format!("{side}_rank"),
            facts.iter().map(|f| f.rank).collect::<Vec<_>>(),
        )?;
    }
    Ok(d)
}

/// Spectra of `spectrum_layers` and the alignment of `spec` (when given) from finalised
/// moments, GIL released: `{"spectra": [dict per layer], "alignment": dict | None}`. With
/// `pca_threshold`, each spectrum also holds `pca_id` at that threshold.
pub fn measures<'py>(
    py: Python<'py>,
    m: &Moments,
    spectrum_layers: &[usize],
    spec: Option<&AlignSpec>,
    pca_threshold: Option<f64>,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let budget = Budget::resolve(max_memory).py_err()?;
    let mon = PyMonitor::new(progress);
    let (sp, al) = detach(py, || {
        measures_from_moments(m, spectrum_layers, spec, &budget, &mon)
    })?;
    let out = PyDict::new(py);
    out.set_item("spectra", spectra_to_py(py, sp, pca_threshold)?)?;
    match al {
        Some(a) => out.set_item("alignment", align_to_py(py, a)?)?,
        None => out.set_item("alignment", py.None())?,
    }
    Ok(out)
}

/// Peak bytes of the eigendecompositions behind spectra and alignment of layers of widths
/// `dims` (every layer's eigenvectors held, one solver workspace per worker thread).
///
/// :type dims: Sequence[int]
/// :rtype: int
#[pyfunction]
fn eigs_bytes(dims: Vec<usize>) -> u128 {
    core_eigs_bytes(&dims)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_ALIGN_K", DEFAULT_K)?;
    m.add_function(wrap_pyfunction!(eigs_bytes, m)?)?;
    Ok(())
}
