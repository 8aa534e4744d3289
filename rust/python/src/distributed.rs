//! Bindings of the units of a distributed pass (layerscope-core `engine::moments::partial`):
//! a plan as tiles (`TilePlan`, pickled as JSON), one task's partial sums over a row range
//! (`TilePlan.run_tile` → bytes), their merge (`merge_partials`) and the assembly of the
//! pair statistics (`PairStatsBuilder`). Only type conversion; GIL released around the work.
use crate::errors::{detach, Consumed, IntoPy};
use crate::monitor::PyMonitor;
use crate::pairs::PyPairStats;
use crate::source::detach_rows;
use layerscope_core::engine::moments::{
    default_block_rows_for, merge_partial_bytes, Compute, ExternalSums,
    PairStatsBuilder as CoreBuilder, TilePartial, TilePlan as CorePlan,
};
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};

/// An exact linear pass as tiles over column pieces of the layers (a single pass is one
/// diagonal tile): the plan a distributed run cuts into `(tile, row range)` tasks.
/// Pickled as its JSON (``to_json`` / ``from_json``, checked when read).
#[pyclass(module = "layerscope._native", name = "TilePlan", frozen)]
pub struct PyTilePlan {
    pub(crate) inner: CorePlan,
    pub(crate) strategy: &'static str,
}

fn strategy_of(name: &str) -> PyResult<&'static str> {
    match name {
        "single-pass" => Ok("single-pass"),
        "tiled" => Ok("tiled"),
        other => Err(Error::invalid(format!(
            "a tile plan's strategy is \"single-pass\" or \"tiled\", got {other:?}"
        )))
        .py_err(),
    }
}

#[pymethods]
impl PyTilePlan {
    /// One pass over every layer at once (one diagonal tile); `block_rows` None: the default
    /// for these widths, at most `n`.
    ///
    /// :type dims: Sequence[int]
    /// :type num_a: int
    /// :type n: int
    /// :type block_rows: int | None
    /// :type compute: str
    /// :rtype: TilePlan
    #[classmethod]
    #[pyo3(signature = (dims, num_a, n, block_rows=None, compute="float64"))]
    fn single(
        _cls: &Bound<'_, PyType>,
        dims: Vec<usize>,
        num_a: usize,
        n: u64,
        block_rows: Option<usize>,
        compute: &str,
    ) -> PyResult<Self> {
        let compute = Compute::parse(compute).py_err()?;
        let nmax = usize::try_from(n).unwrap_or(usize::MAX).max(1);
        let br = block_rows
            .unwrap_or_else(|| default_block_rows_for(&dims, compute))
            .min(nmax);
        let inner = CorePlan::single(&dims, num_a, br, compute);
        inner.validate().py_err()?;
        Ok(PyTilePlan {
            inner,
            strategy: "single-pass",
        })
    }

    /// The plan read back from :meth:`to_json` (checked: a malformed plan is an
    /// InvalidArgumentError).
    ///
    /// :type text: str
    /// :rtype: TilePlan
    #[classmethod]
    fn from_json(_cls: &Bound<'_, PyType>, text: &str) -> PyResult<Self> {
        let (strategy, inner): (String, CorePlan) = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("not a tile plan: {e}")))
            .py_err()?;
        inner.validate().py_err()?;
        Ok(PyTilePlan {
            inner,
            strategy: strategy_of(&strategy)?,
        })
    }

    /// :rtype: str
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&(self.strategy, &self.inner))
            .map_err(|e| Error::invalid(format!("tile plan: {e}")))
            .py_err()
    }

    /// :rtype: tuple[Any, tuple[str]]
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let ctor = slf.get_type().getattr("from_json")?;
        Ok((ctor, (slf.get().to_json()?,)))
    }

    /// ``"single-pass"`` or ``"tiled"``.
    ///
    /// :rtype: str
    #[getter]
    fn strategy(&self) -> &'static str {
        self.strategy
    }

    /// Number of tiles (each one pass over the rows when run locally).
    ///
    /// :rtype: int
    #[getter]
    fn tiles(&self) -> usize {
        self.inner.tiles.len()
    }

    /// :rtype: list[int]
    #[getter]
    fn dims(&self) -> Vec<usize> {
        self.inner.dims.clone()
    }

    /// :rtype: int
    #[getter]
    fn num_a(&self) -> usize {
        self.inner.num_a
    }

    /// :rtype: int
    #[getter]
    fn block_rows(&self) -> usize {
        self.inner.block_rows
    }

    /// :rtype: str
    #[getter]
    fn compute(&self) -> &'static str {
        match self.inner.compute {
            Compute::F64 => "float64",
            Compute::F32 => "float32",
        }
    }

    /// The largest tile's peak bytes (one task's).
    ///
    /// :rtype: int
    #[getter]
    fn peak_bytes(&self) -> u128 {
        self.inner.peak_bytes
    }

    /// Multiply-adds per row of all tiles.
    ///
    /// :rtype: int
    #[getter]
    fn madds_per_row(&self) -> u128 {
        self.inner.madds_per_row()
    }

    /// How many tiles read each layer.
    ///
    /// :rtype: list[int]
    #[getter]
    fn layer_reads(&self) -> Vec<u64> {
        self.inner.layer_reads()
    }

    /// The layers tile `t` reads (sorted).
    ///
    /// :type t: int
    /// :rtype: list[int]
    fn tile_layers(&self, t: usize) -> PyResult<Vec<usize>> {
        self.inner.tile_layers(t).py_err()
    }

    /// Peak bytes of one task of tile `t`.
    ///
    /// :type t: int
    /// :rtype: int
    fn tile_peak_bytes(&self, t: usize) -> PyResult<u128> {
        self.inner.tile_peak_bytes(t).py_err()
    }

    /// Tile `t`'s reference shift, sampled over all rows of `parts` (the plan's layers,
    /// see `source.rs`); None when a sampled value is not finite.
    ///
    /// :type parts: Sequence[Part]
    /// :type t: int
    /// :rtype: npt.NDArray[np.float64] | None
    fn tile_shift<'py>(
        &self,
        py: Python<'py>,
        parts: Vec<Bound<'py, PyAny>>,
        t: usize,
    ) -> PyResult<Option<Bound<'py, PyArray1<f64>>>> {
        let shift = detach_rows(py, &parts, |src| self.inner.tile_shift(src, t))?;
        Ok(shift.map(|s| s.into_pyarray(py)))
    }

    /// Tile `t`'s pieces in accumulator order, each ``(layer, first column, end column)``,
    /// and ``na`` (pieces ``0..na`` are side A of a cross tile; None: a diagonal tile): what
    /// another engine (the torch device engine) needs to compute the tile's sums.
    ///
    /// :type t: int
    /// :rtype: tuple[list[tuple[int, int, int]], int | None]
    #[allow(clippy::type_complexity)]
    fn tile_layout(&self, t: usize) -> PyResult<(Vec<(usize, usize, usize)>, Option<usize>)> {
        let (pieces, kind) = self.inner.tile_layout(t).py_err()?;
        Ok((
            pieces
                .into_iter()
                .map(|(l, c)| (l, c.start, c.end))
                .collect(),
            kind,
        ))
    }

    /// The names of tile `t`'s pieces for the plan's layers `names` (a whole layer's name,
    /// else ``name[c0:c1]``): how the core names them in its errors.
    ///
    /// :type names: Sequence[str]
    /// :type t: int
    /// :rtype: list[str]
    fn tile_piece_names(&self, names: Vec<String>, t: usize) -> PyResult<Vec<String>> {
        self.inner.tile_piece_names(&names, t).py_err()
    }

    /// Tile `t`'s scale exponents of `parts`, one per piece (the shifted values are
    /// multiplied by ``2**-e``; 0 for every ordinary layer). GIL released.
    ///
    /// :type parts: Sequence[Part]
    /// :type t: int
    /// :rtype: list[int]
    fn tile_scale<'py>(
        &self,
        py: Python<'py>,
        parts: Vec<Bound<'py, PyAny>>,
        t: usize,
    ) -> PyResult<Vec<i32>> {
        detach_rows(py, &parts, |src| self.inner.tile_scale(src, t))
    }

    /// Tile `t`'s partial sums made of sums computed elsewhere (the torch device engine),
    /// serialised as :meth:`run_tile` returns them: `products` (f64, row-major; a diagonal
    /// tile: ``Σ w wᵀ`` of ``w = [u, r]``, ``(D+L) × (D+L)``, upper triangle read; a cross
    /// tile: ``Σ w_A w_Bᵀ``), `sums` ``Σ w``, under `shift` and the exponents `exps` of
    /// :meth:`tile_shift` / :meth:`tile_scale` (layerscope-core `engine::moments::external`).
    ///
    /// :type names: Sequence[str]
    /// :type t: int
    /// :type n: int
    /// :type shift: npt.NDArray[np.float64]
    /// :type exps: Sequence[int]
    /// :type products: npt.NDArray[np.float64]
    /// :type sums: npt.NDArray[np.float64]
    /// :type nonfinite: Sequence[int | None]
    /// :type check_finite: bool
    /// :rtype: bytes
    #[pyo3(signature = (names, t, n, shift, exps, products, sums, nonfinite, check_finite=true))]
    #[allow(clippy::too_many_arguments)]
    fn partial_from_sums<'py>(
        &self,
        py: Python<'py>,
        names: Vec<String>,
        t: usize,
        n: u64,
        shift: PyReadonlyArray1<'py, f64>,
        exps: Vec<i32>,
        products: PyReadonlyArray2<'py, f64>,
        sums: PyReadonlyArray1<'py, f64>,
        nonfinite: Vec<Option<u64>>,
        check_finite: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let (shift, products, sums) = (shift.as_slice()?, products.as_slice()?, sums.as_slice()?);
        let x = ExternalSums {
            n,
            shift,
            exps: &exps,
            products,
            sums,
            nonfinite: &nonfinite,
            check_finite,
        };
        let bytes = detach(py, || {
            self.inner.partial_from_sums(&names, t, &x)?.to_bytes()
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// One task: rows `[start, stop)` of tile `t` of `parts` (the plan's layers, named
    /// `names`) under `shift` (:meth:`tile_shift`), returned as the serialised partial sums.
    /// MemoryBudgetError before reading a row when the task's peak exceeds the budget in
    /// force here (`max_memory`, else this machine's).
    ///
    /// :type parts: Sequence[Part]
    /// :type names: Sequence[str]
    /// :type t: int
    /// :type start: int
    /// :type stop: int
    /// :type shift: npt.NDArray[np.float64] | Sequence[float] | None
    /// :type check_finite: bool
    /// :type max_memory: int | None
    /// :type progress: ProgressCallback
    /// :rtype: bytes
    #[pyo3(signature = (parts, names, t, start, stop, shift=None, check_finite=true,
        max_memory=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn run_tile<'py>(
        &self,
        py: Python<'py>,
        parts: Vec<Bound<'py, PyAny>>,
        names: Vec<String>,
        t: usize,
        start: u64,
        stop: u64,
        shift: Option<Vec<f64>>,
        check_finite: bool,
        max_memory: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let budget = Budget::resolve(max_memory).py_err()?;
        let mon = PyMonitor::new(progress);
        let bytes = detach_rows(py, &parts, |src| {
            self.inner
                .run_tile(
                    src,
                    &names,
                    t,
                    start..stop,
                    shift.as_deref(),
                    check_finite,
                    &budget,
                    &mon,
                )?
                .to_bytes()
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __repr__(&self) -> String {
        format!(
            "TilePlan({}, {} tiles, {} layers, peak {} bytes)",
            self.strategy,
            self.inner.tiles.len(),
            self.inner.dims.len(),
            self.inner.peak_bytes
        )
    }
}

/// The partial sums `a` followed by `b` (the next rows of the same tile), serialised: the
/// sums of one task over both ranges. GIL released.
///
/// :type a: bytes
/// :type b: bytes
/// :rtype: bytes
#[pyfunction]
fn merge_partials<'py>(py: Python<'py>, a: &[u8], b: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let out = detach(py, || merge_partial_bytes(a, b))?;
    Ok(PyBytes::new(py, &out))
}

/// The pair statistics of a TilePlan's pass over `n` rows, from each tile's partial sums
/// over all rows (any order of tiles); `finish` once every tile is added.
///
/// :type plan: TilePlan
/// :type names: Sequence[str]
/// :type n: int
#[pyclass(module = "layerscope._native", name = "PairStatsBuilder")]
pub struct PyPairStatsBuilder {
    inner: Consumed<CoreBuilder>,
    plan: CorePlan,
    strategy: &'static str,
}

#[pymethods]
impl PyPairStatsBuilder {
    #[new]
    fn new(plan: PyRef<'_, PyTilePlan>, names: Vec<String>, n: u64) -> PyResult<Self> {
        Ok(PyPairStatsBuilder {
            inner: Consumed::new(
                CoreBuilder::new(&plan.inner, &names, n).py_err()?,
                "this builder has already finished",
            ),
            plan: plan.inner.clone(),
            strategy: plan.strategy,
        })
    }

    /// Add tile `t`'s partial sums over all rows (serialised, as `run_tile` and
    /// `merge_partials` return them).
    ///
    /// :type t: int
    /// :type data: bytes
    /// :rtype: None
    fn add(&mut self, py: Python<'_>, t: usize, data: &[u8]) -> PyResult<()> {
        let b = self.inner.get_mut()?;
        detach(py, || b.add(t, TilePartial::from_bytes(data)?))
    }

    /// Tiles not added yet.
    ///
    /// :rtype: list[int]
    fn missing(&mut self) -> PyResult<Vec<usize>> {
        Ok(self.inner.get_mut()?.missing())
    }

    /// The statistics (an error when a tile is missing).
    ///
    /// :rtype: PairStats
    fn finish(&mut self, py: Python<'_>) -> PyResult<Py<PyPairStats>> {
        let b = self.inner.take()?;
        let st = b.finish().py_err()?;
        PyPairStats::from_tiles(st, &self.plan, self.strategy).into_py(py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTilePlan>()?;
    m.add_class::<PyPairStatsBuilder>()?;
    m.add_function(wrap_pyfunction!(merge_partials, m)?)?;
    Ok(())
}
