//! The per-layer step of the sampled pair measures — RBF CKA, RSA, mutual kNN — as a value
//! that travels: one layer's prepared Gram, RDM or kNN graph ([`Prepared`]), written to and
//! read from bytes, and the pair table over any two lists of them ([`table`]).
//!
//! This is the unit of a distributed run (`layerscope._ray`): one task per layer prepares
//! (the `m²·d` part, all but a sliver of the work), one task per block of layer pairs
//! tabulates (`m²` per pair). Both steps are the very functions the local
//! [`crate::measures::cka::rbf::rbf_hsic`], [`crate::measures::rsa::rsa_matrix`] and
//! [`crate::measures::rsa::mutual_knn_matrix`] run, so the numbers are the same; a block
//! within one source is tabulated as a cross table except on the diagonal (there, the
//! within-source table: the diagonal is exactly 1 where defined, as locally).
//!
//! Bytes (little-endian): `b"LSPREP1\0"`, a kind byte (1 RBF, 2 RSA, 3 kNN), then
//! * RBF: `m` (u64), estimator (u8: 0 biased, 1 unbiased), bandwidth, `1ᵀK̃1` (f64), the
//!   `m²` Gram values, then (unbiased) its `m` row sums;
//! * RSA: present (u8), length (u64), the prepared RDM values;
//! * kNN: `m`, `k` (u64), the `m·k` distances (f64), the `m·k` neighbour indices (u64).
//!
//! Read back with every length checked against the bytes present (a malformed buffer is an
//! error, never a panic or an allocation larger than the buffer).
use crate::engine::neighbors::{knn_bytes, Cpu, Knn, Products};
use crate::error::{Error, Result};
use crate::measures::cka::rbf::{prepare_rbf, rbf_hsic_bytes, rbf_table, RbfTable};
use crate::measures::hsic::{Estimator, Gram};
use crate::measures::rsa::{knn_table, prepare_knn, prepare_rsa, rsa_bytes, rsa_table, Rsa};
use crate::memory::{try_with_capacity, Budget};
use crate::monitor::NoMonitor;

const MAGIC: &[u8; 8] = b"LSPREP1\0";

/// What a layer is prepared for, with the options of its measure.
#[derive(Debug, Clone, Copy)]
pub enum Measure {
    /// RBF CKA: bandwidth multiplier and HSIC estimator.
    Rbf { sigma: f64, estimator: Estimator },
    /// RSA: the RDM's dissimilarity and how two RDMs are compared.
    Rsa(Rsa),
    /// Mutual kNN: neighbours per row, cosine (unit-norm rows) or Euclidean.
    Knn { k: usize, normalize: bool },
}

impl Measure {
    /// Peak bytes of [`Measure::prepare`] on `m` rows of width `d` (what it checks).
    pub fn peak_bytes(&self, m: usize, d: usize) -> u128 {
        match *self {
            Measure::Rbf { .. } => rbf_hsic_bytes(1, m, d),
            Measure::Rsa(_) => rsa_bytes(1, m),
            Measure::Knn { k, normalize } => {
                let copy = if normalize {
                    m as u128 * d as u128 * 8
                } else {
                    0
                };
                m as u128 * k as u128 * 16 + copy + knn_bytes(m, d, k)
            }
        }
    }

    /// Bytes of one prepared layer of `m` rows (what a pair-table block holds per layer).
    pub fn prepared_bytes(&self, m: usize) -> u128 {
        let m = m as u128;
        match *self {
            Measure::Rbf { estimator, .. } => {
                m * m * 8
                    + if estimator == Estimator::Unbiased {
                        m * 8
                    } else {
                        0
                    }
            }
            Measure::Rsa(_) => m * m.saturating_sub(1) / 2 * 8,
            Measure::Knn { k, .. } => m * k as u128 * 16,
        }
    }

    /// One layer (row-major `m × d`) prepared, checked against `budget` first.
    pub fn prepare(&self, x: &[f64], m: usize, d: usize, budget: &Budget) -> Result<Prepared> {
        self.prepare_with(x, m, d, budget, &Cpu)
    }

    /// [`Measure::prepare`] with the distance products computed by `prod` (a torch device
    /// through the binding): the same prepared layer, to rounding.
    pub fn prepare_with(
        &self,
        x: &[f64],
        m: usize,
        d: usize,
        budget: &Budget,
        prod: &dyn Products,
    ) -> Result<Prepared> {
        let what = match self {
            Measure::Rbf { .. } => "rbf",
            Measure::Rsa(_) => "rsa",
            Measure::Knn { .. } => "knn",
        };
        budget.check(
            self.peak_bytes(m, d),
            format_args!("the {what} step of one layer over {m} sampled rows × {d}"),
            "use a smaller sample (sample=...)",
        )?;
        Ok(match *self {
            Measure::Rbf { sigma, estimator } => {
                let (gram, bandwidth) = prepare_rbf(x, m, d, sigma, estimator, prod)?;
                Prepared::Rbf { gram, bandwidth }
            }
            Measure::Rsa(rsa) => Prepared::Rsa(prepare_rsa(x, m, d, rsa, prod)?),
            Measure::Knn { k, normalize } => {
                Prepared::Knn(prepare_knn(x, m, d, k, normalize, &NoMonitor, prod)?)
            }
        })
    }
}

/// One layer prepared for a pair measure.
#[derive(Debug)]
pub enum Prepared {
    /// An RBF Gram prepared for the HSIC estimator, with its bandwidth.
    Rbf { gram: Gram, bandwidth: f64 },
    /// A prepared RDM (None: constant).
    Rsa(Option<Vec<f64>>),
    /// An exact kNN graph.
    Knn(Knn),
}

impl Prepared {
    /// `"rbf"`, `"rsa"` or `"knn"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Prepared::Rbf { .. } => "rbf",
            Prepared::Rsa(_) => "rsa",
            Prepared::Knn(_) => "knn",
        }
    }

    fn gram(&self) -> Option<&Gram> {
        match self {
            Prepared::Rbf { gram, .. } => Some(gram),
            _ => None,
        }
    }

    fn rdm(&self) -> Option<&Option<Vec<f64>>> {
        match self {
            Prepared::Rsa(r) => Some(r),
            _ => None,
        }
    }

    fn graph(&self) -> Option<&Knn> {
        match self {
            Prepared::Knn(g) => Some(g),
            _ => None,
        }
    }

    /// The number of sampled rows it describes (RSA: the RDM's length, 0 when constant).
    pub fn rows(&self) -> usize {
        match self {
            Prepared::Rbf { gram, .. } => gram.m,
            Prepared::Rsa(v) => v.as_ref().map_or(0, |v| v.len()),
            Prepared::Knn(g) => g.m,
        }
    }

    /// Its size in [`Prepared::to_bytes`].
    pub fn byte_len(&self) -> usize {
        9 + match self {
            Prepared::Rbf { gram, .. } => 8 + 1 + 16 + 8 * (gram.g.len() + gram.rows.len()),
            Prepared::Rsa(v) => 1 + 8 + 8 * v.as_ref().map_or(0, |v| v.len()),
            Prepared::Knn(g) => 16 + 16 * g.dist.len(),
        }
    }

    /// The bytes described in the module docs.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out: Vec<u8> = try_with_capacity(self.byte_len(), "a prepared layer's bytes")?;
        out.extend_from_slice(MAGIC);
        let f = |out: &mut Vec<u8>, v: &[f64]| v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        let u = |out: &mut Vec<u8>, v: u64| out.extend(v.to_le_bytes());
        match self {
            Prepared::Rbf { gram, bandwidth } => {
                out.push(1);
                u(&mut out, gram.m as u64);
                out.push(u8::from(gram.estimator == Estimator::Unbiased));
                f(&mut out, &[*bandwidth, gram.total]);
                f(&mut out, &gram.g);
                f(&mut out, &gram.rows);
            }
            Prepared::Rsa(v) => {
                out.push(2);
                out.push(u8::from(v.is_some()));
                let v = v.as_deref().unwrap_or(&[]);
                u(&mut out, v.len() as u64);
                f(&mut out, v);
            }
            Prepared::Knn(g) => {
                out.push(3);
                u(&mut out, g.m as u64);
                u(&mut out, g.k as u64);
                f(&mut out, &g.dist);
                g.idx.iter().for_each(|&i| u(&mut out, i as u64));
            }
        }
        Ok(out)
    }

    /// Read back [`Prepared::to_bytes`] (every length and value range checked).
    pub fn from_bytes(data: &[u8]) -> Result<Prepared> {
        let mut r = Reader { data, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(bad("not a prepared layer (wrong magic)"));
        }
        let out = match r.byte()? {
            1 => {
                let m = r.count()?;
                let est = match r.byte()? {
                    0 => Estimator::Biased,
                    1 => Estimator::Unbiased,
                    _ => return Err(bad("unknown estimator")),
                };
                let bandwidth = r.f64s(1)?[0];
                let total = r.f64s(1)?[0];
                let mm = m.checked_mul(m).ok_or_else(|| bad("Gram size overflows"))?;
                let g = r.f64s(mm)?;
                let rows = r.f64s(if est == Estimator::Unbiased { m } else { 0 })?;
                if m < est.min_rows() {
                    return Err(bad("a Gram with too few rows"));
                }
                Prepared::Rbf {
                    gram: Gram {
                        g,
                        m,
                        estimator: est,
                        rows,
                        total,
                    },
                    bandwidth,
                }
            }
            2 => {
                let present = r.byte()?;
                let len = r.count()?;
                let v = r.f64s(len)?;
                match present {
                    0 if len == 0 => Prepared::Rsa(None),
                    1 => Prepared::Rsa(Some(v)),
                    _ => return Err(bad("a malformed RDM")),
                }
            }
            3 => {
                let m = r.count()?;
                let k = r.count()?;
                let mk = m
                    .checked_mul(k)
                    .ok_or_else(|| bad("graph size overflows"))?;
                let dist = r.f64s(mk)?;
                let raw = r.take(mk.checked_mul(8).ok_or_else(|| bad("graph size"))?)?;
                let mut idx: Vec<usize> = try_with_capacity(mk, "a kNN graph")?;
                for c in raw.chunks_exact(8) {
                    let i = u64::from_le_bytes(c.try_into().map_err(|_| bad("index"))?);
                    match usize::try_from(i) {
                        Ok(i) if i < m => idx.push(i),
                        _ => return Err(bad("a neighbour index out of range")),
                    }
                }
                Prepared::Knn(Knn { m, k, dist, idx })
            }
            _ => return Err(bad("unknown kind")),
        };
        if r.at != data.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(out)
    }
}

fn bad(what: &str) -> Error {
    Error::invalid(format!("malformed prepared layer: {what}"))
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn count(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes(b.try_into().map_err(|_| bad("count"))?);
        usize::try_from(v).map_err(|_| bad("a count too large"))
    }
    fn f64s(&mut self, n: usize) -> Result<Vec<f64>> {
        let raw = self.take(n.checked_mul(8).ok_or_else(|| bad("length overflows"))?)?;
        let mut v: Vec<f64> = try_with_capacity(n, "a prepared layer")?;
        v.extend(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        );
        Ok(v)
    }
}

/// The pair table of one measure over prepared layers (`b = None`: every pair of `a`).
#[derive(Debug, Clone)]
pub struct Table {
    /// Row-major `La × Lb` values (CKA, RSA correlation or mutual-kNN alignment).
    pub values: Vec<f64>,
    /// RBF only: the HSIC of each pair and the self-HSICs of each side.
    pub rbf: Option<RbfTable>,
}

/// The pair step of the measure the layers were prepared for (all of one kind, one row
/// count, one estimator; mutual kNN at the graphs' `k`).
pub fn table(a: &[&Prepared], b: Option<&[&Prepared]>) -> Result<Table> {
    let all = || a.iter().chain(b.unwrap_or(&[]));
    let first = a
        .first()
        .ok_or_else(|| Error::invalid("empty layer selection"))?;
    if b.is_some_and(|b| b.is_empty()) {
        return Err(Error::invalid("empty layer selection"));
    }
    if all().any(|p| p.kind() != first.kind()) {
        return Err(Error::Mismatch(
            "prepared layers of different measures in one table".into(),
        ));
    }
    fn each<'a, T>(v: &[&'a Prepared], f: impl Fn(&'a Prepared) -> Option<T>) -> Vec<T> {
        v.iter().filter_map(|&p| f(p)).collect()
    }
    match first {
        Prepared::Rbf { .. } => {
            let ga = each(a, Prepared::gram);
            let gb = b.map(|b| each(b, Prepared::gram));
            let t = rbf_table(&ga, gb.as_deref())?;
            Ok(Table {
                values: t.cka.clone(),
                rbf: Some(t),
            })
        }
        Prepared::Rsa(_) => {
            let ra = each(a, Prepared::rdm);
            let rb = b.map(|b| each(b, Prepared::rdm));
            Ok(Table {
                values: rsa_table(&ra, rb.as_deref())?,
                rbf: None,
            })
        }
        Prepared::Knn(g0) => {
            let ga = each(a, Prepared::graph);
            let gb = b.map(|b| each(b, Prepared::graph));
            if ga
                .iter()
                .chain(gb.as_deref().unwrap_or(&[]))
                .any(|g| g.k != g0.k)
            {
                return Err(Error::Mismatch(
                    "kNN graphs of different k in one table".into(),
                ));
            }
            Ok(Table {
                values: knn_table(&ga, gb.as_deref(), g0.k)?,
                rbf: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measures::cka::rbf::{prepare_rbf, rbf_hsic};
    use crate::measures::rsa::{
        mutual_knn_matrix, prepare_knn, prepare_rsa, rsa_matrix, Compare, Dissimilarity,
    };

    const EUCLIDEAN_SPEARMAN: Rsa = Rsa {
        dissimilarity: Dissimilarity::Euclidean,
        compare: Compare::Spearman,
    };
    use crate::memory::Budget;
    use crate::monitor::NoMonitor;

    fn layer(m: usize, d: usize, seed: usize) -> Vec<f64> {
        (0..m * d)
            .map(|i| ((i * 7919 + seed * 104_729) % 211) as f64 / 31.0 + seed as f64)
            .collect()
    }

    fn roundtrip(p: &Prepared) -> Prepared {
        let b = p.to_bytes().unwrap();
        assert_eq!(b.len(), p.byte_len());
        let q = Prepared::from_bytes(&b).unwrap();
        assert_eq!(q.to_bytes().unwrap(), b);
        // every truncation and a trailing byte are errors, never a panic
        for cut in [0, 7, 8, 9, 17, b.len() / 2, b.len() - 1] {
            assert!(Prepared::from_bytes(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(Prepared::from_bytes(&longer).is_err());
        q
    }

    /// Blocks of prepared layers, through bytes, give the local all-pairs tables exactly.
    #[test]
    fn blocks_of_prepared_layers_give_the_local_tables() {
        let (m, dims) = (24usize, [3usize, 5, 2, 4]);
        let xs: Vec<Vec<f64>> = dims
            .iter()
            .enumerate()
            .map(|(s, &d)| layer(m, d, s))
            .collect();
        let layers: Vec<(&[f64], usize)> = xs
            .iter()
            .zip(dims)
            .map(|(x, d)| (x.as_slice(), d))
            .collect();
        let b = Budget::unchecked();
        let l = dims.len();
        let check = |prep: Vec<Prepared>, local: Vec<f64>| {
            let prep: Vec<Prepared> = prep.iter().map(roundtrip).collect();
            let all: Vec<&Prepared> = prep.iter().collect();
            assert_eq!(table(&all, None).unwrap().values, local);
            // a 2 + 2 split: diagonal blocks within, off-diagonal blocks as cross tables
            let (p, q) = all.split_at(2);
            let mut out = vec![f64::NAN; l * l];
            for (ro, rs) in [(0, p), (2, q)] {
                for (co, cs) in [(0, p), (2, q)] {
                    let t = if ro == co {
                        table(rs, None).unwrap()
                    } else {
                        table(rs, Some(cs)).unwrap()
                    };
                    for i in 0..rs.len() {
                        for j in 0..cs.len() {
                            out[(ro + i) * l + co + j] = t.values[i * cs.len() + j];
                        }
                    }
                }
            }
            for (x, y) in out.iter().zip(&local) {
                assert!(
                    (x - y).abs() <= 1e-12 || (x.is_nan() && y.is_nan()),
                    "{x} {y}"
                );
            }
        };
        for unbiased in [false, true] {
            let est = Estimator::from_unbiased(unbiased);
            let prep = layers
                .iter()
                .map(|(x, d)| {
                    let (gram, bandwidth) = prepare_rbf(x, m, *d, 1.0, est, &Cpu).unwrap();
                    Prepared::Rbf { gram, bandwidth }
                })
                .collect();
            let local = rbf_hsic(&layers, None, m, 1.0, unbiased, &b, &NoMonitor).unwrap();
            check(prep, local.table.cka);
        }
        let prep = layers
            .iter()
            .map(|(x, d)| Prepared::Rsa(prepare_rsa(x, m, *d, EUCLIDEAN_SPEARMAN, &Cpu).unwrap()))
            .collect();
        let local = rsa_matrix(&layers, None, m, EUCLIDEAN_SPEARMAN, &b, &NoMonitor).unwrap();
        check(prep, local);
        let prep = layers
            .iter()
            .map(|(x, d)| Prepared::Knn(prepare_knn(x, m, *d, 5, true, &NoMonitor, &Cpu).unwrap()))
            .collect();
        let local = mutual_knn_matrix(&layers, None, m, 5, true, &b, &NoMonitor).unwrap();
        check(prep, local);
    }

    #[test]
    fn mixed_kinds_and_garbage_are_errors() {
        let x = layer(10, 3, 1);
        let r = Prepared::Rsa(
            prepare_rsa(&x, 10, 3, Rsa::parse("euclidean", "pearson").unwrap(), &Cpu).unwrap(),
        );
        let k = Prepared::Knn(prepare_knn(&x, 10, 3, 2, false, &NoMonitor, &Cpu).unwrap());
        assert!(table(&[&r, &k], None).is_err());
        assert!(table(&[], None).is_err());
        assert!(Prepared::from_bytes(b"LSPREP1\0\x09").is_err());
        // a count that claims more than the buffer holds is an error, not an allocation
        let mut huge = b"LSPREP1\0\x02\x01".to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        assert!(Prepared::from_bytes(&huge).is_err());
        let none = Prepared::Rsa(None);
        assert!(Prepared::from_bytes(&none.to_bytes().unwrap()).is_ok());
    }
}
