//! Estimators on top of the engines. Each module is one family; formulas and sources are in
//! the doc comments and in docs/measures.md.
pub mod align;
pub mod cka;
pub mod hsic;
pub mod id;
pub mod rsa;
pub mod spectrum;

/// Layers of one in-memory sample, as the neighbour measures take them: (row-major
/// `m × d_l` values, `d_l`) per layer.
pub type Layers<'a> = [(&'a [f64], usize)];

/// The number of layers of `a` and `b` together, and the widest.
pub fn count_and_widest(a: &Layers<'_>, b: Option<&Layers<'_>>) -> (usize, usize) {
    let all = || a.iter().chain(b.unwrap_or(&[]));
    (all().count(), all().map(|l| l.1).max().unwrap_or(0))
}
