//! Bindings of the machine's facts the benchmarks print (layerscope-core
//! `linalg::roofline`, `linalg::packed::simd_kernel`).
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The FMA roofline, measured (about 0.1 s, GIL released): `kernel` (the packed kernels'
/// ISA), `cores`, `clock_ghz` (a chain of dependent adds), `lanes_f32`, `fma_per_cycle`
/// (measured, per core), `fma_units`, `peak_f32_gflops` = cores × clock × units × lanes × 2
/// (`peak_f64_gflops` half of it) and `fma_test_gflops` (the register-only test's own rate).
///
/// :rtype: dict[str, Any]
#[pyfunction]
fn roofline(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let r = py.detach(layerscope_core::linalg::roofline::measure);
    let d = PyDict::new(py);
    d.set_item("kernel", r.kernel)?;
    d.set_item("cores", r.cores)?;
    d.set_item("clock_ghz", r.clock_hz / 1e9)?;
    d.set_item("lanes_f32", r.lanes_f32)?;
    d.set_item("fma_per_cycle", r.fma_per_cycle)?;
    d.set_item("fma_units", r.fma_units)?;
    d.set_item("peak_f32_gflops", r.peak_f32 / 1e9)?;
    d.set_item("peak_f64_gflops", r.peak_f32 / 2e9)?;
    d.set_item("fma_test_gflops", r.measured_f32 / 1e9)?;
    Ok(d)
}

/// The micro-kernel of the packed products on this CPU: "avx512", "avx2+fma" or "portable".
///
/// :rtype: str
#[pyfunction]
fn simd_kernel() -> &'static str {
    layerscope_core::linalg::packed::simd_kernel()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(roofline, m)?)?;
    m.add_function(wrap_pyfunction!(simd_kernel, m)?)?;
    Ok(())
}
