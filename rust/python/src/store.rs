//! Bindings of the activation store's reader: `NativeStore` (validated mmap reader) and
//! `NativeBlocks` (its block iterator); the writer is in `writer.rs`. All I/O and conversion
//! runs with the GIL released.
use crate::convert::c_slice_mut;
use crate::errors::detach;
use crate::errors::to_py;
use crate::errors::IntoPy;
use layerscope_core::store::{stream, Element, OpenOptions, ReadAs, RowSource, Store, StoreRows};
use layerscope_core::Error;
use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PySlice};
use std::path::PathBuf;

/// A zeroed C-ordered `rows × cols` numpy array. Allocated by numpy (not a Rust `Vec`)
/// because numpy asks the kernel for transparent huge pages on large arrays: filling a
/// fresh 1 GB buffer then costs ~500 page faults instead of ~250 000.
/// Made through `numpy.zeros`, so a refused allocation is a MemoryBudgetError (rust-numpy's
/// `PyArray::zeros` would panic on it).
fn alloc_2d<T: numpy::Element>(
    py: Python<'_>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    let np = py.import("numpy")?;
    let dtype = numpy::dtype::<T>(py);
    let arr = np
        .getattr("zeros")?
        .call1(((rows, cols), dtype))
        .map_err(|e| {
            if e.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) {
                to_py(Error::Memory(format!(
                    "could not allocate a {rows} × {cols} array of {} ({}): the system refused \
                 the memory; read fewer rows or layers at a time (block_rows=...)",
                    std::any::type_name::<T>(),
                    layerscope_core::memory::fmt_bytes(
                        rows as u128 * cols as u128 * std::mem::size_of::<T>() as u128
                    )
                )))
            } else {
                e
            }
        })?;
    Ok(arr.cast_into::<PyArray2<T>>()?)
}

/// Fills fresh numpy arrays (one per `dims` entry, `rows` rows each) with `fill`, run with
/// the GIL released.
fn fill_arrays<'py, T, F>(
    py: Python<'py>,
    rows: usize,
    dims: &[usize],
    fill: F,
) -> PyResult<Vec<Bound<'py, PyAny>>>
where
    T: Element + numpy::Element,
    F: FnOnce(&mut [&mut [T]]) -> layerscope_core::Result<()> + Send,
{
    let arrays: Vec<Bound<'py, PyArray2<T>>> = dims
        .iter()
        .map(|&d| alloc_2d::<T>(py, rows, d))
        .collect::<PyResult<_>>()?;
    {
        let mut rws: Vec<_> = arrays.iter().map(|a| a.readwrite()).collect();
        let mut slices = rws
            .iter_mut()
            .map(|rw| {
                rw.as_slice_mut()
                    .map_err(|e| Error::invalid(format!("internal: {e}")))
            })
            .collect::<layerscope_core::Result<Vec<&mut [T]>>>()
            .py_err()?;
        detach(py, || fill(&mut slices))?;
    }
    Ok(arrays.into_iter().map(|a| a.into_any()).collect())
}

/// Runs `fill`, with the GIL released, on the data of caller-owned C-contiguous 2-D arrays
/// of `T` (one per `outs` entry, borrowed read-write while it runs).
fn fill_outs<T: numpy::Element + Send>(
    py: Python<'_>,
    outs: &[Bound<'_, PyAny>],
    fill: impl FnOnce(&mut [&mut [T]]) -> layerscope_core::Result<()> + Send,
) -> PyResult<()> {
    let mut rws = outs
        .iter()
        .map(|o| o.extract::<PyReadwriteArray2<T>>())
        .collect::<PyResult<Vec<_>>>()?;
    let mut slices = rws
        .iter_mut()
        .enumerate()
        .map(|(i, rw)| c_slice_mut(rw, &format!("output array {i}")))
        .collect::<PyResult<Vec<&mut [T]>>>()?;
    detach(py, || fill(&mut slices))
}

/// Layers `idx` of `store` as a row source for the block reader; `release`: drop a block's
/// mapped pages once read.
fn rows_of(store: &Store, idx: Vec<usize>, release: bool) -> PyResult<StoreRows<'_>> {
    let src = StoreRows::new(store, idx).py_err()?;
    Ok(if release { src } else { src.keeping_pages() })
}

fn one<'py>(v: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
    v.into_iter()
        .next()
        .ok_or_else(|| Error::invalid("internal: no array"))
        .py_err()
}

/// Which element type to return: "f32"/"float32" or "f64"/"float64".
fn want_f64(dtype: &str) -> PyResult<bool> {
    match dtype {
        "f32" | "float32" => Ok(false),
        "f64" | "float64" => Ok(true),
        other => Err(Error::invalid(format!(
            "read dtype must be float32 or float64, got {other:?}"
        )))
        .py_err(),
    }
}

/// A validated, memory-mapped activation store.
#[pyclass(module = "layerscope._native", frozen)]
pub struct NativeStore {
    pub(crate) inner: Store,
}

#[pymethods]
impl NativeStore {
    /// Opens and validates a store; with `verify=True` every read first checks the sha256 of
    /// each shard it touches (once per shard, at its first read).
    ///
    /// :type path: str
    /// :type verify: bool
    /// :rtype: NativeStore
    #[staticmethod]
    #[pyo3(signature = (path, verify=false))]
    fn open(py: Python<'_>, path: PathBuf, verify: bool) -> PyResult<NativeStore> {
        let opts = OpenOptions {
            verify_checksums: verify,
        };
        let inner = detach(py, || Store::open_with(&path, opts))?;
        Ok(NativeStore { inner })
    }

    /// Whether reads check the shards' sha256 (opened with `verify=True`).
    ///
    /// :rtype: bool
    #[getter]
    fn verifies_checksums(&self) -> bool {
        self.inner.verifies_checksums()
    }
    /// :rtype: str
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }
    /// :rtype: list[str]
    #[getter]
    fn layers(&self) -> Vec<String> {
        self.inner.layers().iter().map(|l| l.name.clone()).collect()
    }
    /// :rtype: list[int]
    #[getter]
    fn dims(&self) -> Vec<usize> {
        self.inner.layers().iter().map(|l| l.dim).collect()
    }
    /// numpy-style dtype names (`"bfloat16"`, …), in layer order.
    ///
    /// :rtype: list[str]
    #[getter]
    fn dtypes(&self) -> Vec<&'static str> {
        self.inner
            .layers()
            .iter()
            .map(|l| l.dtype.numpy_name())
            .collect()
    }
    /// :rtype: int
    #[getter]
    fn num_rows(&self) -> u64 {
        self.inner.num_rows()
    }
    /// :rtype: list[str]
    #[getter]
    fn columns(&self) -> Vec<String> {
        self.inner.columns().to_vec()
    }
    /// :rtype: bool
    #[getter]
    fn complete(&self) -> bool {
        self.inner.is_complete()
    }
    /// :rtype: int
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }
    /// The free-form metadata object as a JSON string.
    ///
    /// :rtype: str
    #[getter]
    fn metadata_json(&self) -> String {
        self.inner.metadata().to_string()
    }
    /// One dict per shard: file, rows, bytes, sha256, start_row.
    ///
    /// :rtype: list[dict[str, Any]]
    #[getter]
    fn shards<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .shards()
            .iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("file", &s.file)?;
                d.set_item("rows", s.rows)?;
                d.set_item("bytes", s.bytes)?;
                d.set_item("sha256", &s.sha256)?;
                d.set_item("start_row", s.start_row)?;
                Ok(d)
            })
            .collect()
    }

    /// :type name: str
    /// :rtype: int
    fn layer_index(&self, name: &str) -> PyResult<usize> {
        self.inner.layer_index(name).py_err()
    }

    /// :rtype: npt.NDArray[np.int64]
    fn row_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let v = detach(py, || self.inner.row_ids())?;
        Ok(PyArray1::from_vec(py, v))
    }

    /// An optional I64 row column, or None when absent.
    ///
    /// :type name: str
    /// :rtype: npt.NDArray[np.int64] | None
    fn column<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Option<Bound<'py, PyArray1<i64>>>> {
        let v = detach(py, || self.inner.column(name))?;
        Ok(v.map(|v| PyArray1::from_vec(py, v)))
    }

    /// Rows [start, stop) of a layer as a 2-D float32/float64 array.
    ///
    /// :type layer: str
    /// :type start: int
    /// :type stop: int
    /// :type dtype: str
    /// :rtype: npt.NDArray[np.floating[Any]]
    #[pyo3(signature = (layer, start, stop, dtype="float32"))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        layer: &str,
        start: u64,
        stop: u64,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let li = self.inner.layer_index(layer).py_err()?;
        let dim = self.inner.layers()[li].dim;
        let n = self.inner.block_len(li, start, stop).py_err()?;
        let rows = n / dim;
        let store = &self.inner;
        if want_f64(dtype)? {
            one(fill_arrays::<f64, _>(py, rows, &[dim], |o| {
                store.read_block_into(&[li], start, stop, o)
            })?)
        } else {
            one(fill_arrays::<f32, _>(py, rows, &[dim], |o| {
                store.read_block_into(&[li], start, stop, o)
            })?)
        }
    }

    /// The rows at `indices` (int64, each in [0, num_rows)) of a layer, as a 2-D array.
    ///
    /// :type layer: str
    /// :type indices: npt.NDArray[np.int64]
    /// :type dtype: str
    /// :rtype: npt.NDArray[np.floating[Any]]
    #[pyo3(signature = (layer, indices, dtype="float64"))]
    fn take<'py>(
        &self,
        py: Python<'py>,
        layer: &str,
        indices: PyReadonlyArray1<'py, i64>,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let li = self.inner.layer_index(layer).py_err()?;
        let dim = self.inner.layers()[li].dim;
        let idx = indices.as_array();
        let mut rows = Vec::with_capacity(idx.len());
        for &i in idx.iter() {
            let r = u64::try_from(i)
                .map_err(|_| Error::invalid(format!("negative row index {i}")))
                .py_err()?;
            rows.push(r);
        }
        let n = rows.len();
        let store = &self.inner;
        let take_one = |o: &mut [&mut [f64]]| match o {
            [o] => store.take_into(li, &rows, o),
            _ => Err(Error::invalid("internal: one buffer expected")),
        };
        if want_f64(dtype)? {
            one(fill_arrays::<f64, _>(py, n, &[dim], take_one)?)
        } else {
            one(fill_arrays::<f32, _>(py, n, &[dim], |o| match o {
                [o] => store.take_into(li, &rows, o),
                _ => Err(Error::invalid("internal: one buffer expected")),
            })?)
        }
    }

    /// An iterator of `(start, {layer: block})` over all rows, `block_rows` at a time (the
    /// last block may be shorter), of `layers` (names, any order; a repeated name appears
    /// once in each dict), read by the core's block reader (`store::stream::read_into`).
    /// `dtype`: float32 or float64; `release`: drop each block's mapped pages once read;
    /// `reuse`: refill one buffer per layer (blocks are views of it) instead of fresh arrays
    /// (fresh arrays the caller has dropped are refilled too, at most two per layer).
    ///
    /// :type layers: list[str]
    /// :type block_rows: int
    /// :type dtype: str
    /// :type release: bool
    /// :type reuse: bool
    /// :rtype: NativeBlocks
    #[pyo3(signature = (layers, block_rows, dtype="float32", release=true, reuse=false))]
    fn blocks(
        slf: &Bound<'_, Self>,
        layers: Vec<String>,
        block_rows: u64,
        dtype: &str,
        release: bool,
        reuse: bool,
    ) -> PyResult<NativeBlocks> {
        let me = slf.get();
        if block_rows == 0 {
            return Err(Error::invalid("block_rows must be at least 1")).py_err();
        }
        let idx = layers
            .iter()
            .map(|n| me.inner.layer_index(n))
            .collect::<layerscope_core::Result<Vec<_>>>()
            .py_err()?;
        Ok(NativeBlocks {
            store: slf.clone().unbind(),
            names: layers,
            layers: idx,
            block_rows,
            next: 0,
            f64: want_f64(dtype)?,
            release,
            reuse,
            bufs: None,
            pool: Vec::new(),
        })
    }

    /// Rows [start, stop) of several layers (any subset, in the given order) as a list of
    /// 2-D arrays, read in parallel. `release=True` then drops the mapped pages of those rows
    /// from the resident set (streaming readers keep a bounded RSS; see `Store::release`).
    ///
    /// :type layers: list[str]
    /// :type start: int
    /// :type stop: int
    /// :type dtype: str
    /// :type release: bool
    /// :rtype: list[npt.NDArray[np.floating[Any]]]
    #[pyo3(signature = (layers, start, stop, dtype="float32", release=false))]
    fn read_block<'py>(
        &self,
        py: Python<'py>,
        layers: Vec<String>,
        start: u64,
        stop: u64,
        dtype: &str,
        release: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let idx = layers
            .iter()
            .map(|name| self.inner.layer_index(name))
            .collect::<layerscope_core::Result<Vec<_>>>()
            .py_err()?;
        let rows = match idx.first() {
            Some(&l) => self.inner.block_len(l, start, stop).py_err()? / self.inner.layers()[l].dim,
            None => 0,
        };
        let src = rows_of(&self.inner, idx, release)?;
        let dims = src.dims();
        if want_f64(dtype)? {
            fill_arrays::<f64, _>(py, rows, &dims, |o| stream::read_into(&src, start, stop, o))
        } else {
            fill_arrays::<f32, _>(py, rows, &dims, |o| stream::read_into(&src, start, stop, o))
        }
    }

    /// Rows [start, stop) of several layers into caller-owned C-contiguous 2-D arrays (one
    /// per layer, all float32 or all float64, each exactly `(stop - start) × dim`): the
    /// buffer-reusing form of `read_block` (no allocation, no page faults on fresh memory).
    ///
    /// :type layers: list[str]
    /// :type start: int
    /// :type stop: int
    /// :type outs: list[npt.NDArray[np.floating[Any]]]
    /// :type release: bool
    /// :rtype: None
    #[pyo3(signature = (layers, start, stop, outs, release=false))]
    fn read_block_into(
        &self,
        py: Python<'_>,
        layers: Vec<String>,
        start: u64,
        stop: u64,
        outs: Vec<Bound<'_, PyAny>>,
        release: bool,
    ) -> PyResult<()> {
        layerscope_core::error::check_outs(outs.len(), layers.len(), "layers").py_err()?;
        let mut idx = Vec::with_capacity(layers.len());
        for name in &layers {
            idx.push(self.inner.layer_index(name).py_err()?);
        }
        let src = rows_of(&self.inner, idx, release)?;
        if outs.iter().all(|o| o.cast::<PyArray2<f32>>().is_ok()) {
            fill_outs::<f32>(py, &outs, |o| stream::read_into(&src, start, stop, o))
        } else if outs.iter().all(|o| o.cast::<PyArray2<f64>>().is_ok()) {
            fill_outs::<f64>(py, &outs, |o| stream::read_into(&src, start, stop, o))
        } else {
            Err(Error::invalid(
                "outs must be 2-D float32 arrays or 2-D float64 arrays (all the same dtype)",
            ))
            .py_err()
        }
    }

    /// Drop the mapped pages of rows [start, stop) from the resident set (data stays
    /// readable; a later read maps it again from the OS page cache).
    ///
    /// :type start: int
    /// :type stop: int
    /// :rtype: None
    fn release(&self, py: Python<'_>, start: u64, stop: u64) -> PyResult<()> {
        detach(py, || self.inner.release(start, stop))
    }

    /// First row of `layer` holding NaN/±Inf, or None.
    ///
    /// :type layer: str
    /// :rtype: int | None
    fn find_nonfinite(&self, py: Python<'_>, layer: &str) -> PyResult<Option<u64>> {
        let li = self.inner.layer_index(layer).py_err()?;
        detach(py, || self.inner.find_nonfinite(li))
    }

    /// Recompute every shard's sha256 and compare with the manifest (MismatchError if not).
    ///
    /// :rtype: None
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        detach(py, || self.inner.verify())
    }
}

/// The iterator of `NativeStore.blocks` (see there): one block read per `__next__`, GIL
/// released while reading.
///
/// :rtype __iter__: NativeBlocks
/// :rtype __next__: tuple[int, dict[str, npt.NDArray[np.floating[Any]]]]
#[pyclass(module = "layerscope._native")]
pub struct NativeBlocks {
    store: Py<NativeStore>,
    names: Vec<String>,
    layers: Vec<usize>,
    block_rows: u64,
    next: u64,
    f64: bool,
    release: bool,
    reuse: bool,
    /// With `reuse`: one full-size buffer per layer, allocated at the first block.
    bufs: Option<Vec<Py<PyAny>>>,
    /// Without `reuse`: the full-size arrays handed out so far, at most [`POOL`] per layer.
    /// One whose only reference is this pool (the caller dropped it, and no view, buffer
    /// or container of it lives, so nobody can see it change) is refilled and handed out
    /// again instead of a new one: its pages are mapped already, where a new array's
    /// first write page-faults every page (the kernel zeroing each: 0.3× the speed of an
    /// in-memory copy).
    pool: Vec<Vec<Py<PyAny>>>,
}

/// Arrays kept per layer for refilling: the block being filled and the one the caller
/// holds while asking for the next (what `ActivationStore.blocks` budgets for).
const POOL: usize = 2;

impl NativeBlocks {
    fn read<'py, T: ReadAs + numpy::Element>(
        &mut self,
        py: Python<'py>,
        start: u64,
        stop: u64,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let store = self.store.get();
        let src = rows_of(&store.inner, self.layers.clone(), self.release)?;
        let dims = src.dims();
        let rows = (stop - start) as usize;
        if !self.reuse {
            if rows as u64 != self.block_rows {
                // the last, shorter block: new arrays
                return fill_arrays::<T, _>(py, rows, &dims, |o| {
                    stream::read_into(&src, start, stop, o)
                });
            }
            if self.pool.len() != dims.len() {
                self.pool = dims.iter().map(|_| Vec::new()).collect();
            }
            let mut arrays = Vec::with_capacity(dims.len());
            for (pool, &d) in self.pool.iter_mut().zip(&dims) {
                let free = pool.iter().find(|a| reusable::<T>(py, a, rows, d));
                let a = match free {
                    Some(a) => a.bind(py).clone(),
                    None => {
                        let a = alloc_2d::<T>(py, rows, d)?.into_any();
                        if pool.len() < POOL {
                            pool.push(a.clone().unbind());
                        }
                        a
                    }
                };
                arrays.push(a);
            }
            fill_outs::<T>(py, &arrays, |o| stream::read_into(&src, start, stop, o))?;
            return Ok(arrays);
        }
        if self.bufs.is_none() {
            let first = self.block_rows.min(store.inner.num_rows()) as usize;
            let bufs = dims
                .iter()
                .map(|&d| alloc_2d::<T>(py, first, d).map(|a| a.into_any().unbind()))
                .collect::<PyResult<Vec<_>>>()?;
            self.bufs = Some(bufs);
        }
        let views = self
            .bufs
            .iter()
            .flatten()
            .map(|b| b.bind(py).get_item(PySlice::new(py, 0, rows as isize, 1)))
            .collect::<PyResult<Vec<_>>>()?;
        fill_outs::<T>(py, &views, |o| stream::read_into(&src, start, stop, o))?;
        Ok(views)
    }
}

/// Whether a pooled array can be refilled: the pool holds its only reference, and it is
/// still a writeable C-contiguous `rows × d` array of `T` (a caller may have changed its
/// flags before dropping it).
fn reusable<T: numpy::Element>(py: Python<'_>, a: &Py<PyAny>, rows: usize, d: usize) -> bool {
    // SAFETY: reading the reference count of a live object (the GIL is held).
    if unsafe { pyo3::ffi::Py_REFCNT(a.as_ptr()) } != 1 {
        return false;
    }
    match a.bind(py).cast::<PyArray2<T>>() {
        Ok(arr) => arr.is_contiguous() && arr.shape() == [rows, d] && arr.try_readwrite().is_ok(),
        Err(_) => false,
    }
}

#[pymethods]
impl NativeBlocks {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<(u64, Bound<'py, PyDict>)>> {
        let n = self.store.get().inner.num_rows();
        if self.next >= n {
            return Ok(None);
        }
        let start = self.next;
        let stop = start.saturating_add(self.block_rows).min(n);
        let arrays = if self.f64 {
            self.read::<f64>(py, start, stop)?
        } else {
            self.read::<f32>(py, start, stop)?
        };
        self.next = stop;
        let d = PyDict::new(py);
        for (name, a) in self.names.iter().zip(arrays) {
            d.set_item(name, a)?;
        }
        Ok(Some((start, d)))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeStore>()?;
    m.add_class::<NativeBlocks>()?;
    Ok(())
}
