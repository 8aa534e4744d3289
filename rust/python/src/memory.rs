//! Bindings of the memory budget (layerscope-core `memory`): the budget in force and its
//! source, and the size-string parser behind `max_memory=` and `LAYERSCOPE_MAX_MEMORY`.
use crate::errors::IntoPy;
use layerscope_core::memory::{self, Budget};
use pyo3::prelude::*;

/// `(bytes, source)` of the budget in force: `max_memory` if given, else
/// `LAYERSCOPE_MAX_MEMORY`, else the machine's (`BUDGET_FRACTION` of the smallest of
/// MemAvailable, the cgroup limit and the RLIMIT_AS headroom).
///
/// :type max_memory: int | None
/// :rtype: tuple[int, str]
#[pyfunction]
#[pyo3(signature = (max_memory=None))]
fn memory_budget(max_memory: Option<u64>) -> PyResult<(u64, String)> {
    let b = Budget::resolve(max_memory).py_err()?;
    Ok((b.bytes, b.source))
}

/// Bytes of a size string ("512M", "4G", "1.5GiB", "800MB", "4096"); InvalidArgumentError
/// listing the accepted forms otherwise.
///
/// :type text: str
/// :rtype: int
#[pyfunction]
fn parse_memory_size(text: &str) -> PyResult<u64> {
    memory::parse_size(text).py_err()
}

/// Raise MemoryBudgetError ("`what` needs N, above the budget of B (source); `advice`")
/// when `need` bytes exceed the budget in force.
///
/// :type need: int
/// :type what: str
/// :type advice: str
/// :type max_memory: int | None
/// :rtype: None
#[pyfunction]
#[pyo3(signature = (need, what, advice, max_memory=None))]
fn check_budget(need: u128, what: &str, advice: &str, max_memory: Option<u64>) -> PyResult<()> {
    Budget::resolve(max_memory)
        .and_then(|b| b.check(need, what, advice))
        .py_err()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(memory_budget, m)?)?;
    m.add_function(wrap_pyfunction!(parse_memory_size, m)?)?;
    m.add_function(wrap_pyfunction!(check_budget, m)?)?;
    m.add("MEMORY_BUDGET_FRACTION", memory::BUDGET_FRACTION)?;
    m.add("MEMORY_ENV_VAR", memory::ENV_VAR)?;
    Ok(())
}
