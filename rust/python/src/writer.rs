//! Binding of the activation store's writer: `NativeWriter` (incremental atomic writer). All
//! I/O and conversion runs with the GIL released, so a writer can run in a background Python
//! thread while the main thread runs torch.
use crate::convert::c_slice;
use crate::errors::detach;
use crate::errors::IntoPy;
use crate::monitor::PyMonitor;
use layerscope_core::store::{ArrayData, DType, StoreWriter, Values, WriterOptions};
use layerscope_core::Error;
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

fn parse_dtype(s: &str) -> PyResult<DType> {
    DType::parse(s)
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown dtype {s:?}; expected float16, bfloat16, float32 or float64"
            ))
        })
        .py_err()
}

/// Incremental store writer (see `layerscope.StoreWriter`).
#[pyclass(module = "layerscope._native")]
pub struct NativeWriter {
    inner: Option<StoreWriter>,
}

enum Input<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Bits(PyReadonlyArray2<'py, u16>, bool),
}

#[pymethods]
impl NativeWriter {
    /// Creates the store folder. `dtype`: store dtype name or None (keep input dtypes);
    /// `metadata_json`: a JSON object as a string.
    ///
    /// :type path: str
    /// :type shard_bytes: int
    /// :type overwrite: bool
    /// :type metadata_json: str
    /// :type dtype: str | None
    /// :rtype: NativeWriter
    #[staticmethod]
    #[pyo3(signature = (path, shard_bytes, overwrite, metadata_json, dtype=None))]
    fn create(
        py: Python<'_>,
        path: PathBuf,
        shard_bytes: u64,
        overwrite: bool,
        metadata_json: &str,
        dtype: Option<&str>,
    ) -> PyResult<NativeWriter> {
        let metadata: serde_json::Value = serde_json::from_str(metadata_json)
            .map_err(|e| Error::invalid(format!("metadata is not valid JSON: {e}")))
            .py_err()?;
        let dtype = dtype.map(parse_dtype).transpose()?;
        let opts = WriterOptions {
            shard_bytes,
            overwrite,
            metadata,
            dtype,
        };
        let w = detach(py, || StoreWriter::create(&path, opts))?;
        Ok(NativeWriter { inner: Some(w) })
    }

    /// Appends a batch. `layers`: list of (name, 2-D C-contiguous array, kind) where kind is
    /// "float32"/"float64" (array of that dtype) or "float16"/"bfloat16" (uint16 bit patterns).
    ///
    /// :type layers: Sequence[tuple[str, npt.NDArray[Any], str]]
    /// :type row_ids: npt.NDArray[np.int64] | None
    /// :type columns: Sequence[tuple[str, npt.NDArray[np.int64]]]
    /// :rtype: None
    #[pyo3(signature = (layers, row_ids=None, columns=Vec::new()))]
    fn append<'py>(
        &mut self,
        py: Python<'py>,
        layers: Vec<(String, Bound<'py, PyAny>, String)>,
        row_ids: Option<PyReadonlyArray1<'py, i64>>,
        columns: Vec<(String, PyReadonlyArray1<'py, i64>)>,
    ) -> PyResult<()> {
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| Error::invalid("the writer is closed"))
            .py_err()?;
        let mut inputs = Vec::with_capacity(layers.len());
        for (name, arr, kind) in &layers {
            let inp = match kind.as_str() {
                "float32" => Input::F32(arr.extract()?),
                "float64" => Input::F64(arr.extract()?),
                "float16" => Input::Bits(arr.extract()?, false),
                "bfloat16" => Input::Bits(arr.extract()?, true),
                other => {
                    return Err(Error::invalid(format!(
                        "layer {name:?}: unsupported kind {other:?}"
                    )))
                    .py_err()
                }
            };
            inputs.push((name.as_str(), inp));
        }
        let mut datas = Vec::with_capacity(inputs.len());
        for (name, inp) in &inputs {
            let what = format!("layer {name:?}");
            let (values, shape) = match inp {
                Input::F32(a) => (Values::F32(c_slice(a, &what)?), a.shape()),
                Input::F64(a) => (Values::F64(c_slice(a, &what)?), a.shape()),
                Input::Bits(a, bf) => {
                    let s = c_slice(a, &what)?;
                    (
                        if *bf {
                            Values::BF16Bits(s)
                        } else {
                            Values::F16Bits(s)
                        },
                        a.shape(),
                    )
                }
            };
            datas.push((*name, ArrayData::new(values, shape[0], shape[1])));
        }
        let ids = match &row_ids {
            Some(a) => Some(
                a.as_slice()
                    .map_err(|_| Error::invalid("row_ids must be a contiguous int64 array"))
                    .py_err()?,
            ),
            None => None,
        };
        let mut cols = Vec::with_capacity(columns.len());
        for (n, a) in &columns {
            let s = a
                .as_slice()
                .map_err(|_| {
                    Error::invalid(format!("column {n:?} must be a contiguous int64 array"))
                })
                .py_err()?;
            cols.push((n.as_str(), s));
        }
        // Checks Ctrl-C between shards; an interrupted append leaves the finished shards
        // (see `StoreWriter::append_monitored`).
        let monitor = PyMonitor::new(None);
        detach(py, || w.append_monitored(&datas, ids, &cols, &monitor))
    }

    /// Rows appended so far.
    ///
    /// :rtype: int
    #[getter]
    fn rows_appended(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.rows_appended())
    }

    /// Rows in finished shards.
    ///
    /// :rtype: int
    #[getter]
    fn rows_committed(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.rows_committed())
    }

    /// :rtype: bool
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }

    /// Writes the remaining rows and marks the store complete (``complete=False``: the rows
    /// are kept, the store says it is not all that was meant to be written). Idempotent.
    ///
    /// :type complete: bool
    /// :rtype: None
    #[pyo3(signature = (complete=true))]
    fn finish(&mut self, py: Python<'_>, complete: bool) -> PyResult<()> {
        match self.inner.take() {
            Some(w) => detach(py, || w.finish_as(complete)),
            None => Ok(()),
        }
    }

    /// Closes without writing the buffered rows (the store keeps its finished shards).
    ///
    /// :rtype: None
    fn abort(&mut self) {
        self.inner = None;
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeWriter>()?;
    Ok(())
}
