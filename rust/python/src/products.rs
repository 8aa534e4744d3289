//! A core `Products` (the products behind the neighbour measures,
//! `layerscope_core::engine::neighbors::Products`) computed by a Python object — the torch
//! device engine's `layerscope._device.products.DeviceProducts` — so that everything made of them
//! (bounds, exact rechecks, bandwidths, kernels, RDMs) stays in the core. Only conversion:
//! slices to numpy arrays and back, under the GIL; a Python exception raised by the object is
//! kept and raised again, unchanged, when the call returns ([`PyProducts::raise`]).
use layerscope_core::engine::neighbors::{GramRows, GramSink, Products, RowMajor};
use layerscope_core::Error;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use rayon::prelude::*;
use std::sync::Mutex;

pub struct PyProducts {
    obj: Py<PyAny>,
    err: Mutex<Option<PyErr>>,
}

impl PyProducts {
    pub fn new(obj: Py<PyAny>) -> Self {
        PyProducts {
            obj,
            err: Mutex::new(None),
        }
    }

    /// The Python exception the object raised during the call, if any (else `e` as it is).
    pub fn raise(&self, e: PyErr) -> PyErr {
        match self.err.lock().ok().and_then(|mut g| g.take()) {
            Some(kept) => kept,
            None => e,
        }
    }

    fn keep(&self, e: PyErr, what: &str) -> Error {
        let msg = format!("the device's {what} failed: {e}");
        if let Ok(mut g) = self.err.lock() {
            g.get_or_insert(e);
        }
        Error::invalid(msg)
    }

    fn call_f64(&self, method: &str, x: RowMajor<'_, f64>, want: usize) -> Result<Vec<f64>, Error> {
        let RowMajor { x, m, d } = x;
        Python::attach(|py| -> PyResult<Vec<f64>> {
            let arr = PyArray1::from_slice(py, x).reshape([m, d])?;
            let out = self.obj.call_method1(py, method, (arr,))?;
            let out = out.bind(py);
            let v: Vec<f64> = if let Ok(a) = out.extract::<PyReadonlyArray2<'_, f64>>() {
                a.as_slice()?.to_vec()
            } else {
                out.extract::<PyReadonlyArray1<'_, f64>>()?
                    .as_slice()?
                    .to_vec()
            };
            Ok(v)
        })
        .map_err(|e| self.keep(e, method))
        .and_then(|v| {
            if v.len() == want {
                Ok(v)
            } else {
                Err(Error::Mismatch(format!(
                    "the device's {method} returned {} values, expected {want}",
                    v.len()
                )))
            }
        })
    }
}

impl Products for PyProducts {
    fn gram_f64(&self, x: RowMajor<'_, f64>) -> Result<Vec<f64>, Error> {
        self.call_f64("gram_f64", x, x.m * x.m)
    }

    fn f32_gram_blocks(
        &self,
        x: RowMajor<'_, f32>,
        block: usize,
        each: &GramSink,
    ) -> Result<(), Error> {
        let RowMajor { x, m, d } = x;
        Python::attach(|py| -> Result<(), Error> {
            let start = || -> PyResult<Bound<'_, PyAny>> {
                let arr = PyArray1::from_slice(py, x).reshape([m, d])?;
                Ok(self
                    .obj
                    .call_method1(py, "f32_gram_blocks", (arr, block))?
                    .into_bound(py)
                    .try_iter()?
                    .into_any())
            };
            let it = start().map_err(|e| self.keep(e, "f32_gram_blocks"))?;
            let it = it.try_iter().map_err(|e| self.keep(e, "f32_gram_blocks"))?;
            for item in it {
                let (r0, rows) = item
                    .and_then(|t| {
                        let (r0, a): (usize, PyReadonlyArray2<'_, f32>) = t.extract()?;
                        Ok((r0, a.as_slice()?.to_vec()))
                    })
                    .map_err(|e| self.keep(e, "f32_gram_blocks"))?;
                // the object may hand several blocks at once: the core's selection runs
                // on them in parallel, block by block, without the GIL
                let chunk = block.max(1) * m.max(1);
                py.detach(|| {
                    rows.par_chunks(chunk)
                        .enumerate()
                        .try_for_each(|(b, g)| each(r0 + b * block.max(1), GramRows::F32(g)))
                })?;
            }
            Ok(())
        })
    }

    fn exact_condensed_sq(&self, x: RowMajor<'_, f64>) -> Result<Vec<f64>, Error> {
        self.call_f64("exact_condensed_sq", x, x.m * x.m.saturating_sub(1) / 2)
    }
}
