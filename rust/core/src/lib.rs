//! layerscope-core: the pure-Rust core of layerscope (no pyo3 here).
//!
//! * [`store`]: the activation store (safetensors shards + JSON manifest): validated mmap
//!   reader, row-block iterator, atomic writer.
//! * [`engine::moments`]: one streaming pass over all rows accumulating `ZᵀZ` of the
//!   concatenated (shifted) layers — exact linear measures for all layer pairs.
//! * [`engine::neighbors`]: exact blocked distances / kNN on a seeded sample of rows.
//! * [`measures`]: estimators built on the two engines (CKA, spectra, alignment, ID, RSA).
//! * [`memory`]: the byte budget every engine checks first, and fallible allocation.
//!
//! Every long-running entry point takes a [`monitor::Monitor`] so that callers (the Python
//! binding) can show progress and interrupt the work (Ctrl-C) without the core knowing Python.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod engine;
pub mod error;
pub mod linalg;
pub mod measures;
pub mod memory;
pub mod monitor;
pub mod store;
#[cfg(test)]
mod testdata;

pub use error::{Error, Result};
pub use monitor::{Monitor, NoMonitor};
