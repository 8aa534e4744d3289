//! The activation store (see docs/FORMAT.md).
