//! Estimators on top of the engines. Each module is one family; formulas and sources are in
//! the doc comments and in docs/measures.md.
pub mod align;
pub mod cka;
pub mod id;
pub mod kernel;
pub mod rsa;
pub mod spectrum;
