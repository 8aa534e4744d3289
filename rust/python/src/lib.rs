//! layerscope._native: PyO3 bindings of layerscope-core.
//!
//! This crate only converts types, releases the GIL around all heavy work, maps core errors
//! to the Python exception classes of `layerscope.errors`, and forwards progress/Ctrl-C.
//! No maths lives here.
use pyo3::prelude::*;

mod align;
mod cka;
mod convert;
mod memory;
mod moments;
mod monitor;
mod neighbors;
mod source;
mod store;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    store::register(m)?;
    moments::register(m)?;
    align::register(m)?;
    cka::register(m)?;
    memory::register(m)?;
    neighbors::register(m)?;
    Ok(())
}
