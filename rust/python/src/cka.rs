//! Bindings of the minibatch CKA estimator (layerscope-core `measures::cka`, Nguyen et al.
//! 2021): a streaming accumulator fed with in-memory blocks, and the one-pass streaming of
//! stores. Only type conversion here; the work runs in the core with the GIL released.
use crate::convert::array2;
use crate::errors::detach;
use crate::errors::IntoPy;
use crate::monitor::PyMonitor;
use crate::products::PyProducts;
use crate::source::{extract_parts, Sources};
use layerscope_core::measures::cka::{
    minibatch_bytes as core_minibatch_bytes, minibatch_cka_table as core_cka_table, minibatch_pass,
    Kernel, MinibatchCka as CoreCka, MinibatchHsic, SharedProducts, DEFAULT_BATCH_SIZE,
};
use layerscope_core::memory::Budget;
use layerscope_core::store::{RowRange, Subset};
use layerscope_core::store::{RowSource, Rows};
use layerscope_core::Error;
use numpy::ndarray::Array2;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The result as a dict: `values` (CKA of layers `0..num_a` × the others, or all × all),
/// `hsic` (L × L mean HSIC₁, NaN where not computed), `bandwidths`, `batches`, `rows_used`,
/// `rows_seen`, `nonfinite`, `names`, `scale_exp` (per layer: `hsic[i, j]` is in units of
/// `2^-2(e_i + e_j)`).
fn to_dict<'py>(py: Python<'py>, r: &MinibatchHsic) -> PyResult<Bound<'py, PyDict>> {
    let l = r.dims.len();
    let (rows, cols) = table_axes(l, r.num_a);
    let vals = r.cka_matrix(&rows, &cols).py_err()?;
    let shape_err =
        |e: numpy::ndarray::ShapeError| Error::invalid(format!("internal shape error: {e}"));
    let values = Array2::from_shape_vec((rows.len(), cols.len()), vals)
        .map_err(shape_err)
        .py_err()?;
    let hsic = Array2::from_shape_vec((l, l), r.hsic.clone())
        .map_err(shape_err)
        .py_err()?;
    let d = PyDict::new(py);
    d.set_item("values", values.into_pyarray(py))?;
    d.set_item("hsic", hsic.into_pyarray(py))?;
    d.set_item("bandwidths", r.bandwidths.clone())?;
    d.set_item("batches", r.batches)?;
    d.set_item("rows_used", r.rows_used)?;
    d.set_item("rows_seen", r.rows_seen)?;
    d.set_item("batch_size", r.batch_size)?;
    d.set_item("kernel", r.kernel.name())?;
    d.set_item("nonfinite", r.nonfinite.clone())?;
    d.set_item("names", r.names.clone())?;
    d.set_item("scale_exp", r.scale_exp.clone())?;
    Ok(d)
}

/// Minibatch CKA in one streaming pass over every row of `parts` (see `source.rs`: store
/// selections and/or in-memory layers, row-aligned, side by side) — or over the rows
/// `sample` of them, in that order; `rows=(start, stop)`: only positions `[start, stop)` of
/// that sequence (one distributed task's share; a non-finite row is then reported relative
/// to `start`) — GIL released, reader thread one block ahead. Returns the result dict (see
/// `to_dict`). `products`: None (this CPU) or an object computing each
/// minibatch's Gram products elsewhere (``layerscope._device.products.DeviceProducts``).
///
/// :type parts: Sequence[Part]
/// :type names: Sequence[str]
/// :type kernel: str
/// :type sigma: float
/// :type batch_size: int
/// :type num_a: int | None
/// :type check_finite: bool
/// :type max_memory: int | None
/// :type block_rows: int | None
/// :type progress: ProgressCallback
/// :type sample: Sequence[int] | None
/// :type rows: tuple[int, int] | None
/// :type products: Any | None
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (parts, names, kernel="linear", sigma=1.0, batch_size=DEFAULT_BATCH_SIZE, num_a=None,
    check_finite=true, max_memory=None, block_rows=None, progress=None, sample=None, rows=None,
    products=None))]
#[allow(clippy::too_many_arguments)]
fn minibatch_cka_pass<'py>(
    py: Python<'py>,
    parts: Vec<Bound<'py, PyAny>>,
    names: Vec<String>,
    kernel: &str,
    sigma: f64,
    batch_size: usize,
    num_a: Option<usize>,
    check_finite: bool,
    max_memory: Option<u64>,
    block_rows: Option<usize>,
    progress: Option<Py<PyAny>>,
    sample: Option<Vec<u64>>,
    rows: Option<(u64, u64)>,
    products: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let parts = extract_parts(&parts)?;
    let sources = Sources::new(&parts)?;
    let all = Rows::new(sources.parts()).py_err()?;
    let subset = match &sample {
        Some(idx) => Some(Subset::new(&all, idx).py_err()?),
        None => None,
    };
    let seq: &dyn RowSource = match &subset {
        Some(s) => s,
        None => &all,
    };
    let range = match rows {
        Some((a, b)) => Some(RowRange::new(seq, a..b).py_err()?),
        None => None,
    };
    let src: &dyn RowSource = match &range {
        Some(r) => r,
        None => seq,
    };
    let build = || -> Result<CoreCka, Error> {
        let mut acc = CoreCka::new(&src.dims(), Kernel::parse(kernel, sigma)?, batch_size)?
            .with_check_finite(check_finite)
            .with_names(&names)?;
        if let Some(a) = num_a {
            acc = acc.with_num_a(a)?;
        }
        // The budget in force (max_memory, else LAYERSCOPE_MAX_MEMORY, else the machine's).
        acc.with_budget(&Budget::resolve(max_memory)?)
    };
    let acc = build().py_err()?;
    let prod = products.map(|p| std::sync::Arc::new(PyProducts::new(p)));
    let acc = match &prod {
        Some(p) => acc.with_products(SharedProducts(p.clone())),
        None => acc,
    };
    let mon = PyMonitor::new(progress);
    let r = detach(py, || minibatch_pass(src, acc, block_rows, &mon)).map_err(|e| match &prod {
        Some(p) => p.raise(e),
        None => e,
    })?;
    to_dict(py, &r)
}

/// Peak bytes of the minibatch estimator's state for layers of widths `dims` and batches of
/// `batch_size` rows (what it checks against the budget before the pass).
///
/// :type dims: Sequence[int]
/// :type batch_size: int
/// :rtype: int
#[pyfunction]
fn minibatch_bytes(dims: Vec<usize>, batch_size: usize) -> u128 {
    core_minibatch_bytes(&dims, batch_size)
}

/// Minibatch CKA from mean HSICs (the ``hsic`` of a result dict, ``L × L``, e.g. merged
/// over the row ranges of a distributed run): ``num_a`` < L: the ``num_a × (L − num_a)``
/// cross table, else all pairs; the NaN rule of ``MinibatchHsic::cka`` (exactly 1 on the
/// diagonal; NaN where a mean self-HSIC is not positive).
///
/// :type hsic: npt.NDArray[np.float64]
/// :type num_a: int
/// :rtype: npt.NDArray[np.float64]
#[pyfunction]
fn minibatch_cka_table<'py>(
    py: Python<'py>,
    hsic: numpy::PyReadonlyArray2<'py, f64>,
    num_a: usize,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    let h = hsic.as_array();
    let l = h.shape()[0];
    if h.shape()[1] != l || num_a == 0 || num_a > l {
        return Err(Error::invalid(format!(
            "hsic must be L × L with 0 < num_a <= L, got {:?} and num_a = {num_a}",
            h.shape()
        )))
        .py_err();
    }
    let flat: Vec<f64> = h.iter().copied().collect();
    let (rows, cols) = table_axes(l, num_a);
    let vals = core_cka_table(&flat, l, &rows, &cols).py_err()?;
    array2(py, (rows.len(), cols.len()), vals)
}

/// The rows and columns of a result table: all pairs of one source, or A × B.
fn table_axes(l: usize, num_a: usize) -> (Vec<usize>, Vec<usize>) {
    let rows: Vec<usize> = (0..num_a).collect();
    let cols: Vec<usize> = if num_a == l {
        (0..l).collect()
    } else {
        (num_a..l).collect()
    };
    (rows, cols)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_BATCH_SIZE", DEFAULT_BATCH_SIZE)?;
    m.add_function(wrap_pyfunction!(minibatch_cka_table, m)?)?;
    m.add_function(wrap_pyfunction!(minibatch_cka_pass, m)?)?;
    m.add_function(wrap_pyfunction!(minibatch_bytes, m)?)?;
    Ok(())
}
