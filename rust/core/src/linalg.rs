//! Small dense linear-algebra helpers on top of faer (row-major `f64` buffers in, out).
