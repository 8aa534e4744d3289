//! Row sources from Python arguments. Every streaming call takes `parts`: a list whose items
//! are either a store selection `(NativeStore, [layer index, ...])` or in-memory layers
//! `[(array, dtype), ...]` (2-D numpy arrays whose rows are evenly spaced and whose elements
//! are contiguous — row-major arrays and their row/column slices — borrowed, never copied
//! whole; `dtype` is `"F32"`/`"F64"` for float32/float64 arrays and `"F16"`/`"BF16"` for
//! uint16 arrays holding half-precision bit patterns). The parts become the core's
//! [`StoreRows`] / [`ArrayRows`], side by side in one [`Rows`].
use crate::errors::{detach, IntoPy};
use crate::store::NativeStore;
use layerscope_core::store::stream::{ArrayLayer, ArrayRows};
use layerscope_core::store::{DType, RowSource, Rows, StoreRows, Values};
use layerscope_core::Error;
use numpy::PyReadonlyArray2;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// One in-memory layer, borrowed read-only for the duration of the call.
pub enum Array<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Bits(PyReadonlyArray2<'py, u16>, DType),
}

/// One part of a pass, as given by Python.
pub enum Part<'py> {
    Store(Py<NativeStore>, Vec<usize>),
    Arrays(Vec<Array<'py>>),
}

/// Reads `parts` (see the module doc).
pub fn extract_parts<'py>(parts: &[Bound<'py, PyAny>]) -> PyResult<Vec<Part<'py>>> {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if let Ok(t) = p.cast::<PyTuple>() {
                if let Ok((s, l)) = t.extract::<(Py<NativeStore>, Vec<usize>)>() {
                    return Ok(Part::Store(s, l));
                }
            }
            let items: Vec<(Bound<'py, PyAny>, String)> = p.extract().map_err(|_| {
                Error::invalid(format!(
                    "part {i}: expected (NativeStore, [layer index]) or [(array, dtype)]"
                ))
            })?;
            items
                .iter()
                .enumerate()
                .map(|(k, (a, dt))| {
                    array(a, dt).map_err(|e| Error::invalid(format!("part {i}, array {k}: {e}")))
                })
                .collect::<Result<Vec<_>, Error>>()
                .map(Part::Arrays)
        })
        .collect::<Result<Vec<_>, Error>>()
        .py_err()
}

fn array<'py>(a: &Bound<'py, PyAny>, dtype: &str) -> Result<Array<'py>, Error> {
    let bad = |what: &str| Err(Error::invalid(format!("{what} (dtype {dtype:?})")));
    match DType::from_name(dtype) {
        Some(DType::F32) => a
            .extract()
            .map(Array::F32)
            .or_else(|_| bad("expected a 2-D float32 array")),
        Some(DType::F64) => a
            .extract()
            .map(Array::F64)
            .or_else(|_| bad("expected a 2-D float64 array")),
        Some(dt @ (DType::F16 | DType::BF16)) => a
            .extract()
            .map(|v| Array::Bits(v, dt))
            .or_else(|_| bad("expected a 2-D uint16 array of bit patterns")),
        None => bad("unknown dtype"),
    }
}

/// The elements an array's rows span, its row count, width and row stride (elements), when
/// its elements are contiguous within a row and rows are evenly spaced forward.
fn layout<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray2<'_, T>,
) -> Result<(&'a [T], usize, usize, usize), Error> {
    let view = a.as_array();
    let (rows, dim) = view.dim();
    let (s0, s1) = (view.strides()[0], view.strides()[1]);
    let row_stride = if rows <= 1 {
        dim
    } else {
        usize::try_from(s0).unwrap_or(0)
    };
    if (dim > 1 && s1 != 1) || (rows > 1 && row_stride < dim) {
        return Err(Error::invalid(format!(
            "an array of shape ({rows}, {dim}) with element strides ({s0}, {s1}) is not \
             row-major; use np.ascontiguousarray"
        )));
    }
    let len = if rows == 0 || dim == 0 {
        0
    } else {
        (rows - 1) * row_stride + dim
    };
    // SAFETY: the array is borrowed read-only for 'a (numpy's borrow flag is held by `a`);
    // its rows lie at `ptr + r·row_stride` (r < rows), each `dim` contiguous elements, so the
    // `len` elements from `ptr` are inside the array's buffer.
    let data = if len == 0 {
        &[][..]
    } else {
        unsafe { std::slice::from_raw_parts(view.as_ptr(), len) }
    };
    Ok((data, rows, dim, row_stride.max(dim)))
}

/// `f` on `parts` as one row-aligned core source ([`Rows`]), the GIL released ([`detach`]).
pub fn detach_rows<T: Send>(
    py: Python<'_>,
    parts: &[Bound<'_, PyAny>],
    f: impl Send + FnOnce(&Rows<'_>) -> Result<T, Error>,
) -> PyResult<T> {
    let parts = extract_parts(parts)?;
    let sources = Sources::new(&parts)?;
    let src = Rows::new(sources.parts()).py_err()?;
    detach(py, || f(&src))
}

/// The core row source of one part.
enum Source<'a> {
    Store(StoreRows<'a>),
    Arrays(ArrayRows<'a>),
}

/// The core row sources of `parts`, in order (store selections' layer indices checked).
pub struct Sources<'a>(Vec<Source<'a>>);

impl<'a> Sources<'a> {
    pub fn new(parts: &'a [Part<'_>]) -> PyResult<Self> {
        parts
            .iter()
            .map(|p| match p {
                Part::Store(s, l) => StoreRows::new(&s.get().inner, l.clone()).map(Source::Store),
                Part::Arrays(v) => v
                    .iter()
                    .map(array_layer)
                    .collect::<Result<Vec<_>, Error>>()
                    .and_then(ArrayRows::new)
                    .map(Source::Arrays),
            })
            .collect::<Result<Vec<_>, Error>>()
            .map(Sources)
            .py_err()
    }

    /// Every part as a row source, in the order given.
    pub fn parts(&self) -> Vec<&dyn RowSource> {
        self.0
            .iter()
            .map(|s| match s {
                Source::Store(x) => x as &dyn RowSource,
                Source::Arrays(x) => x as &dyn RowSource,
            })
            .collect()
    }
}

/// One borrowed array as a core [`ArrayLayer`].
fn array_layer<'a>(a: &'a Array<'_>) -> Result<ArrayLayer<'a>, Error> {
    match a {
        Array::F32(x) => {
            layout(x).and_then(|(d, r, w, s)| ArrayLayer::new(Values::F32(d), r, w, s))
        }
        Array::F64(x) => {
            layout(x).and_then(|(d, r, w, s)| ArrayLayer::new(Values::F64(d), r, w, s))
        }
        Array::Bits(x, dt) => layout(x).and_then(|(d, r, w, s)| {
            let v = if *dt == DType::F16 {
                Values::F16Bits(d)
            } else {
                Values::BF16Bits(d)
            };
            ArrayLayer::new(v, r, w, s)
        }),
    }
}
