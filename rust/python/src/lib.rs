//! layerscope._native: PyO3 bindings of layerscope-core.
//!
//! This crate only converts types (`convert.rs`), runs core work through one helper that
//! releases the GIL, polls Ctrl-C and maps core errors to the classes of `layerscope.errors`
//! with one `match` (`errors.rs`), and forwards progress (`monitor.rs`). No maths, no loop
//! over layers or pairs, no defaults of its own (the core's constants are exported).
use pyo3::prelude::*;

mod align;
mod calibrate;
mod cka;
mod convert;
mod distributed;
mod errors;
mod machine;
mod memory;
mod moments;
mod monitor;
mod neighbors;
mod pairs;
mod products;
mod source;
mod store;
mod writer;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    store::register(m)?;
    writer::register(m)?;
    moments::register(m)?;
    pairs::register(m)?;
    distributed::register(m)?;
    align::register(m)?;
    cka::register(m)?;
    calibrate::register(m)?;
    memory::register(m)?;
    machine::register(m)?;
    neighbors::register(m)?;
    Ok(())
}
