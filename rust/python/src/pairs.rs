//! Bindings of the pair statistics of a pass (layerscope-core `engine::moments::PairStats`,
//! `PairPlan`): `PairStats` and the pass that makes them (`pair_pass`, any strategy), the
//! plan a pass would follow (`pair_plan`) and the planner's sizes and rates.
//! Only type conversion here; every computation runs in the core with the GIL released.
use crate::errors::detach;
use crate::errors::IntoPy;
use crate::moments::PyPassLayers;
use crate::monitor::PyMonitor;
use crate::source::detach_rows;
use layerscope_core::engine::moments::{
    default_block_rows_for, Compute, PairPlan, PairStats as CorePairStats, PassShape, TilePlan,
};
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// What linear CKA needs of every layer pair (`‖C_ij‖²`, `Σ r̄_i r̄_j`, `tr C_ii`, `n`),
/// from one pass or summed over the tiles of a tiled pass, and the plan that made them.
#[pyclass(module = "layerscope._native", name = "PairStats", extends = PyPassLayers, frozen)]
pub struct PyPairStats {
    inner: Arc<CorePairStats>,
    num_a: usize,
    plan: PassPlan,
}

/// The plan an exact linear pass followed, as :func:`pair_plan` reports it and
/// `PairStats.from_sums` takes it: `strategy` (`"single-pass"`, `"tiled"` or `"gram"`),
/// `passes`, `peak_bytes`, `block_rows`, `layer_reads` (passes reading each layer) and
/// `madds` (multiply-adds of the packed products over all passes).
struct PassPlan {
    strategy: &'static str,
    passes: usize,
    peak_bytes: u128,
    block_rows: usize,
    layer_reads: Vec<u64>,
    madds: u128,
}

impl PassPlan {
    fn of(plan: &PairPlan, n: u64) -> Self {
        PassPlan {
            strategy: plan.strategy(),
            passes: plan.passes(),
            peak_bytes: plan.peak_bytes(),
            block_rows: plan.block_rows(),
            layer_reads: plan.layer_reads(),
            madds: plan.madds(n),
        }
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("strategy", self.strategy)?;
        d.set_item("passes", self.passes)?;
        d.set_item("peak_bytes", self.peak_bytes)?;
        d.set_item("block_rows", self.block_rows)?;
        d.set_item("layer_reads", self.layer_reads.clone())?;
        d.set_item("madds", self.madds)?;
        Ok(d)
    }

    fn from_dict(plan: &Bound<'_, PyDict>) -> PyResult<Self> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            plan.get_item(k)?
                .ok_or_else(|| Error::invalid(format!("the plan has no {k:?}")))
                .py_err()
        };
        let strategy = match get("strategy")?.extract::<String>()?.as_str() {
            "gram" => "gram",
            "tiled" => "tiled",
            "single-pass" => "single-pass",
            other => {
                return Err(Error::invalid(format!("unknown strategy {other:?}"))).py_err();
            }
        };
        Ok(PassPlan {
            strategy,
            passes: get("passes")?.extract()?,
            peak_bytes: get("peak_bytes")?.extract()?,
            block_rows: get("block_rows")?.extract()?,
            layer_reads: get("layer_reads")?.extract()?,
            madds: get("madds")?.extract()?,
        })
    }
}

impl PyPairStats {
    /// As a Python object, its [`PyPassLayers`] base filled from the statistics.
    pub(crate) fn into_py(self, py: Python<'_>) -> PyResult<Py<Self>> {
        let (stats, num_a) = (self.inner.clone(), self.num_a);
        Py::new(py, PyPassLayers::of(stats, num_a, self))
    }

    /// The statistics of a tile plan's pass (assembled from its tiles' partial sums).
    pub(crate) fn from_tiles(
        inner: CorePairStats,
        plan: &TilePlan,
        strategy: &'static str,
    ) -> Self {
        PyPairStats {
            num_a: plan.num_a,
            plan: PassPlan {
                strategy,
                passes: plan.passes(),
                peak_bytes: plan.peak_bytes,
                block_rows: plan.block_rows,
                layer_reads: plan.layer_reads(),
                madds: plan.madds_per_row() * inner.n as u128,
            },
            inner: Arc::new(inner),
        }
    }
}

#[pymethods]
impl PyPairStats {
    /// Pair statistics computed elsewhere (the torch device engine's Gram route): `sq`
    /// (``‖C_ij‖²``), `rr` (``Σ r̄_i r̄_j``) and `known` as ``L × L`` arrays, `trace` and
    /// `nonfinite` per layer, and the plan (the dict of :func:`pair_plan`, strategy
    /// ``"gram"``) they followed.
    ///
    /// :type names: Sequence[str]
    /// :type dims: Sequence[int]
    /// :type num_a: int
    /// :type n: int
    /// :type sq: npt.NDArray[np.float64]
    /// :type rr: npt.NDArray[np.float64]
    /// :type trace: Sequence[float]
    /// :type known: npt.NDArray[np.bool_]
    /// :type nonfinite: Sequence[int | None]
    /// :type plan: dict[str, Any]
    /// :rtype: PairStats
    #[classmethod]
    #[allow(clippy::too_many_arguments)]
    fn from_sums(
        _cls: &Bound<'_, pyo3::types::PyType>,
        names: Vec<String>,
        dims: Vec<usize>,
        num_a: usize,
        n: u64,
        sq: numpy::PyReadonlyArray2<'_, f64>,
        rr: numpy::PyReadonlyArray2<'_, f64>,
        trace: Vec<f64>,
        known: numpy::PyReadonlyArray2<'_, bool>,
        nonfinite: Vec<Option<u64>>,
        plan: &Bound<'_, PyDict>,
    ) -> PyResult<Py<Self>> {
        let plan = PassPlan::from_dict(plan)?;
        if num_a == 0 || num_a > dims.len() {
            return Err(Error::invalid(format!(
                "num_a {num_a} of {} layers",
                dims.len()
            )))
            .py_err();
        }
        let inner = CorePairStats::from_sums(
            n,
            &dims,
            &names,
            sq.as_array().iter().copied().collect(),
            rr.as_array().iter().copied().collect(),
            trace,
            known.as_array().iter().copied().collect(),
            nonfinite,
        )
        .py_err()?;
        PyPairStats {
            inner: Arc::new(inner),
            num_a,
            plan,
        }
        .into_py(_cls.py())
    }

    /// The plan the pass followed: `strategy`, `passes`, `peak_bytes`, `block_rows`,
    /// `layer_reads`, `madds` (see :func:`pair_plan`).
    ///
    /// :rtype: dict[str, Any]
    #[getter]
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.plan.to_dict(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "PairStats(n={}, layers={}, strategy={:?}, passes={})",
            self.inner.n,
            self.inner.dims.len(),
            self.plan.strategy,
            self.plan.passes
        )
    }
}

/// The exact linear pair statistics of `parts` (see `source.rs`; the first `num_a` layers are
/// the first source's) under the plan `PairPlan::choose` picks (the cheapest that fits the
/// budget: one pass, tiled passes or per-layer Grams; `strategy` forces one). GIL released; one progress bar over all
/// passes.
///
/// :type parts: Sequence[Part]
/// :type names: Sequence[str]
/// :type num_a: int
/// :type block_rows: int | None
/// :type check_finite: bool
/// :type max_memory: int | None
/// :type progress: ProgressCallback
/// :type compute: str
/// :type strategy: str | None
/// :rtype: PairStats
#[pyfunction]
#[pyo3(signature = (parts, names, num_a, block_rows=None, check_finite=true, max_memory=None,
    progress=None, compute="float64", strategy=None))]
#[allow(clippy::too_many_arguments)]
fn pair_pass(
    py: Python<'_>,
    parts: Vec<Bound<'_, PyAny>>,
    names: Vec<String>,
    num_a: usize,
    block_rows: Option<usize>,
    check_finite: bool,
    max_memory: Option<u64>,
    progress: Option<Py<PyAny>>,
    compute: &str,
    strategy: Option<String>,
) -> PyResult<Py<PyPairStats>> {
    let compute = Compute::parse(compute).py_err()?;
    let budget = Budget::resolve(max_memory).py_err()?;
    let mon = PyMonitor::new(progress);
    let (plan, st) = detach_rows(py, &parts, |src| {
        let dims = layerscope_core::store::RowSource::dims(src);
        let n = layerscope_core::store::RowSource::num_rows(src);
        let strategy = strategy.as_deref();
        let shape = PassShape::new(&dims, num_a, n, block_rows, compute)?;
        let plan = PairPlan::choose(&shape, &budget, strategy)?;
        let st = plan.run(src, &names, check_finite, &budget, &mon)?;
        Ok::<_, Error>((plan, st))
    })?;
    PyPairStats {
        plan: PassPlan::of(&plan, st.n),
        inner: Arc::new(st),
        num_a,
    }
    .into_py(py)
}

/// The plan an exact all-pairs linear pass would run (nothing is read): layers of widths
/// `dims` (`0..num_a` from the first source), `n` rows, under the budget in force; `strategy`
/// as in `pair_pass` (None: the cheapest that fits). Returns a dict: `strategy`, `passes`,
/// `peak_bytes`, `block_rows`, `layer_reads` (passes reading each layer), `madds`,
/// `cost_seconds` (at the nominal rates that rank plans), `budget_bytes`, `budget_source`;
/// a Gram-route plan also `held` (Grams held at once) and `rounds` (per round, the layers
/// whose Grams are held and those streamed past them, one at a time); `tiles`: the plan as a
/// `TilePlan` (what a distributed or device run cuts into `(tile, row range)` tasks), None
/// for the Gram route (it needs every row of a layer at once).
/// MemoryBudgetError (with the minimum that would work) when no plan fits.
///
/// :type dims: Sequence[int]
/// :type num_a: int
/// :type n: int
/// :type block_rows: int | None
/// :type compute: str
/// :type max_memory: int | None
/// :type strategy: str | None
/// :rtype: dict[str, Any]
#[pyfunction]
#[pyo3(signature = (dims, num_a, n, block_rows=None, compute="float64", max_memory=None,
    strategy=None))]
#[allow(clippy::too_many_arguments)]
fn pair_plan<'py>(
    py: Python<'py>,
    dims: Vec<usize>,
    num_a: usize,
    n: u64,
    block_rows: Option<usize>,
    compute: &str,
    max_memory: Option<u64>,
    strategy: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let compute = Compute::parse(compute).py_err()?;
    let budget = Budget::resolve(max_memory).py_err()?;
    if num_a == 0 || num_a > dims.len() {
        return Err(Error::invalid(format!(
            "num_a must be between 1 and {} (the number of layers), got {num_a}",
            dims.len()
        )))
        .py_err();
    }
    let strategy = strategy.as_deref();
    let plan = detach(py, || {
        let shape = PassShape::new(&dims, num_a, n, block_rows, compute)?;
        PairPlan::choose(&shape, &budget, strategy)
    })?;
    let d = PassPlan::of(&plan, n).to_dict(py)?;
    d.set_item("cost_seconds", plan.cost_seconds(n))?;
    d.set_item("budget_bytes", budget.bytes)?;
    d.set_item("budget_source", budget.source.clone())?;
    if let PairPlan::Gram(g) = &plan {
        d.set_item("held", g.held)?;
        d.set_item("rounds", g.rounds.clone())?;
    }
    let tiles = plan
        .tile_plan()
        .map(|inner| crate::distributed::PyTilePlan {
            inner,
            strategy: plan.strategy(),
        });
    d.set_item("tiles", tiles)?;
    Ok(d)
}

/// Multiply-adds per second of the packed product kernel on this machine in `compute`
/// arithmetic (layerscope_core::engine::moments::measured_madds_per_s; GIL released).
///
/// :type compute: str
/// :type seconds: float
/// :rtype: float
#[pyfunction]
#[pyo3(signature = (compute="float64", seconds=0.2))]
fn measured_madds_per_s(py: Python<'_>, compute: &str, seconds: f64) -> PyResult<f64> {
    let compute = Compute::parse(compute).py_err()?;
    detach(py, || {
        layerscope_core::engine::moments::measured_madds_per_s(compute, seconds)
    })
}

/// Rows per block the streaming pass uses by default for layers of these widths.
///
/// :type dims: Sequence[int]
/// :type compute: str
/// :rtype: int
#[pyfunction]
#[pyo3(name = "default_block_rows", signature = (dims, compute="float64"))]
fn py_default_block_rows(dims: Vec<usize>, compute: &str) -> PyResult<usize> {
    Ok(default_block_rows_for(
        &dims,
        Compute::parse(compute).py_err()?,
    ))
}

/// Peak bytes of one streaming pass (accumulator, two row blocks, packed SYRK panels).
///
/// :type dims: Sequence[int]
/// :type block_rows: int
/// :type compute: str
/// :rtype: int
#[pyfunction]
#[pyo3(signature = (dims, block_rows, compute="float64"))]
fn pass_bytes(dims: Vec<usize>, block_rows: usize, compute: &str) -> PyResult<u128> {
    Ok(layerscope_core::engine::moments::pass_bytes(
        &dims,
        block_rows,
        Compute::parse(compute).py_err()?,
    ))
}

/// Raise MemoryBudgetError (saying how many of the layers fit) when a moment pass over
/// layers of these widths does not fit the budget in force (`max_memory`, else
/// LAYERSCOPE_MAX_MEMORY, else the machine's); returns `(budget bytes, source)`.
///
/// :type dims: Sequence[int]
/// :type block_rows: int
/// :type compute: str
/// :type max_memory: int | None
/// :rtype: tuple[int, str]
#[pyfunction]
#[pyo3(signature = (dims, block_rows, compute="float64", max_memory=None))]
fn check_moment_memory(
    dims: Vec<usize>,
    block_rows: usize,
    compute: &str,
    max_memory: Option<u64>,
) -> PyResult<(u64, String)> {
    let budget = Budget::resolve(max_memory).py_err()?;
    layerscope_core::engine::moments::check_memory(
        &dims,
        block_rows,
        Compute::parse(compute).py_err()?,
        &budget,
    )
    .py_err()?;
    Ok((budget.bytes, budget.source))
}

/// Bytes of the accumulator for layers of these widths (`(D+L)² × 8` plus vectors).
///
/// :type dims: Sequence[int]
/// :rtype: int
#[pyfunction]
fn accumulator_bytes(dims: Vec<usize>) -> u128 {
    layerscope_core::engine::moments::accumulator_bytes(&dims)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_moment_memory, m)?)?;
    m.add_class::<PyPairStats>()?;
    m.add_function(wrap_pyfunction!(pair_pass, m)?)?;
    m.add_function(wrap_pyfunction!(pair_plan, m)?)?;
    m.add(
        "PAIR_STRATEGIES",
        layerscope_core::engine::moments::PAIR_STRATEGIES.to_vec(),
    )?;
    m.add_function(wrap_pyfunction!(measured_madds_per_s, m)?)?;
    m.add_function(wrap_pyfunction!(py_default_block_rows, m)?)?;
    m.add_function(wrap_pyfunction!(accumulator_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(pass_bytes, m)?)?;
    Ok(())
}
