//! Bindings of the minibatch CKA estimators (layerscope-core `measures::cka`).
use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
