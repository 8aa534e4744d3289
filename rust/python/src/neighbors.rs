//! Bindings of the neighbour engine and its measures (kNN graph, intrinsic dimension, RBF
//! HSIC, RSA, mutual kNN). Inputs are C-contiguous float64 2-D arrays (the Python layer
//! samples and converts); all work runs with the GIL released.
use crate::convert::array2;
use crate::errors::detach;
use crate::errors::IntoPy;
use crate::monitor::PyMonitor;
use crate::products::PyProducts;
use layerscope_core::engine::neighbors::{dedup_knn, Cpu, Duplicates, Products};
use layerscope_core::measures::cka::rbf::{self as kernel, RbfTable};
use layerscope_core::measures::hsic::Estimator;
use layerscope_core::measures::prepared::{table, Measure, Prepared};
use layerscope_core::measures::{cknna, id, rsa, Layers};
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};

/// The device's own exception when it raised one (see [`PyProducts::raise`]).
fn reraise(prod: &Option<PyProducts>, e: PyErr) -> PyErr {
    match prod {
        Some(p) => p.raise(e),
        None => e,
    }
}

fn slice2<'a>(a: &'a PyReadonlyArray2<'_, f64>, what: &str) -> PyResult<(&'a [f64], usize, usize)> {
    let sh = a.shape();
    let (m, d) = (sh[0], sh[1]);
    let s = crate::convert::c_slice(a, what)?;
    Ok((s, m, d))
}

/// Borrowed layers of a call (see [`Layers`]).
type Owned<'a> = Vec<(&'a [f64], usize)>;

fn slices<'a>(v: &'a [PyReadonlyArray2<'_, f64>], what: &str) -> PyResult<(Owned<'a>, usize)> {
    let mut out = Vec::with_capacity(v.len());
    let mut m0 = None;
    for a in v {
        let (s, m, d) = slice2(a, what)?;
        if *m0.get_or_insert(m) != m {
            return Err(Error::Mismatch(format!(
                "{what}: layers have different numbers of rows"
            )))
            .py_err();
        }
        out.push((s, d));
    }
    Ok((out, m0.unwrap_or(0)))
}

/// kNN graph with duplicate handling. Returns a dict: dist (m'×k float64, exact, ascending),
/// idx (m'×k int64, indices into the kept rows), kept (int64 input rows used),
/// duplicates (int), tolerance (float). `products`: None (this CPU) or an object computing
/// the distance products elsewhere (``layerscope._device.products.DeviceProducts``); the lower bounds
/// and the exact f64 recheck stay here.
///
/// :type x: npt.NDArray[np.float64]
/// :type k: int
/// :type duplicates: str
/// :type tolerance: float | None
/// :type max_memory: int | None
/// :type progress: ProgressCallback
/// :type products: Any | None
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (x, k, duplicates="drop", tolerance=None, max_memory=None, progress=None, products=None))]
#[allow(clippy::too_many_arguments)]
fn knn_graph<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f64>,
    k: usize,
    duplicates: &str,
    tolerance: Option<f64>,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
    products: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let policy = Duplicates::parse(duplicates).py_err()?;
    let budget = Budget::resolve(max_memory).py_err()?;
    let (s, m, d) = slice2(&x, "x")?;
    let mon = PyMonitor::new(progress);
    let prod = products.map(PyProducts::new);
    let r = detach(py, || {
        let p: &dyn Products = prod.as_ref().map_or(&Cpu, |p| p as &dyn Products);
        dedup_knn(s, m, d, k, tolerance, policy, &budget, &mon, p)
    })
    .map_err(|e| reraise(&prod, e))?;
    let out = PyDict::new(py);
    let mm = r.knn.m;
    let dist = Array2::from_shape_vec((mm, k), r.knn.dist)
        .map_err(|e| Error::invalid(e.to_string()))
        .py_err()?;
    let idx: Vec<i64> = r.knn.idx.iter().map(|&v| v as i64).collect();
    let idx = Array2::from_shape_vec((mm, k), idx)
        .map_err(|e| Error::invalid(e.to_string()))
        .py_err()?;
    let kept: Vec<i64> = r.kept.iter().map(|&v| v as i64).collect();
    out.set_item("dist", dist.into_pyarray(py))?;
    out.set_item("idx", idx.into_pyarray(py))?;
    out.set_item("kept", kept.into_pyarray(py))?;
    out.set_item("duplicates", r.duplicates)?;
    out.set_item("tolerance", r.tol)?;
    Ok(out)
}

/// Intrinsic dimension from sorted kNN distances (rows of length k). method: "twonn",
/// "twonn-mle", "mle", "gride". Returns a dict: value, error, ci (lo, hi), n_used, reason.
///
/// :type dist: npt.NDArray[np.float64]
/// :type method: str
/// :type discard_fraction: float
/// :type k: int
/// :type pool: str
/// :type n1: int
/// :type n2: int
/// :type bootstrap: int
/// :type seed: int
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (dist, method, *, discard_fraction=0.1, k=20, pool="harmonic", n1=1, n2=2, bootstrap=0, seed=0))]
#[allow(clippy::too_many_arguments)]
fn id_estimate<'py>(
    py: Python<'py>,
    dist: PyReadonlyArray2<'py, f64>,
    method: &str,
    discard_fraction: f64,
    k: usize,
    pool: &str,
    n1: usize,
    n2: usize,
    bootstrap: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let (s, _, kk) = slice2(&dist, "dist")?;
    let meth = match method {
        "twonn" => id::Method::TwoNn {
            discard_fraction,
            method: id::TwoNnMethod::Linear,
        },
        "twonn-mle" => id::Method::TwoNn {
            discard_fraction,
            method: id::TwoNnMethod::Mle,
        },
        "mle" => id::Method::Mle {
            k,
            pool: id::Pool::parse(pool).py_err()?,
        },
        "gride" => id::Method::Gride { n1, n2 },
        _ => {
            return Err(Error::invalid(format!(
                "method must be 'twonn', 'twonn-mle', 'mle' or 'gride', got {method:?}"
            )))
            .py_err()
        }
    };
    let r = detach(py, || id::estimate(s, kk, meth, bootstrap, seed))?;
    let out = PyDict::new(py);
    out.set_item("value", r.value)?;
    out.set_item("error", r.error)?;
    out.set_item("ci", (r.ci.0, r.ci.1))?;
    out.set_item("n_used", r.n_used)?;
    out.set_item("reason", r.reason)?;
    Ok(out)
}

/// RBF CKA for all layer pairs (see layerscope_core::measures::cka::rbf). Returns a dict:
/// values (La×Lb CKA), xy (La×Lb HSIC), xx (La), yy (Lb), bw_a, bw_b.
///
/// :type a: Sequence[npt.NDArray[np.float64]]
/// :type b: Sequence[npt.NDArray[np.float64]] | None
/// :type sigma: float
/// :type unbiased: bool
/// :type max_memory: int | None
/// :type progress: ProgressCallback
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (a, b=None, *, sigma=1.0, unbiased=false, max_memory=None, progress=None))]
fn rbf_hsic<'py>(
    py: Python<'py>,
    a: Vec<PyReadonlyArray2<'py, f64>>,
    b: Option<Vec<PyReadonlyArray2<'py, f64>>>,
    sigma: f64,
    unbiased: bool,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let budget = Budget::resolve(max_memory).py_err()?;
    let (sa, ma) = slices(&a, "a")?;
    let sb = second(&b, ma)?;
    let mon = PyMonitor::new(progress);
    let mut r = detach(py, || {
        kernel::rbf_hsic(&sa, sb.as_deref(), ma, sigma, unbiased, &budget, &mon)
    })?;
    let out = PyDict::new(py);
    let values = std::mem::take(&mut r.table.cka);
    out.set_item("values", matrix(py, values, &sa, sb.as_deref())?)?;
    rbf_items(&out, r.table, sa.len(), r.bw_a, r.bw_b)?;
    Ok(out)
}

/// An RBF CKA's HSIC values into `out`: `xy` (`La × Lb`), `xx`, `yy`, and the kernels'
/// bandwidths `bw_a`, `bw_b`.
fn rbf_items(
    out: &Bound<'_, PyDict>,
    t: RbfTable,
    la: usize,
    bw_a: Vec<f64>,
    bw_b: Vec<f64>,
) -> PyResult<()> {
    let py = out.py();
    out.set_item("xy", array2(py, (la, t.yy.len()), t.xy)?)?;
    out.set_item("xx", t.xx.into_pyarray(py))?;
    out.set_item("yy", t.yy.into_pyarray(py))?;
    out.set_item("bw_a", bw_a.into_pyarray(py))?;
    out.set_item("bw_b", bw_b.into_pyarray(py))?;
    Ok(())
}

/// A [`Error::Mismatch`] unless `a` and `b` have the same rows.
fn same_rows(ma: usize, mb: usize) -> PyResult<()> {
    if ma != mb {
        return Err(Error::Mismatch(format!("a has {ma} rows, b has {mb}"))).py_err();
    }
    Ok(())
}

/// `b` (optional) as borrowed layers with the same rows as `a`.
fn second<'a>(
    b: &'a Option<Vec<PyReadonlyArray2<'_, f64>>>,
    ma: usize,
) -> PyResult<Option<Owned<'a>>> {
    match b {
        Some(b) => {
            let (sb, mb) = slices(b, "b")?;
            same_rows(ma, mb)?;
            Ok(Some(sb))
        }
        None => Ok(None),
    }
}

/// The row-major `La × Lb` values of an all-pairs measure as a numpy array (`b = None`:
/// `La × La`).
fn matrix<'py>(
    py: Python<'py>,
    vals: Vec<f64>,
    a: &Layers<'_>,
    b: Option<&Layers<'_>>,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    array2(py, (a.len(), b.unwrap_or(a).len()), vals)
}

/// An all-pairs measure over the sample's layers `a` (and `b`): the layers borrowed, the
/// rows checked equal, `f(a, b, m, budget, monitor)` run with the GIL released, its values
/// shaped `La × Lb`.
fn pair_matrix<'py, F>(
    py: Python<'py>,
    a: &[PyReadonlyArray2<'py, f64>],
    b: &Option<Vec<PyReadonlyArray2<'py, f64>>>,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
    f: F,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>>
where
    F: Send
        + FnOnce(
            &Layers<'_>,
            Option<&Layers<'_>>,
            usize,
            &Budget,
            &PyMonitor,
        ) -> Result<Vec<f64>, Error>,
{
    let budget = Budget::resolve(max_memory).py_err()?;
    let (sa, ma) = slices(a, "a")?;
    let sb = second(b, ma)?;
    let mon = PyMonitor::new(progress);
    let vals = detach(py, || f(&sa, sb.as_deref(), ma, &budget, &mon))?;
    matrix(py, vals, &sa, sb.as_deref())
}

/// RSA: correlations of the RDMs of all layer pairs (La×Lb, or La×La when b is None); see
/// `layerscope_core::measures::rsa::rsa_matrix`.
///
/// :type a: Sequence[npt.NDArray[np.float64]]
/// :type b: Sequence[npt.NDArray[np.float64]] | None
/// :type dissimilarity: str
/// :type compare: str
/// :type max_memory: int | None
/// :type progress: ProgressCallback
/// :rtype: npt.NDArray[np.float64]
#[pyfunction]
#[pyo3(signature = (a, b=None, *, dissimilarity="euclidean", compare="spearman", max_memory=None, progress=None))]
fn rsa_matrix<'py>(
    py: Python<'py>,
    a: Vec<PyReadonlyArray2<'py, f64>>,
    b: Option<Vec<PyReadonlyArray2<'py, f64>>>,
    dissimilarity: &str,
    compare: &str,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    let how = rsa::Rsa::parse(dissimilarity, compare).py_err()?;
    pair_matrix(py, &a, &b, max_memory, progress, |a, b, m, budget, mon| {
        rsa::rsa_matrix(a, b, m, how, budget, mon)
    })
}

/// An all-pairs measure on each row's `k` nearest neighbours: `(a, b, m, k, normalize, budget,
/// monitor)`.
type NeighbourTable = fn(
    &Layers<'_>,
    Option<&Layers<'_>>,
    usize,
    usize,
    bool,
    &Budget,
    &dyn layerscope_core::Monitor,
) -> layerscope_core::Result<Vec<f64>>;

/// Mutual kNN alignment (`measure="mutual_knn"`, see
/// `layerscope_core::measures::rsa::mutual_knn_matrix`) or CKNNA (`"cknna"`, Huh et al. 2024,
/// `layerscope_core::measures::cknna::cknna_matrix`) for all layer pairs (La×Lb, or La×La
/// when b is None): the measures on each row's `k` nearest neighbours.
///
/// :type a: Sequence[npt.NDArray[np.float64]]
/// :type b: Sequence[npt.NDArray[np.float64]] | None
/// :type measure: str
/// :type k: int
/// :type normalize: bool
/// :type max_memory: int | None
/// :type progress: ProgressCallback
/// :rtype: npt.NDArray[np.float64]
#[pyfunction]
#[pyo3(signature = (a, b, measure, *, k=10, normalize=true, max_memory=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn neighbour_matrix<'py>(
    py: Python<'py>,
    a: Vec<PyReadonlyArray2<'py, f64>>,
    b: Option<Vec<PyReadonlyArray2<'py, f64>>>,
    measure: &str,
    k: usize,
    normalize: bool,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    let tables: [(&str, NeighbourTable); 2] = [
        ("mutual_knn", rsa::mutual_knn_matrix),
        ("cknna", cknna::cknna_matrix),
    ];
    let table = layerscope_core::error::choice("measure", measure, &tables).py_err()?;
    pair_matrix(py, &a, &b, max_memory, progress, |a, b, m, budget, mon| {
        table(a, b, m, k, normalize, budget, mon)
    })
}

/// Peak bytes of CKNNA over `layers` layers of `m` sampled rows, the widest `dmax` wide
/// (see `layerscope_core::measures::cknna::cknna_bytes`).
///
/// :type layers: int
/// :type m: int
/// :type dmax: int
/// :type k: int
/// :rtype: int
#[pyfunction]
fn cknna_bytes(layers: usize, m: usize, dmax: usize, k: usize) -> u128 {
    cknna::cknna_bytes(layers, m, dmax, k)
}

/// Peak bytes of an exact kNN graph of `m` points of width `d` with `k` neighbours (see
/// `layerscope_core::engine::neighbors::knn_bytes`).
///
/// :type m: int
/// :type d: int
/// :type k: int
/// :rtype: int
#[pyfunction]
fn knn_bytes(m: usize, d: usize, k: usize) -> u128 {
    layerscope_core::engine::neighbors::knn_bytes(m, d, k)
}

/// Peak bytes of the RBF HSIC of `layers` Grams of `m` rows, the widest `dmax` wide
/// (`layerscope_core::measures::cka::rbf::rbf_hsic_bytes`).
///
/// :type layers: int
/// :type m: int
/// :type dmax: int
/// :rtype: int
#[pyfunction]
fn rbf_hsic_bytes(layers: usize, m: usize, dmax: usize) -> u128 {
    layerscope_core::measures::cka::rbf::rbf_hsic_bytes(layers, m, dmax)
}

/// One layer's prepared Gram, RDM or kNN graph for a pair measure (the unit of a
/// distributed run, `layerscope_core::measures::prepared`); pickled as its bytes.
#[pyclass(module = "layerscope._native", name = "PreparedLayer", frozen)]
pub struct PyPrepared {
    inner: Prepared,
}

#[pymethods]
impl PyPrepared {
    /// Read back :meth:`to_bytes` (a malformed buffer is an InvalidArgumentError).
    ///
    /// :type data: bytes
    /// :rtype: PreparedLayer
    #[classmethod]
    fn from_bytes(_cls: &Bound<'_, PyType>, py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let inner = detach(py, || Prepared::from_bytes(data))?;
        Ok(PyPrepared { inner })
    }

    /// :rtype: bytes
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.inner.to_bytes().py_err()?;
        Ok(PyBytes::new(py, &b))
    }

    /// :rtype: tuple[Any, tuple[bytes]]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let ctor = slf.get_type().getattr("from_bytes")?;
        Ok((ctor, (slf.get().to_bytes(py)?,)))
    }

    /// ``"rbf"``, ``"rsa"`` or ``"knn"``.
    ///
    /// :rtype: str
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// The RBF bandwidth (None for RSA and kNN).
    ///
    /// :rtype: float | None
    #[getter]
    fn bandwidth(&self) -> Option<f64> {
        match &self.inner {
            Prepared::Rbf { bandwidth, .. } => Some(*bandwidth),
            _ => None,
        }
    }

    /// Its size as bytes.
    ///
    /// :rtype: int
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.byte_len()
    }

    fn __repr__(&self) -> String {
        let what = if self.inner.kind() == "rsa" {
            "RDM entries"
        } else {
            "rows"
        };
        format!(
            "PreparedLayer({}, {} {what}, {} bytes)",
            self.inner.kind(),
            self.inner.rows(),
            self.inner.byte_len()
        )
    }
}

/// The measure of :func:`prepare_layer` and :func:`prepare_bytes`: `measure` ("rbf", "rsa"
/// or "knn") with its keyword options (`sigma`, `unbiased`; `dissimilarity`, `compare`;
/// `k`, `normalize`), each defaulted as in the measure's own function; an option the measure
/// does not take is an error.
fn measure_of(measure: &str, options: Option<&Bound<'_, PyDict>>) -> PyResult<Measure> {
    let takes: &[&str] = match measure {
        "rbf" => &["sigma", "unbiased"],
        "rsa" => &["dissimilarity", "compare"],
        "knn" => &["k", "normalize"],
        other => {
            return Err(Error::invalid(format!(
                "measure is \"rbf\", \"rsa\" or \"knn\", got {other:?}"
            )))
            .py_err()
        }
    };
    if let Some(d) = options {
        for (key, _) in d.iter() {
            let key: String = key.extract()?;
            if !takes.contains(&key.as_str()) {
                return Err(Error::invalid(format!(
                    "measure {measure:?} takes {takes:?}, not {key:?}"
                )))
                .py_err();
            }
        }
    }
    fn get<'py, T: FromPyObjectOwned<'py>>(
        d: Option<&Bound<'py, PyDict>>,
        key: &str,
        default: T,
    ) -> PyResult<T> {
        match d.map(|d| d.get_item(key)).transpose()?.flatten() {
            Some(v) => v.extract().map_err(Into::into),
            None => Ok(default),
        }
    }
    Ok(match measure {
        "rbf" => Measure::Rbf {
            sigma: get(options, "sigma", 1.0)?,
            estimator: Estimator::from_unbiased(get(options, "unbiased", false)?),
        },
        "rsa" => {
            let dissimilarity: String = get(options, "dissimilarity", "euclidean".into())?;
            let compare: String = get(options, "compare", "spearman".into())?;
            Measure::Rsa(rsa::Rsa::parse(&dissimilarity, &compare).py_err()?)
        }
        _ => Measure::Knn {
            k: get(options, "k", 10)?,
            normalize: get(options, "normalize", false)?,
        },
    })
}

/// Bytes of :func:`prepare_layer` for `m` rows of width `d`: ``(peak, prepared)`` — its
/// peak (what it checks against the budget) and the prepared layer's size (what a block
/// of the pair table holds per layer); see
/// `layerscope_core::measures::prepared::Measure`. `options`: the measure's, as in
/// :func:`prepare_layer`.
///
/// :type measure: str
/// :type m: int
/// :type d: int
/// :type options: Any
/// :rtype: tuple[int, int]
#[pyfunction]
#[pyo3(signature = (measure, m, d, **options))]
fn prepare_bytes(
    measure: &str,
    m: usize,
    d: usize,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<(u128, u128)> {
    let me = measure_of(measure, options)?;
    Ok((me.peak_bytes(m, d), me.prepared_bytes(m)))
}

/// One layer's step of :func:`rbf_hsic` (``measure="rbf"``: its RBF Gram prepared for the
/// estimator, options `sigma` (1.0), `unbiased` (False)), :func:`rsa_matrix` (``"rsa"``: its
/// prepared RDM; `dissimilarity` ("euclidean"), `compare` ("spearman")) or
/// :func:`neighbour_matrix` (``"knn"``: its exact kNN graph; `k` (10), `normalize` (False));
/// checked against the budget (:func:`prepare_bytes`) first. `products`: as in
/// :func:`knn_graph`.
///
/// :type x: npt.NDArray[np.float64]
/// :type measure: str
/// :type max_memory: int | None
/// :type products: Any | None
/// :type options: Any
/// :rtype: PreparedLayer
#[pyfunction]
#[pyo3(signature = (x, measure, *, max_memory=None, products=None, **options))]
fn prepare_layer(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, f64>,
    measure: &str,
    max_memory: Option<u64>,
    products: Option<Py<PyAny>>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyPrepared> {
    let me = measure_of(measure, options)?;
    let budget = Budget::resolve(max_memory).py_err()?;
    let (s, m, d) = slice2(&x, "x")?;
    let prod = products.map(PyProducts::new);
    let inner = detach(py, || {
        let p: &dyn Products = prod.as_ref().map_or(&Cpu, |p| p as &dyn Products);
        me.prepare_with(s, m, d, &budget, p)
    })
    .map_err(|e| reraise(&prod, e))?;
    Ok(PyPrepared { inner })
}

/// The pair table over prepared layers (``b`` None: every pair of ``a``, each unordered
/// pair once, the diagonal as :func:`rbf_hsic` / :func:`rsa_matrix` /
/// :func:`neighbour_matrix` give it). A dict: ``values`` (La×Lb); for RBF also ``xy``
/// (La×Lb HSIC), ``xx``, ``yy`` (self-HSICs), ``bw_a``, ``bw_b``.
///
/// :type a: Sequence[PreparedLayer]
/// :type b: Sequence[PreparedLayer] | None
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (a, b=None))]
fn prepared_table<'py>(
    py: Python<'py>,
    a: Vec<PyRef<'py, PyPrepared>>,
    b: Option<Vec<PyRef<'py, PyPrepared>>>,
) -> PyResult<Bound<'py, PyDict>> {
    let ra: Vec<&Prepared> = a.iter().map(|p| &p.inner).collect();
    let rb: Option<Vec<&Prepared>> = b.as_ref().map(|b| b.iter().map(|p| &p.inner).collect());
    if let Some(rb) = &rb {
        if let (Some(p), Some(q)) = (ra.first(), rb.first()) {
            same_rows(p.rows(), q.rows())?;
        }
    }
    let t = detach(py, || table(&ra, rb.as_deref()))?;
    let lb = rb.as_ref().map_or(ra.len(), |v| v.len());
    let shape = |v: Vec<f64>| {
        Array2::from_shape_vec((ra.len(), lb), v)
            .map_err(|e| Error::invalid(e.to_string()))
            .py_err()
    };
    let out = PyDict::new(py);
    out.set_item("values", shape(t.values)?.into_pyarray(py))?;
    if let Some(r) = t.rbf {
        let bw = |v: &[&Prepared]| -> Vec<f64> {
            v.iter()
                .map(|p| match p {
                    Prepared::Rbf { bandwidth, .. } => *bandwidth,
                    _ => f64::NAN,
                })
                .collect()
        };
        let bw_b = bw(rb.as_deref().unwrap_or(&[]));
        rbf_items(&out, r, ra.len(), bw(&ra), bw_b)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrepared>()?;
    m.add_function(wrap_pyfunction!(prepare_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_layer, m)?)?;
    m.add_function(wrap_pyfunction!(prepared_table, m)?)?;
    m.add_function(wrap_pyfunction!(knn_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(rbf_hsic_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(knn_graph, m)?)?;
    m.add_function(wrap_pyfunction!(id_estimate, m)?)?;
    m.add_function(wrap_pyfunction!(rbf_hsic, m)?)?;
    m.add_function(wrap_pyfunction!(rsa_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(neighbour_matrix, m)?)?;
    m.add_function(wrap_pyfunction!(cknna_bytes, m)?)?;
    Ok(())
}
