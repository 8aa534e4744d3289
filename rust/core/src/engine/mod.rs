//! The two engines: exact streamed moments, and exact neighbours on a sample.
pub mod moments;
pub mod neighbors;
