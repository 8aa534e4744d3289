//! CKA, every estimator: linear from the moment engine ([`linear`]), RBF on a sample
//! ([`rbf`]) and the minibatch estimator ([`minibatch`]), linear or RBF. The HSIC formulas
//! and the CKA ratio they all end in live in [`crate::measures::hsic`].
pub mod calibrate;
pub mod linear;
pub mod minibatch;
pub mod rbf;

pub use linear::LinearCka;
pub use minibatch::{
    cka_table as minibatch_cka_table, minibatch_bytes, minibatch_pass, Kernel, MinibatchCka,
    MinibatchHsic, SharedProducts, DEFAULT_BATCH_SIZE,
};
