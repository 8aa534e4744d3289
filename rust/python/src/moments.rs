//! Bindings of engine 1 (layerscope-core `engine::moments`): the streaming moment
//! accumulator (a value: update / merge / bytes), the finalised `Moments` (centred
//! cross-product matrix, linear CKA), and the one-pass streaming of stores; the pair
//! statistics and the plans of a pass are in `pairs.rs`.
//! Only type conversion here; every computation runs in the core with the GIL released.
use crate::convert::{array2, block_slices, extract_blocks, Blocks};
use crate::errors::IntoPy;
use crate::errors::{detach, Consumed};
use crate::monitor::PyMonitor;
use crate::source::detach_rows;
use layerscope_core::engine::moments::{
    accumulate, ldexp, Compute, MomentAccumulator as CoreAcc, Moments as CoreMoments,
    PairStats as CorePairStats,
};
use layerscope_core::measures::align::{AlignOptions, AlignSpec, KSpec, Method};
use layerscope_core::measures::cka::LinearCka;
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use numpy::ndarray::ArrayView2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Arc;

/// The streaming moment accumulator (see layerscope_core::engine::moments).
///
/// :type dims: Sequence[int]
/// :type names: Sequence[str] | None
/// :type check_finite: bool
/// :type compute: str
#[pyclass(module = "layerscope._native", name = "MomentAccumulator")]
pub struct PyMomentAccumulator {
    inner: Consumed<CoreAcc>,
}

const FINALISED: &str = "this accumulator was finalised";

#[pymethods]
impl PyMomentAccumulator {
    /// An empty accumulator for layers of widths `dims`.
    #[new]
    #[pyo3(signature = (dims, names=None, check_finite=true, compute="float64"))]
    fn new(
        dims: Vec<usize>,
        names: Option<Vec<String>>,
        check_finite: bool,
        compute: &str,
    ) -> PyResult<Self> {
        let mut acc = CoreAcc::new(&dims)
            .py_err()?
            .with_check_finite(check_finite)
            .with_compute(Compute::parse(compute).py_err()?);
        if let Some(n) = names {
            acc = acc.with_names(&n).py_err()?;
        }
        Ok(PyMomentAccumulator {
            inner: Consumed::new(acc, FINALISED),
        })
    }

    /// Add a block of rows: one C-contiguous 2-D array per layer (all float32 or all float64,
    /// equal row counts). Errors leave the accumulator unchanged.
    ///
    /// :type arrays: Sequence[npt.NDArray[np.floating]]
    /// :rtype: None
    fn update(&mut self, py: Python<'_>, arrays: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let blocks = extract_blocks(&arrays)?;
        let acc = self.inner.get_mut()?;
        match blocks {
            Blocks::F32(v) => {
                let (slices, rows) = block_slices(&v)?;
                detach(py, || acc.update(&slices, rows))
            }
            Blocks::F64(v) => {
                let (slices, rows) = block_slices(&v)?;
                detach(py, || acc.update(&slices, rows))
            }
        }
    }

    /// Set the reference shift (length D, finite) before the first update; by default the
    /// first block's column means are used.
    ///
    /// :type shift: Sequence[float] | np.ndarray
    /// :rtype: None
    fn set_shift(&mut self, shift: Vec<f64>) -> PyResult<()> {
        self.inner.get_mut()?.set_shift(&shift).py_err()
    }

    /// Add the rows accumulated by `other` (exact, whatever the two reference shifts).
    ///
    /// :type other: MomentAccumulator
    /// :rtype: None
    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, PyMomentAccumulator>) -> PyResult<()> {
        let o = other.inner.get()?.clone();
        let acc = self.inner.get_mut()?;
        detach(py, || acc.merge(&o))
    }

    /// Versioned little-endian serialisation (for shipping partial results, e.g. with Ray).
    ///
    /// :rtype: bytes
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let acc = self.inner.get()?;
        let b = detach(py, || acc.to_bytes())?;
        Ok(PyBytes::new(py, &b))
    }

    /// Inverse of `to_bytes` (a FormatError on anything malformed).
    ///
    /// :type data: bytes
    /// :rtype: MomentAccumulator
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let acc = detach(py, || CoreAcc::from_bytes(data))?;
        Ok(PyMomentAccumulator {
            inner: Consumed::new(acc, FINALISED),
        })
    }

    /// :rtype: tuple[Any, tuple[bytes]]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let py = slf.py();
        let ctor = slf.get_type().getattr("from_bytes")?;
        let b = slf.borrow().to_bytes(py)?;
        Ok((ctor, (b,)))
    }

    /// :rtype: int
    #[getter]
    fn n(&self) -> PyResult<u64> {
        Ok(self.inner.get()?.n())
    }
    /// :rtype: list[int]
    #[getter]
    fn dims(&self) -> PyResult<Vec<usize>> {
        Ok(self.inner.get()?.dims().to_vec())
    }
    /// :rtype: list[str]
    #[getter]
    fn names(&self) -> PyResult<Vec<String>> {
        Ok(self.inner.get()?.names().to_vec())
    }

    /// Centre at the exact mean and return the `Moments` (the accumulator is consumed).
    /// `num_a`: how many of the layers belong to the first source (the rest to the second).
    ///
    /// :type num_a: int | None
    /// :rtype: Moments
    #[pyo3(signature = (num_a=None))]
    fn finalize(&mut self, py: Python<'_>, num_a: Option<usize>) -> PyResult<Py<PyMoments>> {
        let acc = self.inner.take()?;
        let m = detach(py, || acc.finalize())?;
        PyMoments::wrap(py, m, num_a)
    }
}

/// The layers a pass went over, as every result of a pass (`Moments`, `PairStats`)
/// reports them: the rows, the layers of each source and what the pass met.
#[pyclass(module = "layerscope._native", name = "PassLayers", subclass, frozen)]
pub struct PyPassLayers {
    /// :rtype: int
    #[pyo3(get)]
    n: u64,
    /// :rtype: list[int]
    #[pyo3(get)]
    dims: Vec<usize>,
    /// :rtype: list[str]
    #[pyo3(get)]
    names: Vec<String>,
    /// Number of layers of the first source.
    ///
    /// :rtype: int
    #[pyo3(get)]
    num_a: usize,
    /// `max_f |mean_f − shift_f| / σ_f`: how far the reference shift was from the mean.
    ///
    /// :rtype: float
    #[pyo3(get)]
    shift_offset: f64,
    /// First row holding a NaN/Inf per layer (only when accumulated with check_finite=False).
    ///
    /// :rtype: list[int | None]
    #[pyo3(get)]
    nonfinite: Vec<Option<u64>>,
    /// The core result itself (what [`PyPassLayers::cka`] reads).
    stats: Arc<dyn LinearCka + Send + Sync>,
}

/// A core result of a pass (`Moments`, `PairStats`): what its [`PyPassLayers`] base holds.
pub(crate) trait PassResult: LinearCka + Send + Sync + 'static {
    /// `(n, dims, names, shift_offset, nonfinite)`.
    fn layers(&self) -> (u64, &[usize], &[String], f64, &[Option<u64>]);
}

macro_rules! pass_result {
    ($($t:ty),*) => {$(
        impl PassResult for $t {
            fn layers(&self) -> (u64, &[usize], &[String], f64, &[Option<u64>]) {
                (self.n, &self.dims, &self.names, self.shift_offset, &self.nonfinite)
            }
        }
    )*};
}
pass_result!(CoreMoments, CorePairStats);

impl PyPassLayers {
    /// The base of the Python object of `stats`, `num_a` of whose layers are the first
    /// source's.
    pub(crate) fn of<T: pyo3::PyClass<BaseType = Self>, R: PassResult>(
        stats: Arc<R>,
        num_a: usize,
        result: T,
    ) -> PyClassInitializer<T> {
        let (n, dims, names, shift_offset, nonfinite) = stats.layers();
        PyClassInitializer::from(PyPassLayers {
            n,
            dims: dims.to_vec(),
            names: names.to_vec(),
            num_a,
            shift_offset,
            nonfinite: nonfinite.to_vec(),
            stats,
        })
        .add_subclass(result)
    }
}

#[pymethods]
impl PyPassLayers {
    /// Number of layers of the second source (0 for one source).
    ///
    /// :rtype: int
    #[getter]
    fn num_b(&self) -> usize {
        self.dims.len() - self.num_a
    }

    /// Linear CKA of every `(rows[a], cols[b])` layer pair: biased (Kornblith et al. 2019) or
    /// debiased (unbiased HSIC, Song et al. 2012). Float64 `[len(rows), len(cols)]`.
    ///
    /// :type rows: Sequence[int]
    /// :type cols: Sequence[int]
    /// :type debiased: bool
    /// :rtype: npt.NDArray[np.float64]
    #[pyo3(signature = (rows, cols, debiased=false))]
    fn cka<'py>(
        &self,
        py: Python<'py>,
        rows: Vec<usize>,
        cols: Vec<usize>,
        debiased: bool,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let m = &self.stats;
        let v = detach(py, || m.cka_matrix(&rows, &cols, debiased))?;
        array2(py, (rows.len(), cols.len()), v)
    }
}

/// Finalised moments: `C = Σ (z − z̄)(z − z̄)ᵀ` over the concatenated layers, the means and
/// the squared-norm products used by the debiased estimators.
#[pyclass(module = "layerscope._native", name = "Moments", extends = PyPassLayers, frozen)]
pub struct PyMoments {
    inner: Arc<CoreMoments>,
}

impl PyMoments {
    fn wrap(py: Python<'_>, m: CoreMoments, num_a: Option<usize>) -> PyResult<Py<Self>> {
        let l = m.dims.len();
        let num_a = num_a.unwrap_or(l);
        if num_a > l {
            return Err(Error::invalid(format!(
                "num_a = {num_a} exceeds the {l} layers"
            )))
            .py_err();
        }
        let m = Arc::new(m);
        let me = PyMoments { inner: m.clone() };
        Py::new(py, PyPassLayers::of(m, num_a, me))
    }
}

#[pymethods]
impl PyMoments {
    /// The full symmetric `D × D` centred cross-product matrix `C` as a read-only float64
    /// array viewing the moments' memory (no copy; it keeps this object alive). For
    /// inspection and tests: the measures run on the moments in Rust (`spectrum()`,
    /// `alignment()`, `cka()`).
    ///
    /// :rtype: npt.NDArray[np.float64]
    fn cross_products<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let m = &slf.get().inner;
        let d = m.width();
        if m.scale_exp.iter().any(|&e| e != 0) {
            // a layer far from unit scale was accumulated in units of 2^-e: a copy in the
            // data's units (no view)
            let arr = array2(slf.py(), (d, d), m.cov_unscaled())?;
            arr.call_method1("setflags", (false,))?;
            return Ok(arr);
        }
        let view = ArrayView2::from_shape((d, d), &m.cov[..])
            .map_err(|e| Error::invalid(format!("internal shape error: {e}")))
            .py_err()?;
        // SAFETY: `slf` is frozen (immutable) and is kept alive by the array as its base,
        // so the viewed buffer outlives the array and is never written through it (read-only).
        let arr = unsafe { PyArray2::borrow_from_array(&view, slf.clone().into_any()) };
        arr.call_method1("setflags", (false,))?;
        Ok(arr)
    }

    /// Spectra of the layers `layers` (indices; None: all) — `layerscope_core::measures::
    /// spectrum`: covariance eigenvalues, explained-variance ratios, effective/stable rank,
    /// participation ratio, PCA dimensions (and `pca_id` at `pca_threshold` when given).
    ///
    /// :type layers: Sequence[int] | None
    /// :type pca_threshold: float | None
    /// :type max_memory: int | None
    /// :type progress: ProgressCallback
    /// :rtype: list[dict[str, Any]]
    #[pyo3(signature = (layers=None, *, pca_threshold=None, max_memory=None, progress=None))]
    fn spectrum<'py>(
        &self,
        py: Python<'py>,
        layers: Option<Vec<usize>>,
        pca_threshold: Option<f64>,
        max_memory: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layers = layers.unwrap_or_else(|| (0..self.inner.dims.len()).collect());
        let out = crate::align::measures(
            py,
            &self.inner,
            &layers,
            None,
            pca_threshold,
            max_memory,
            progress,
        )?;
        out.as_any().get_item("spectra")
    }

    /// Alignment of the layers `rows` × `cols` (indices) with `method` ("subspace", "svcca",
    /// "pwcca", "cca", "procrustes", "shape"), `space` ("samples" | "features"), `k` or
    /// `variance` (neither: the core's `DEFAULT_ALIGN_K`), `ridge_eps` (CCA ridge), `alpha`
    /// (the shape metric's partial whitening), `symmetric` (rows
    /// == cols of one source: each pair once); the spectra of `spectrum_layers` come from
    /// the same eigendecompositions. Returns `{"alignment": dict, "spectra": [dict]}`.
    ///
    /// :type rows: Sequence[int]
    /// :type cols: Sequence[int] | None
    /// :type method: str
    /// :type space: str
    /// :type k: int | None
    /// :type variance: float | None
    /// :type ridge_eps: float
    /// :type alpha: float
    /// :type symmetric: bool
    /// :type spectrum_layers: Sequence[int]
    /// :type max_memory: int | None
    /// :type progress: ProgressCallback
    /// :rtype: dict[str, Any]
    #[pyo3(signature = (rows, cols=None, *, method="subspace", space="samples", k=None,
        variance=None, ridge_eps=1e-4, alpha=1.0, symmetric=false, spectrum_layers=Vec::new(),
        max_memory=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn alignment<'py>(
        &self,
        py: Python<'py>,
        rows: Vec<usize>,
        cols: Option<Vec<usize>>,
        method: &str,
        space: &str,
        k: Option<usize>,
        variance: Option<f64>,
        ridge_eps: f64,
        alpha: f64,
        symmetric: bool,
        spectrum_layers: Vec<usize>,
        max_memory: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        // the default k and the checks are the core's
        let spec = AlignSpec {
            cols: cols.unwrap_or_else(|| rows.clone()),
            rows,
            opts: AlignOptions {
                method: Method::parse(method, space).py_err()?,
                k: KSpec::from_options(k, variance).py_err()?,
                ridge_eps,
                alpha,
            },
            symmetric,
        };
        crate::align::measures(
            py,
            &self.inner,
            &spectrum_layers,
            Some(&spec),
            None,
            max_memory,
            progress,
        )
    }

    /// `C_ij` (a `d_i × d_j` float64 copy).
    ///
    /// :type i: int
    /// :type j: int
    /// :rtype: npt.NDArray[np.float64]
    fn block<'py>(
        &self,
        py: Python<'py>,
        i: usize,
        j: usize,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let b = self.inner.block_unscaled(i, j).py_err()?;
        let (di, dj) = (self.inner.dims[i], self.inner.dims[j]);
        array2(py, (di, dj), b)
    }

    /// Column means of layer `i`.
    ///
    /// :type i: int
    /// :rtype: npt.NDArray[np.float64]
    fn mean<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyArray1<f64>>> {
        Ok(self.inner.layer_mean(i).py_err()?.to_vec().into_pyarray(py))
    }

    /// `Σ_a ‖x_{k,a} − x̄_k‖² ‖x_{l,a} − x̄_l‖²`.
    ///
    /// :type k: int
    /// :type l: int
    /// :rtype: float
    fn rr(&self, k: usize, l: usize) -> PyResult<f64> {
        let v = self.inner.rr(k, l).py_err()?;
        Ok(ldexp(v, 2 * (self.inner.exp(k) + self.inner.exp(l))))
    }

    /// `tr C_kk`.
    ///
    /// :type k: int
    /// :rtype: float
    fn trace(&self, k: usize) -> PyResult<f64> {
        Ok(ldexp(self.inner.trace(k).py_err()?, 2 * self.inner.exp(k)))
    }

    fn __repr__(&self) -> String {
        format!(
            "Moments(n={}, layers={}, D={})",
            self.inner.n,
            self.inner.dims.len(),
            self.inner.width()
        )
    }
}

/// One streaming pass over every row of `parts` (see `source.rs`: store selections and/or
/// in-memory layers, row-aligned, side by side), GIL released, reader thread one block ahead.
/// Returns the finalised `Moments`.
///
/// :type parts: Sequence[Part]
/// :type names: Sequence[str]
/// :type block_rows: int | None
/// :type check_finite: bool
/// :type max_memory: int | None
/// :type num_a: int | None
/// :type progress: ProgressCallback
/// :type compute: str
/// :rtype: Moments
#[pyfunction]
#[pyo3(signature = (parts, names, block_rows=None, check_finite=true, max_memory=None,
    num_a=None, progress=None, compute="float64"))]
#[allow(clippy::too_many_arguments)]
fn moments_pass(
    py: Python<'_>,
    parts: Vec<Bound<'_, PyAny>>,
    names: Vec<String>,
    block_rows: Option<usize>,
    check_finite: bool,
    max_memory: Option<u64>,
    num_a: Option<usize>,
    progress: Option<Py<PyAny>>,
    compute: &str,
) -> PyResult<Py<PyMoments>> {
    let compute = Compute::parse(compute).py_err()?;
    let budget = Budget::resolve(max_memory).py_err()?;
    let mon = PyMonitor::new(progress);
    let m = detach_rows(py, &parts, |src| {
        accumulate(
            src,
            &names,
            block_rows,
            check_finite,
            &budget,
            compute,
            &mon,
        )?
        .finalize()
    })?;
    PyMoments::wrap(py, m, num_a)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMomentAccumulator>()?;
    m.add_class::<PyPassLayers>()?;
    m.add_class::<PyMoments>()?;
    m.add_function(wrap_pyfunction!(moments_pass, m)?)?;
    // the arithmetic rules another engine (the torch device engine) follows
    m.add(
        "F32_SUM_ROWS",
        layerscope_core::engine::moments::F32_SUM_ROWS,
    )?;
    m.add("F32_SAFE", layerscope_core::engine::moments::F32_SAFE)?;
    m.add("F32_TINY", layerscope_core::engine::moments::F32_TINY)?;
    Ok(())
}
