//! Progress reporting and cancellation, without any dependency on Python.
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Called from long-running loops. `progress` returns `Err(Error::Interrupted)` (or any
/// error) to stop the work; implementations must be cheap and thread-safe (rayon workers
/// call them).
pub trait Monitor: Sync {
    /// `done` units of `total` are finished (units are rows for passes over a store).
    fn progress(&self, done: u64, total: u64) -> Result<()>;
}

/// A monitor that reports nothing and never interrupts.
pub struct NoMonitor;

impl Monitor for NoMonitor {
    fn progress(&self, _done: u64, _total: u64) -> Result<()> {
        Ok(())
    }
}

/// A monitor driven by a flag (tests, and embedding in other Rust programs).
pub struct FlagMonitor<'a>(pub &'a AtomicBool);

impl Monitor for FlagMonitor<'_> {
    fn progress(&self, _done: u64, _total: u64) -> Result<()> {
        if self.0.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}
