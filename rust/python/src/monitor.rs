//! A core `Monitor` that stops on the process-wide interrupt request (set by
//! `errors::detach` when Ctrl-C is pressed), checks Python signals when it runs on the main
//! thread, and calls an optional Python progress callback `cb(done, total)`, at most every
//! `interval`, from whatever thread runs.
use layerscope_core::{Error, Monitor};
use pyo3::prelude::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct PyMonitor {
    callback: Option<Py<PyAny>>,
    last: Mutex<Instant>,
    interval: Duration,
}

impl PyMonitor {
    pub fn new(callback: Option<Py<PyAny>>) -> Self {
        PyMonitor {
            callback,
            last: Mutex::new(Instant::now() - Duration::from_secs(1)),
            interval: Duration::from_millis(100),
        }
    }
}

impl Monitor for PyMonitor {
    fn progress(&self, done: u64, total: u64) -> Result<(), Error> {
        // Ctrl-C seen by the waiting caller (see `errors::detach`): no GIL needed
        layerscope_core::monitor::check_interrupt()?;
        {
            let Ok(mut last) = self.last.try_lock() else {
                return Ok(()); // another thread is reporting right now
            };
            if done < total && last.elapsed() < self.interval {
                return Ok(());
            }
            *last = Instant::now();
        }
        Python::attach(|py| {
            if py.check_signals().is_err() {
                return Err(Error::Interrupted);
            }
            if let Some(cb) = &self.callback {
                if let Err(e) = cb.call1(py, (done, total)) {
                    if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                        return Err(Error::Interrupted);
                    }
                    // A broken progress callback must not kill the computation.
                    e.print(py);
                }
            }
            Ok(())
        })
    }
}
