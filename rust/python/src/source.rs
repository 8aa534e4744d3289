//! Row sources from Python arguments: the `[(NativeStore, [layer index, ...]), ...]` selections
//! that every streaming call takes, as the core's [`StoreRows`] (one per store; put side by
//! side with [`layerscope_core::store::Rows`]).
use crate::convert::IntoPy;
use crate::store::NativeStore;
use layerscope_core::store::StoreRows;
use pyo3::prelude::*;

/// One [`StoreRows`] per selection, every layer index checked.
pub fn store_rows(selections: &[(Py<NativeStore>, Vec<usize>)]) -> PyResult<Vec<StoreRows<'_>>> {
    selections
        .iter()
        .map(|(s, l)| StoreRows::new(&s.get().inner, l.clone()).py_err())
        .collect()
}
