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

/// A monitor that reports nothing; it stops the work only on a process-wide interrupt
/// request ([`request_interrupt`]).
pub struct NoMonitor;

impl Monitor for NoMonitor {
    fn progress(&self, _done: u64, _total: u64) -> Result<()> {
        check_interrupt()
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

/// The process-wide interrupt request (Ctrl-C): set by an embedding (the Python binding sets
/// it when the user presses Ctrl-C during a call), checked by every [`Monitor`]-driven loop
/// through its monitor and by the long loops that have no monitor (distance matrices, rank
/// transforms) through [`check_interrupt`], so that work stops within about a block.
static INTERRUPT: AtomicBool = AtomicBool::new(false);

/// Ask every running computation of this process to stop with [`Error::Interrupted`].
pub fn request_interrupt() {
    INTERRUPT.store(true, Ordering::SeqCst);
}

/// Withdraw the request (after the interrupted work has returned).
pub fn clear_interrupt() {
    INTERRUPT.store(false, Ordering::SeqCst);
}

/// Whether an interrupt was requested.
pub fn interrupt_requested() -> bool {
    INTERRUPT.load(Ordering::Relaxed)
}

/// `Err(Error::Interrupted)` when an interrupt was requested (one relaxed atomic load).
pub fn check_interrupt() -> Result<()> {
    if interrupt_requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// While alive, SIGINT also requests an interrupt ([`request_interrupt`]) before it runs the
/// handler that was installed (the embedding's: Python's C-level handler, which records the
/// signal for the interpreter): work running under it stops within a block of a Ctrl-C,
/// whichever thread runs it, without waiting for the main thread to look. Dropping it puts
/// the previous handler back and withdraws the request.
///
/// [`SigintGuard::install`] returns `None` (nothing changed) when SIGINT is ignored or has
/// the default action (the process would end anyway) or a three-argument handler, and off
/// Unix. One guard at a time: take it on the main thread, around a call that is not nested
/// in another guarded call.
pub struct SigintGuard {
    #[cfg(unix)]
    old: libc::sigaction,
}

/// The handler that was installed when the guard was taken (`sa_handler` as an address).
#[cfg(unix)]
static CHAINED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(unix)]
extern "C" fn on_sigint(sig: libc::c_int) {
    // async-signal-safe: atomic stores and loads, then the previous handler
    request_interrupt();
    let h = CHAINED.load(Ordering::SeqCst);
    if h != 0 && h != libc::SIG_DFL && h != libc::SIG_IGN {
        // SAFETY: `h` is the one-argument handler read from sigaction() when the guard was
        // installed (SA_SIGINFO handlers are never chained), still valid: the guard that
        // put `on_sigint` in its place restores it before anything else can change it.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

impl SigintGuard {
    /// See [`SigintGuard`].
    pub fn install() -> Option<SigintGuard> {
        #[cfg(unix)]
        {
            // SAFETY: plain sigaction() calls on zeroed/copied structs; the new handler only
            // does async-signal-safe work (see `on_sigint`).
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old) != 0 {
                    return None;
                }
                let h = old.sa_sigaction;
                if h == libc::SIG_DFL || h == libc::SIG_IGN || old.sa_flags & libc::SA_SIGINFO != 0
                {
                    return None;
                }
                CHAINED.store(h, Ordering::SeqCst);
                let mut new = old;
                new.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
                if libc::sigaction(libc::SIGINT, &new, std::ptr::null_mut()) != 0 {
                    return None;
                }
                Some(SigintGuard { old })
            }
        }
        #[cfg(not(unix))]
        None
    }
}

impl Drop for SigintGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: restores the handler read in `install`.
        unsafe {
            libc::sigaction(libc::SIGINT, &self.old, std::ptr::null_mut());
        }
        clear_interrupt();
    }
}
