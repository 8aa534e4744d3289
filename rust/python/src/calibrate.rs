//! Binding of calibrated CKA (layerscope-core `measures::cka::calibrate`): layers added one
//! at a time (their sampled rows can be dropped once added), then the observed table, the
//! permutation null and bootstrap resamples over index arrays drawn by the caller. Only type
//! conversion here; the work runs in the core with the GIL released.
use crate::convert::array2;
use crate::convert::c_slice;
use crate::errors::{detach, IntoPy};
use crate::monitor::PyMonitor;
use crate::products::PyProducts;
use layerscope_core::engine::neighbors::{Cpu, Products};
use layerscope_core::measures::cka::calibrate::{
    calibration_bytes as core_bytes, CalKernel, CalLayer, Calibrator,
};
use layerscope_core::memory::Budget;
use layerscope_core::Error;
use numpy::ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

fn kernel_of(kernel: &str, sigma: f64) -> PyResult<CalKernel> {
    let kernels = [
        ("linear", CalKernel::Linear),
        ("rbf", CalKernel::Rbf { sigma }),
    ];
    layerscope_core::error::choice("kernel", kernel, &kernels).py_err()
}

/// Peak bytes of a calibration over `layers` layers of `m` rows, the widest `dmax` wide
/// (every layer's Gram, the centred stack, one permuted Gram, one layer's preparation).
///
/// :type layers: int
/// :type m: int
/// :type dmax: int
/// :type kernel: str
/// :rtype: int
#[pyfunction]
fn calibration_bytes(layers: usize, m: usize, dmax: usize, kernel: &str) -> PyResult<u128> {
    Ok(core_bytes(layers, m, dmax, kernel_of(kernel, 1.0)?))
}

/// Calibrated CKA on one sample: ``add`` each layer's sampled rows (a's, then b's), then
/// ``observed``, ``null`` and ``bootstrap``. ``within``: the pairs within a (no b).
///
/// :type kernel: str
/// :type sigma: float
/// :type unbiased: bool
/// :type within: bool
/// :type max_memory: int | None
#[pyclass(module = "layerscope._native", name = "Calibrator")]
pub struct PyCalibrator {
    kernel: CalKernel,
    unbiased: bool,
    within: bool,
    budget: Budget,
    layers: Vec<CalLayer>,
    la: usize,
    inner: Option<Calibrator>,
}

impl PyCalibrator {
    fn started(&mut self) -> PyResult<&mut Calibrator> {
        if self.inner.is_none() {
            let layers = std::mem::take(&mut self.layers);
            let la = if self.within { layers.len() } else { self.la };
            let c =
                Calibrator::new(layers, la, self.within, self.unbiased, &self.budget).py_err()?;
            self.inner = Some(c);
        }
        Ok(self.inner.as_mut().expect("set above"))
    }
}

#[pymethods]
impl PyCalibrator {
    #[new]
    #[pyo3(signature = (kernel="linear", sigma=1.0, unbiased=false, within=true, max_memory=None))]
    fn new(
        kernel: &str,
        sigma: f64,
        unbiased: bool,
        within: bool,
        max_memory: Option<u64>,
    ) -> PyResult<Self> {
        Ok(PyCalibrator {
            kernel: kernel_of(kernel, sigma)?,
            unbiased,
            within,
            budget: Budget::resolve(max_memory).py_err()?,
            layers: Vec::new(),
            la: 0,
            inner: None,
        })
    }

    /// Add one layer's sampled rows (C-contiguous float64, ``m × d``): to a (``other``
    /// False) or to b. All of a's layers come before b's. ``products``: the device products
    /// (:mod:`layerscope._device`) for its Gram, else the CPU.
    ///
    /// :type x: npt.NDArray[np.float64]
    /// :type other: bool
    /// :type products: Any | None
    /// :rtype: None
    #[pyo3(signature = (x, other=false, products=None))]
    fn add(
        &mut self,
        py: Python<'_>,
        x: PyReadonlyArray2<'_, f64>,
        other: bool,
        products: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        if self.inner.is_some() {
            return Err(Error::invalid("layers are added before the first table")).py_err();
        }
        if other && self.within {
            return Err(Error::invalid(
                "other=True on a calibration within one source",
            ))
            .py_err();
        }
        if !other && self.layers.len() > self.la {
            return Err(Error::invalid("a's layers come before b's")).py_err();
        }
        let (m, d) = (x.shape()[0], x.shape()[1]);
        let s = c_slice(&x, "x")?;
        let prod = products.map(PyProducts::new);
        let (kernel, budget) = (self.kernel, &self.budget);
        let layer = detach(py, || {
            let p: &dyn Products = prod.as_ref().map_or(&Cpu, |p| p as &dyn Products);
            CalLayer::prepare_with(s, m, d, kernel, budget, p)
        })
        .map_err(|e| match &prod {
            Some(p) => p.raise(e),
            None => e,
        })?;
        self.layers.push(layer);
        if !other {
            self.la += 1;
        }
        Ok(())
    }

    /// The RBF bandwidth of every layer on the whole sample (a's then b's; NaN for linear).
    ///
    /// :rtype: list[float]
    #[getter]
    fn bandwidths(&self) -> Vec<f64> {
        match &self.inner {
            Some(c) => c.bandwidths(),
            None => self.layers.iter().map(|l| l.bandwidth()).collect(),
        }
    }

    /// Permuted Grams held at once by ``null`` (0 before the first table).
    ///
    /// :rtype: int
    #[getter]
    fn chunk(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| c.chunk())
    }

    /// The CKA of every pair on the whole sample (``la × lb``).
    ///
    /// :rtype: npt.NDArray[np.float64]
    fn observed<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let c = self.started()?;
        let (la, lb) = c.shape();
        let v = detach(py, || c.observed())?;
        array2(py, (la, lb), v)
    }

    /// The CKA of every pair under each permutation (``perms``: ``count × m`` uint32, each
    /// row a permutation of ``0..m``): ``count × la × lb``.
    ///
    /// :type perms: npt.NDArray[np.uint32]
    /// :rtype: npt.NDArray[np.float64]
    fn null<'py>(
        &mut self,
        py: Python<'py>,
        perms: PyReadonlyArray2<'_, u32>,
    ) -> PyResult<Bound<'py, PyArray3<f64>>> {
        let count = perms.shape()[0];
        let s = c_slice(&perms, "perms")?;
        let c = self.started()?;
        let (la, lb) = c.shape();
        let mon = PyMonitor::new(None);
        let v = detach(py, || c.null(s, &mon))?;
        Array3::from_shape_vec((count, la, lb), v)
            .map_err(|e| Error::invalid(format!("internal shape error: {e}")))
            .py_err()
            .map(|a| a.into_pyarray(py))
    }

    /// The CKA of every pair on each resample (``resamples``: ``count × m`` uint32 row
    /// indices drawn with replacement): ``(values count × la × lb, bandwidths count ×
    /// layers)`` (the RBF bandwidths of each resample; NaN for linear or where the median
    /// distance is 0, whose cells are NaN).
    ///
    /// :type resamples: npt.NDArray[np.uint32]
    /// :rtype: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]
    #[allow(clippy::type_complexity)]
    fn bootstrap<'py>(
        &mut self,
        py: Python<'py>,
        resamples: PyReadonlyArray2<'_, u32>,
    ) -> PyResult<(Bound<'py, PyArray3<f64>>, Bound<'py, PyArray2<f64>>)> {
        let count = resamples.shape()[0];
        let s = c_slice(&resamples, "resamples")?;
        let c = self.started()?;
        let (la, lb) = c.shape();
        let nl = c.bandwidths().len();
        let mon = PyMonitor::new(None);
        let (v, bw) = detach(py, || c.bootstrap(s, &mon))?;
        let shape_err =
            |e: numpy::ndarray::ShapeError| Error::invalid(format!("internal shape error: {e}"));
        let v = Array3::from_shape_vec((count, la, lb), v)
            .map_err(shape_err)
            .py_err()?;
        let bw = Array2::from_shape_vec((count, nl), bw)
            .map_err(shape_err)
            .py_err()?;
        Ok((v.into_pyarray(py), bw.into_pyarray(py)))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCalibrator>()?;
    m.add_function(wrap_pyfunction!(calibration_bytes, m)?)?;
    Ok(())
}
