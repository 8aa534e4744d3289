//! Estimators on top of the engines. Each module is one family; formulas and sources are in
//! the doc comments and in docs/measures.md.
use crate::error::Result;
use rayon::prelude::*;

pub mod align;
pub mod cka;
pub mod cknna;
pub mod hsic;
pub mod id;
pub mod prepared;
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

/// The `La × Lb` table of `f` over the items of `a` and `b` (`b = None`: `a × a`, each
/// unordered pair computed once and mirrored), pairs in parallel, row-major.
pub(crate) fn pair_table<T: Sync>(
    a: &[T],
    b: Option<&[T]>,
    f: impl Fn(&T, &T) -> Result<f64> + Sync,
) -> Result<Vec<f64>> {
    let cols = b.unwrap_or(a);
    let (la, lb) = (a.len(), cols.len());
    let cells: Vec<(usize, usize)> = (0..la)
        .flat_map(|i| (0..lb).map(move |j| (i, j)))
        .filter(|&(i, j)| b.is_some() || i <= j)
        .collect();
    let vals: Vec<f64> = cells
        .par_iter()
        .map(|&(i, j)| {
            crate::monitor::check_interrupt()?;
            f(&a[i], &cols[j])
        })
        .collect::<Result<_>>()?;
    let mut out = vec![f64::NAN; la * lb];
    for (&(i, j), v) in cells.iter().zip(vals) {
        out[i * lb + j] = v;
        if b.is_none() {
            out[j * lb + i] = v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn pair_tables_mirror_within_one_source() {
        let a = [1.0, 2.0, 3.0];
        let f = |x: &f64, y: &f64| Ok(x * 10.0 + y);
        // within one source: each unordered pair once (i <= j), mirrored
        assert_eq!(
            pair_table(&a, None, f).unwrap(),
            vec![11.0, 12.0, 13.0, 12.0, 22.0, 23.0, 13.0, 23.0, 33.0]
        );
        let b = [5.0, 6.0];
        assert_eq!(
            pair_table(&a, Some(&b), f).unwrap(),
            vec![15.0, 16.0, 25.0, 26.0, 35.0, 36.0]
        );
        let bad = |_: &f64, _: &f64| Err(Error::invalid("no"));
        assert!(pair_table(&a, None, bad).is_err());
    }
}
