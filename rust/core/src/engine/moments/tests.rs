//! Engine-1 tests against naive f64 references (numbers from the formulas, not the code).
use super::state::offsets_of;
use super::*;
use crate::error::Error;
use crate::measures::cka::LinearCka;
use crate::memory::Budget;

use crate::testdata::data;

fn naive(xs: &[Vec<f64>], dims: &[usize], n: usize) -> (Vec<f64>, Vec<f64>) {
    // centred C and rr, in f64 two-pass.
    let d: usize = dims.iter().sum();
    let mut z = vec![0.0; n * d];
    let offs = offsets_of(dims);
    for (l, x) in xs.iter().enumerate() {
        for a in 0..n {
            for c in 0..dims[l] {
                z[a * d + offs[l] + c] = x[a * dims[l] + c];
            }
        }
    }
    let mean: Vec<f64> = (0..d)
        .map(|c| (0..n).map(|a| z[a * d + c]).sum::<f64>() / n as f64)
        .collect();
    for a in 0..n {
        for c in 0..d {
            z[a * d + c] -= mean[c];
        }
    }
    let mut cov = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            cov[j * d + i] = (0..n).map(|a| z[a * d + i] * z[a * d + j]).sum();
        }
    }
    let lc = dims.len();
    let r: Vec<Vec<f64>> = (0..lc)
        .map(|l| {
            (0..n)
                .map(|a| (offs[l]..offs[l + 1]).map(|c| z[a * d + c].powi(2)).sum())
                .collect()
        })
        .collect();
    let mut rr = vec![0.0; lc * lc];
    for k in 0..lc {
        for l in 0..lc {
            rr[k * lc + l] = (0..n).map(|a| r[k][a] * r[l][a]).sum();
        }
    }
    (cov, rr)
}

/// Row-major f64 layers `xs` of widths `dims` over `n` rows, as a row source.
fn f64_rows<'a>(
    xs: &'a [Vec<f64>],
    dims: &[usize],
    n: usize,
) -> crate::store::stream::ArrayRows<'a> {
    use crate::store::stream::{ArrayLayer, ArrayRows};
    let layers = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| ArrayLayer::new(crate::store::Values::F64(&xs[i]), n, d, d).unwrap())
        .collect();
    ArrayRows::new(layers).unwrap()
}

/// `xs` as a row source of f64 layers, or of their f32 copies `x32` with [`Compute::F32`].
fn rows_in<'a>(
    xs: &'a [Vec<f64>],
    x32: &'a [Vec<f32>],
    dims: &[usize],
    n: usize,
    compute: Compute,
) -> crate::store::stream::ArrayRows<'a> {
    use crate::store::stream::{ArrayLayer, ArrayRows};
    use crate::store::Values;
    let layers = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let v = if compute == Compute::F64 {
                Values::F64(&xs[i])
            } else {
                Values::F32(&x32[i])
            };
            ArrayLayer::new(v, n, d, d).unwrap()
        })
        .collect();
    ArrayRows::new(layers).unwrap()
}

/// Layers of widths `dims` over `n` rows (seeds from `seed`), every other one offset by
/// `offset` from zero (the large per-feature means of LLM activations).
fn offset_layers(n: usize, dims: &[usize], seed: u64, offset: f64) -> Vec<Vec<f64>> {
    dims.iter()
        .enumerate()
        .map(|(i, &d)| data(n, d, seed + i as u64, if i % 2 == 0 { offset } else { 0.0 }))
        .collect()
}

/// `xs` rounded to f32.
fn to_f32(xs: &[Vec<f64>]) -> Vec<Vec<f32>> {
    xs.iter()
        .map(|x| x.iter().map(|&v| v as f32).collect())
        .collect()
}

/// Rows `a..b` of every layer of `xs` (row-major, widths `dims`): a block to feed.
fn block_of<'a, T>(xs: &'a [Vec<T>], dims: &[usize], a: usize, b: usize) -> Vec<&'a [T]> {
    xs.iter()
        .zip(dims)
        .map(|(x, &d)| &x[a * d..b * d])
        .collect()
}

/// The single pass over `src` (no budget), finalised: what the plan tests compare with.
fn single_pass(
    src: &dyn crate::store::RowSource,
    names: &[String],
    block_rows: Option<usize>,
    compute: Compute,
) -> Moments {
    let un = Budget::unchecked();
    accumulate(
        src,
        names,
        block_rows,
        true,
        &un,
        compute,
        &crate::monitor::NoMonitor,
    )
    .and_then(|a| a.finalize())
    .unwrap()
}

/// The pairs of a pass over `l` layers, `num_a` of them the first source's: every pair of
/// one source (`num_a == l`), else those across the two.
/// A valid [`PassShape`].
fn shape(
    dims: &[usize],
    num_a: usize,
    n: u64,
    block_rows: Option<usize>,
    compute: Compute,
) -> PassShape<'_> {
    PassShape::new(dims, num_a, n, block_rows, compute).unwrap()
}

use super::plan::pair_sides as sides;

/// Linear CKA of `got` (biased and debiased) within `tol` of `want`'s on `rows × cols`.
fn assert_cka_agree(
    got: &dyn LinearCka,
    want: &dyn LinearCka,
    (rows, cols): (&[usize], &[usize]),
    tol: f64,
    what: &str,
) {
    for debiased in [false, true] {
        let w = want.cka_matrix(rows, cols, debiased).unwrap();
        let g = got.cka_matrix(rows, cols, debiased).unwrap();
        for (g, w) in g.iter().zip(&w) {
            assert!(
                (g - w).abs() <= tol,
                "{what} debiased={debiased}: {g} vs {w}"
            );
        }
    }
}

/// Whether `r` is an [`Error::Format`] (bytes read back that do not hold together).
fn is_format_err<T>(r: crate::error::Result<T>) -> bool {
    matches!(r, Err(Error::Format { .. }))
}

/// `l0`, `l1`, … for `k` layers.
fn layer_names(k: usize) -> Vec<String> {
    (0..k).map(|i| format!("l{i}")).collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

#[test]
fn streamed_merged_serialised_equal_naive() {
    let dims = [3usize, 5, 2];
    let n = 50;
    let xs: Vec<Vec<f64>> = dims
        .iter()
        .enumerate()
        .map(|(l, &d)| data(n, d, l as u64, 100.0))
        .collect();
    let (cov, rr) = naive(&xs, &dims, n);
    let slice = |a: usize, b: usize| block_of(&xs, &dims, a, b);
    // one shot
    let mut acc = MomentAccumulator::new(&dims).unwrap();
    acc.update(&slice(0, n), n).unwrap();
    let m = acc.clone().finalize().unwrap();
    assert!(rel(&m.cov, &cov) < 1e-12, "{}", rel(&m.cov, &cov));
    assert!(rel(&m.rr, &rr) < 1e-12);
    // blocks of uneven sizes
    let mut acc2 = MomentAccumulator::new(&dims).unwrap();
    for (a, b) in [(0, 1), (1, 7), (7, 30), (30, 50)] {
        acc2.update(&slice(a, b), b - a).unwrap();
    }
    let m2 = acc2.finalize().unwrap();
    assert!(rel(&m2.cov, &cov) < 1e-12);
    assert!(rel(&m2.rr, &rr) < 1e-12);
    // merge of two with different shifts, through bytes
    let mut a1 = MomentAccumulator::new(&dims).unwrap();
    a1.update(&slice(0, 20), 20).unwrap();
    let mut a2 = MomentAccumulator::new(&dims).unwrap();
    a2.update(&slice(20, 21), 1).unwrap();
    a2.update(&slice(21, 50), 29).unwrap();
    let a2 = MomentAccumulator::from_bytes(&a2.to_bytes().unwrap()).unwrap();
    a1.merge(&a2).unwrap();
    let m3 = a1.finalize().unwrap();
    assert!(rel(&m3.cov, &cov) < 1e-12, "{}", rel(&m3.cov, &cov));
    assert!(rel(&m3.rr, &rr) < 1e-12, "{}", rel(&m3.rr, &rr));
    // merge into empty
    let mut e = MomentAccumulator::new(&dims).unwrap();
    e.merge(&acc).unwrap();
    assert!(rel(&e.finalize().unwrap().cov, &cov) < 1e-12);
}

#[test]
fn bad_bytes_are_format_errors() {
    let dims = [2usize, 3];
    let mut acc = MomentAccumulator::new(&dims).unwrap();
    let x = data(4, 2, 1, 0.0);
    let y = data(4, 3, 2, 0.0);
    acc.update(&[&x[..], &y[..]], 4).unwrap();
    let b = acc.to_bytes().unwrap();
    for cut in [0, 5, 8, 12, 20, b.len() - 1] {
        assert!(is_format_err(MomentAccumulator::from_bytes(&b[..cut])));
    }
    let mut bad = b.clone();
    bad[12] = 0xff; // layer count
    assert!(is_format_err(MomentAccumulator::from_bytes(&bad)));
    let mut long = b.clone();
    long.push(0);
    assert!(is_format_err(MomentAccumulator::from_bytes(&long)));
    // flip every byte: never panics
    for i in 0..b.len() {
        let mut c = b.clone();
        c[i] ^= 0xa5;
        let _ = MomentAccumulator::from_bytes(&c);
    }
}

#[test]
fn nonfinite_and_shape_errors() {
    let dims = [2usize];
    let mut acc = MomentAccumulator::new(&dims).unwrap();
    let x = [1.0f32, 2.0, 3.0, f32::NAN];
    match acc.update(&[&x[..]], 2) {
        Err(Error::NonFinite(m)) => assert!(m.contains("row 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(acc.n(), 0);
    assert!(matches!(acc.update(&[&x[..3]], 2), Err(Error::Mismatch(_))));
    assert!(MomentAccumulator::new(&[]).is_err());
    assert!(MomentAccumulator::new(&[0]).is_err());
    let b = |x: u64| Budget::argument(x).unwrap();
    assert!(check_memory(&[768; 13], 1024, Compute::F64, &b(1 << 20)).is_err());
    assert!(check_memory(&[768; 13], 1024, Compute::F64, &b(8 << 30)).is_ok());
    // 33 × 4096 (a 7–8B model's residual stream) in a 20 GiB budget: 12 layers fit.
    match check_memory(&[4096; 33], 1024, Compute::F32, &b(20 << 30)) {
        Err(Error::Memory(m)) => {
            assert!(m.contains("33 layers (D = 135168"), "{m}");
            assert!(m.contains("at most 12 of these 33 layers"), "{m}");
            assert!(m.contains("max_memory argument"), "{m}");
        }
        r => panic!("{r:?}"),
    }
    match check_memory(&[1 << 20], 1024, Compute::F32, &b(1 << 30)) {
        Err(Error::Memory(m)) => assert!(m.contains("not even one layer"), "{m}"),
        r => panic!("{r:?}"),
    }
}

/// Reference linear CKA from explicit Gram matrices (Song et al. 2012 eq. 5 for the
/// unbiased HSIC; Kornblith et al. 2019 for the biased one), on raw (uncentred) data.
fn naive_cka(x: &[f64], y: &[f64], n: usize, dx: usize, dy: usize, debiased: bool) -> f64 {
    let gram = |z: &[f64], d: usize| crate::testdata::naive_gram(z, n, d);
    let hsic = |k: &[f64], l: &[f64]| -> f64 {
        let nf = n as f64;
        if debiased {
            let mut kt = k.to_vec();
            let mut lt = l.to_vec();
            for a in 0..n {
                kt[a * n + a] = 0.0;
                lt[a * n + a] = 0.0;
            }
            let tr: f64 = (0..n * n).map(|i| kt[i] * lt[i]).sum();
            let sk: f64 = kt.iter().sum();
            let sl: f64 = lt.iter().sum();
            let k1: Vec<f64> = (0..n)
                .map(|a| kt[a * n..(a + 1) * n].iter().sum())
                .collect();
            let l1: Vec<f64> = (0..n)
                .map(|a| lt[a * n..(a + 1) * n].iter().sum())
                .collect();
            let kl: f64 = k1.iter().zip(&l1).map(|(p, q)| p * q).sum();
            (tr + sk * sl / ((nf - 1.0) * (nf - 2.0)) - 2.0 * kl / (nf - 2.0)) / (nf * (nf - 3.0))
        } else {
            // tr(KHLH)/(n-1)^2
            let h = |m: &[f64]| -> Vec<f64> {
                let rm: Vec<f64> = (0..n)
                    .map(|a| m[a * n..(a + 1) * n].iter().sum::<f64>() / nf)
                    .collect();
                let tot: f64 = rm.iter().sum::<f64>() / nf;
                (0..n * n)
                    .map(|i| m[i] - rm[i / n] - rm[i % n] + tot)
                    .collect()
            };
            let (kc, lc) = (h(k), h(l));
            (0..n * n).map(|i| kc[i] * lc[i]).sum::<f64>() / ((nf - 1.0) * (nf - 1.0))
        }
    };
    let (k, l) = (gram(x, dx), gram(y, dy));
    hsic(&k, &l) / (hsic(&k, &k) * hsic(&l, &l)).sqrt()
}

#[test]
fn cka_matches_gram_reference() {
    let (n, dx, dy) = (23usize, 5usize, 9usize);
    let x = data(n, dx, 3, 0.0);
    let mut y = data(n, dy, 4, 0.0);
    for a in 0..n {
        for c in 0..dx {
            y[a * dy + c] += 2.0 * x[a * dx + c];
        }
    }
    let mut acc = MomentAccumulator::new(&[dx, dy]).unwrap();
    acc.update(&[&x[..], &y[..]], n).unwrap();
    let m = acc.finalize().unwrap();
    for deb in [false, true] {
        let want = naive_cka(&x, &y, n, dx, dy, deb);
        let got = m.cka(0, 1, deb).unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{deb}: {got} vs {want}"
        );
        let mat = m.cka_matrix(&[0, 1], &[0, 1], deb).unwrap();
        assert_eq!(mat[0], 1.0);
        assert_eq!(mat[3], 1.0);
        assert!((mat[1] - got).abs() < 1e-15 && (mat[2] - got).abs() < 1e-15);
    }
    // n < 4: debiased is NaN, biased defined.
    let mut tiny = MomentAccumulator::new(&[dx, dy]).unwrap();
    tiny.update(&[&x[..3 * dx], &y[..3 * dy]], 3).unwrap();
    let t = tiny.finalize().unwrap();
    assert!(t.cka(0, 1, true).unwrap().is_nan());
    assert!(t.cka(0, 1, false).unwrap().is_finite());
    // constant layer: NaN (zero variance), not 0.
    let c = vec![7.0; n * 2];
    let mut acc = MomentAccumulator::new(&[dx, 2]).unwrap();
    acc.update(&[&x[..], &c[..]], n).unwrap();
    let m = acc.finalize().unwrap();
    assert!(m.cka(0, 1, false).unwrap().is_nan());
    assert!(m.cka_matrix(&[0], &[1], true).unwrap()[0].is_nan());
    assert!(m.cka(0, 2, false).is_err());
    assert!(m.cka_matrix(&[0], &[5], false).is_err());
}

#[test]
fn stream_from_stores_equals_in_memory() {
    use crate::monitor::NoMonitor;
    use crate::store::{Rows, StoreRows};
    let dir = tempfile::tempdir().unwrap();
    let (n, dims) = (301usize, [4usize, 7]);
    let xs: Vec<Vec<f64>> = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| data(n, d, 10 + i as u64, 300.0))
        .collect();
    let x32 = to_f32(&xs);
    let mk = |name: &str| crate::testdata::f32_store(&dir.path().join(name), &x32, &dims, 50, 4096);
    let a = mk("a");
    let b = mk("b");
    let sa = StoreRows::new(&a, vec![0, 1]).unwrap();
    let sb = StoreRows::new(&b, vec![1]).unwrap();
    let sels = Rows::new(vec![&sa, &sb]).unwrap();
    let names: Vec<String> = ["a0", "a1", "b1"].iter().map(|s| s.to_string()).collect();
    let pass = |block_rows, budget: &Budget| {
        accumulate(
            &sels,
            &names,
            block_rows,
            true,
            budget,
            Compute::F64,
            &NoMonitor,
        )
    };
    let m = pass(Some(37), &Budget::unchecked())
        .unwrap()
        .finalize()
        .unwrap();
    let mut mem = MomentAccumulator::new(&[4, 7, 7]).unwrap();
    mem.update(&[&x32[0][..], &x32[1][..], &x32[1][..]], n)
        .unwrap();
    let r = mem.finalize().unwrap();
    assert_eq!(m.n, n as u64);
    assert!(rel(&m.cov, &r.cov) < 1e-12, "{}", rel(&m.cov, &r.cov));
    assert!((m.cka(1, 2, false).unwrap() - 1.0).abs() < 1e-12);
    assert!(pass(Some(0), &Budget::unchecked()).is_err());
    assert!(matches!(
        pass(None, &Budget::argument(1000).unwrap()),
        Err(Error::Memory(_))
    ));
    // names must match the selected layers
    assert!(accumulate(
        &sels,
        &names[..1],
        None,
        true,
        &Budget::unchecked(),
        Compute::F64,
        &NoMonitor
    )
    .is_err());
}

#[test]
fn set_shift_changes_nothing_but_rounding_and_is_checked() {
    let (n, dims) = (700, [5usize, 3]);
    let xs: Vec<Vec<f64>> = dims
        .iter()
        .enumerate()
        .map(|(l, &d)| data(n, d, 21 + l as u64, 400.0))
        .collect();
    let blk: Vec<&[f64]> = xs.iter().map(|x| x.as_slice()).collect();
    let mut a = MomentAccumulator::new(&dims).unwrap();
    a.update(&blk, n).unwrap();
    // Wrong length, non-finite, after rows: typed errors.
    assert!(matches!(
        a.set_shift(&[0.0; 8]),
        Err(Error::InvalidArgument(_))
    ));
    let mut b = MomentAccumulator::new(&dims).unwrap();
    assert!(matches!(b.set_shift(&[0.0; 7]), Err(Error::Mismatch(_))));
    assert!(b.set_shift(&[f64::NAN; 8]).is_err());
    // 3 + 0.5·i away from each column's mean (10–22 spreads of 0.29).
    let far: Vec<f64> = xs
        .iter()
        .zip(&dims)
        .flat_map(|(x, &d)| {
            (0..d).map(move |c| x.iter().skip(c).step_by(d).sum::<f64>() / n as f64)
        })
        .enumerate()
        .map(|(i, m)| m + 3.0 + 0.5 * i as f64)
        .collect();
    b.set_shift(&far).unwrap();
    assert!(b.set_shift(&far).is_err()); // only once
    b.update(&blk, n).unwrap();
    let (ma, mb) = (a.finalize().unwrap(), b.finalize().unwrap());
    assert!(rel(&ma.cov, &mb.cov) < 1e-12, "{}", rel(&ma.cov, &mb.cov));
    // The first block's own mean: offset 0; the far shift: many standard deviations.
    assert!(ma.shift_offset < 1e-6, "{}", ma.shift_offset);
    assert!(mb.shift_offset > 10.0, "{}", mb.shift_offset);
}

#[test]
fn f32_products_match_f64() {
    // Offsets of 1000× the spread, widths that differ, a block longer than the f32
    // sub-block (sums split), a second update, and scales 1e-4 / 1e4.
    for &(scale, offset) in &[(1.0, 1000.0), (1e-4, 50.0), (1e4, 300.0)] {
        let (n, dims) = (2 * F32_BLOCK_ROWS + 300, [24usize, 9, 17]);
        let xs: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| {
                data(n, d, 11 + l as u64, offset)
                    .iter()
                    .map(|v| (v * scale) as f32)
                    .collect()
            })
            .collect();
        let run = |compute: Compute| {
            let mut acc = MomentAccumulator::new(&dims).unwrap().with_compute(compute);
            let cut = n - 500;
            for (a, b) in [(0, cut), (cut, n)] {
                acc.update(&block_of(&xs, &dims, a, b), b - a).unwrap();
            }
            acc.finalize().unwrap()
        };
        let (m64, m32) = (run(Compute::F64), run(Compute::F32));
        assert!(
            rel(&m32.cov, &m64.cov) < 1e-6,
            "cov {}",
            rel(&m32.cov, &m64.cov)
        );
        for i in 0..3 {
            for j in 0..3 {
                for deb in [false, true] {
                    let (a, b) = (m32.cka(i, j, deb).unwrap(), m64.cka(i, j, deb).unwrap());
                    assert!((a - b).abs() < 1e-6, "cka({i},{j},{deb}) {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn f32_accumulators_merge_and_serialise() {
    let dims = [6usize, 5];
    let n = 400;
    let x64: Vec<Vec<f64>> = (0..2)
        .map(|l| data(n, dims[l], 3 + l as u64, 200.0))
        .collect();
    let xs = to_f32(&x64);
    let blk = |a: usize, b: usize| block_of(&xs, &dims, a, b);
    let mut whole = MomentAccumulator::new(&dims).unwrap();
    whole.update(&blk(0, n), n).unwrap();
    let mut p = MomentAccumulator::new(&dims)
        .unwrap()
        .with_compute(Compute::F32);
    p.update(&blk(0, 150), 150).unwrap();
    let mut q = MomentAccumulator::new(&dims)
        .unwrap()
        .with_compute(Compute::F32);
    q.update(&blk(150, n), n - 150).unwrap();
    let q = MomentAccumulator::from_bytes(&q.to_bytes().unwrap()).unwrap();
    p.merge(&q).unwrap();
    let (a, b) = (p.finalize().unwrap(), whole.finalize().unwrap());
    assert!(rel(&a.cov, &b.cov) < 1e-6, "{}", rel(&a.cov, &b.cov));
    assert!(Compute::parse("float32").is_ok() && Compute::parse("half").is_err());
}

/// Tiled passes against the single pass (and the Gram reference): within one source and
/// across two, with a layer split into column pieces, f64 and f32 products, large offsets.
#[test]
fn tiled_passes_equal_the_single_pass() {
    use crate::monitor::NoMonitor;
    let n = 157usize;
    // Widths straddling the piece size: the 300-wide layer is split when w < 301.
    let dims = [40usize, 300, 7, 129, 64];
    let xs = offset_layers(n, &dims, 40, 500.0);
    let x32 = to_f32(&xs);
    let names = layer_names(dims.len());
    for compute in [Compute::F64, Compute::F32] {
        let src = rows_in(&xs, &x32, &dims, n, compute);
        let single = single_pass(&src, &names, Some(50), compute);
        let tol = if compute == Compute::F64 { 1e-10 } else { 1e-6 };
        for num_a in [dims.len(), 2, 3] {
            // Budgets from most of the single pass down to the smallest plan (pieces of
            // about 128 columns: the 300-wide layer split).
            let full = pass_bytes(&dims, 50, compute) as f64;
            let mut split = false;
            for frac in [0.7, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2] {
                let budget = (full * frac) as u64;
                let b = Budget::argument(budget).unwrap();
                let Ok(plan) = plan_tiles(&shape(&dims, num_a, n as u64, Some(50), compute), &b)
                else {
                    assert!(frac < 0.45, "{compute:?} {num_a} {frac}");
                    continue;
                };
                split |= plan.pieces.len() > dims.len();
                assert!(plan.peak_bytes <= budget as u128, "{plan:?}");
                assert!(plan.passes() > 1);
                let st = run_tiled(&src, &names, &plan, true, &b, &NoMonitor).unwrap();
                let (rows, cols) = sides(num_a, dims.len());
                let what = format!("{compute:?} num_a={num_a} budget={budget}");
                assert_cka_agree(&st, &single, (&rows, &cols), tol, &what);
                // Any other pair is either right (its pieces met in one tile) or an error,
                // never a partial number.
                for x in 0..dims.len() {
                    for y in 0..dims.len() {
                        match st.cka_matrix(&[x], &[y], true) {
                            Ok(v) => {
                                let w = single.cka(x, y, true).unwrap();
                                assert!((v[0] - w).abs() <= tol, "({x},{y}): {} vs {w}", v[0]);
                            }
                            Err(_) => assert!(num_a < dims.len() && (x < num_a) == (y < num_a)),
                        }
                    }
                }
                // Multiply-adds are those of the single pass (each piece pair once).
                let d: u128 = dims.iter().sum::<usize>() as u128;
                if num_a == dims.len() {
                    assert_eq!(plan.madds_per_row(), d * (d + 1) / 2);
                }
            }
            assert!(split, "no budget split the wide layer");
        }
    }
    // A layer of one source against a Gram reference (biased and debiased), via tiles.
    let src = f64_rows(&xs, &dims, n);
    let b = Budget::argument((pass_bytes(&dims, 64, Compute::F64) as f64 * 0.4) as u64).unwrap();
    let plan = plan_tiles(
        &shape(&dims, dims.len(), n as u64, Some(64), Compute::F64),
        &b,
    )
    .unwrap();
    assert!(
        plan.pieces.len() > dims.len(),
        "the 300-wide layer is split: {plan:?}"
    );
    let st = run_tiled(&src, &names, &plan, true, &b, &NoMonitor).unwrap();
    for debiased in [false, true] {
        let want = naive_cka(&xs[1], &xs[3], n, dims[1], dims[3], debiased);
        let got = st.cka_matrix(&[1], &[3], debiased).unwrap()[0];
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
}

#[test]
fn tiled_plan_errors() {
    // Too small for any plan: a memory error naming the minimum.
    let b = Budget::argument(10_000).unwrap();
    match plan_tiles(&shape(&[4096; 3], 3, 1 << 20, None, Compute::F32), &b) {
        Err(Error::Memory(msg)) => assert!(msg.contains("at least"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert!(PassShape::new(&[], 0, 10, None, Compute::F64).is_err());
    assert!(PassShape::new(&[4, 0], 2, 10, None, Compute::F64).is_err());
    assert!(PassShape::new(&[4, 4], 2, 10, Some(0), Compute::F64).is_err());
    // A 7B-sized model plans in a laptop's budget; every pass fits, FLOPs as one pass.
    let dims = [4096usize; 33];
    let b = Budget::argument(8 << 30).unwrap();
    let plan = plan_tiles(&shape(&dims, 33, 1 << 20, None, Compute::F32), &b).unwrap();
    assert!(plan.peak_bytes <= 8 << 30);
    let d = 33u128 * 4096;
    assert_eq!(plan.madds_per_row(), d * (d + 1) / 2);
    assert!(plan
        .layer_reads()
        .iter()
        .all(|&r| r as usize <= plan.groups.len()));
    // The chooser: single pass when it fits, tiles otherwise; forced strategies checked.
    let small = [8usize, 8];
    let un = Budget::unchecked();
    let p = PairPlan::choose(&shape(&small, 2, 100, None, Compute::F64), &un, None).unwrap();
    assert_eq!(
        (p.strategy(), p.passes(), p.block_rows()),
        ("single-pass", 1, 100)
    );
    let p = PairPlan::choose(&shape(&dims, 33, 1 << 20, None, Compute::F32), &b, None).unwrap();
    assert_eq!(p.strategy(), "tiled");
    assert!(matches!(
        PairPlan::choose(
            &shape(&dims, 33, 1 << 20, None, Compute::F32),
            &b,
            Some("single-pass")
        ),
        Err(Error::Memory(_))
    ));
    match PairPlan::choose(
        &shape(&small, 2, 100, None, Compute::F64),
        &un,
        Some("gramm"),
    ) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("tiled"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// The Gram route against the single pass: all Grams held, and rounds streaming Grams past a
/// held group (small budgets), within one source and across two; f64 and f32 products.
#[test]
fn gram_route_equals_the_single_pass() {
    use crate::monitor::NoMonitor;
    let n = 47usize;
    let dims = [60usize, 300, 7, 129];
    let xs = offset_layers(n, &dims, 70, 800.0);
    let x32 = to_f32(&xs);
    let names = layer_names(dims.len());
    for compute in [Compute::F64, Compute::F32] {
        let src = rows_in(&xs, &x32, &dims, n, compute);
        let single = single_pass(&src, &names, None, compute);
        let tol = if compute == Compute::F64 { 1e-10 } else { 1e-6 };
        let dmax = 300;
        for num_a in [dims.len(), 2] {
            // Everything held; then room for one held Gram and the streamed one.
            for held in [dims.len(), 1] {
                let b =
                    Budget::argument(gram_bytes(n, held, held < dims.len(), dmax, compute) as u64)
                        .unwrap();
                let plan =
                    GramPlan::new(&shape(&dims, num_a, n as u64, None, compute), &b).unwrap();
                assert_eq!(
                    plan.held,
                    held.min(if held < dims.len() { num_a } else { held })
                );
                let st = plan.run(&src, &names, true, &NoMonitor).unwrap();
                let (rows, cols) = sides(num_a, dims.len());
                let what = format!("{compute:?} {num_a} {held}");
                assert_cka_agree(&st, &single, (&rows, &cols), tol, &what);
            }
        }
    }
    // Too small: the minimum named.
    let b = Budget::argument(1000).unwrap();
    match GramPlan::new(&shape(&dims, 4, n as u64, None, Compute::F64), &b) {
        Err(Error::Memory(msg)) => assert!(msg.contains("at least"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // The chooser takes the Gram route when rows are few against the widths, the moments
    // when they are many.
    let un = Budget::unchecked();
    let p = PairPlan::choose(&shape(&[4096; 33], 33, 2048, None, Compute::F32), &un, None).unwrap();
    assert_eq!(p.strategy(), "gram");
    let p = PairPlan::choose(
        &shape(&[768; 13], 13, 1 << 20, None, Compute::F32),
        &un,
        None,
    )
    .unwrap();
    assert_eq!(p.strategy(), "single-pass");
}

#[test]
fn measured_rate_is_a_finite_positive_rate() {
    for compute in [Compute::F64, Compute::F32] {
        let r = measured_madds_per_s(compute, 0.0).unwrap();
        // three 512 × 1024 SYRKs: any machine that runs the tests does more than 1e7/s and
        // no two cores do 1e13/s
        assert!(r.is_finite() && r > 1e7 && r < 1e13, "{compute:?}: {r}");
    }
}

/// A plan cut into tasks over row ranges, each partial through bytes, merged left to right in
/// a tree, equals the local pass (single-pass and tiled plans, one and two sources, f64 and
/// f32), and the plan itself travels as JSON.
#[test]
fn row_range_tasks_merge_to_the_local_pass() {
    use crate::monitor::NoMonitor;
    let n = 203usize;
    let dims = [40usize, 300, 7, 129];
    let xs = offset_layers(n, &dims, 70, 800.0);
    let names = layer_names(dims.len());
    let src = f64_rows(&xs, &dims, n);
    let cuts = [0u64, 1, 64, 150, n as u64];
    for compute in [Compute::F64, Compute::F32] {
        for num_a in [dims.len(), 2] {
            let full = pass_bytes(&dims, 50, compute) as f64;
            let b = Budget::argument((full * 0.35) as u64).unwrap();
            let tiled = plan_tiles(&shape(&dims, num_a, n as u64, Some(50), compute), &b).unwrap();
            let single = TilePlan::single(&dims, num_a, 50, compute);
            for plan in [single, tiled] {
                let plan: TilePlan =
                    serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
                plan.validate().unwrap();
                let want =
                    run_tiled(&src, &names, &plan, true, &Budget::unchecked(), &NoMonitor).unwrap();
                let mut out = PairStatsBuilder::new(&plan, &names, n as u64).unwrap();
                for t in 0..plan.tiles.len() {
                    let shift = plan.tile_shift(&src, t).unwrap();
                    let parts: Vec<Vec<u8>> = cuts
                        .windows(2)
                        .map(|w| {
                            plan.run_tile(
                                &src,
                                &names,
                                t,
                                w[0]..w[1],
                                shift.as_deref(),
                                true,
                                &Budget::unchecked(),
                                &NoMonitor,
                            )
                            .unwrap()
                            .to_bytes()
                            .unwrap()
                        })
                        .collect();
                    // ((0 1) (2 3)): a tree of adjacent merges, the leaves added straight
                    // from their bytes, the root decoded and merged.
                    let ab = merge_partial_bytes(&parts[0], &parts[1]).unwrap();
                    let cd = merge_partial_bytes(&parts[2], &parts[3]).unwrap();
                    let mut a = TilePartial::from_bytes(&ab).unwrap();
                    a.merge(&TilePartial::from_bytes(&cd).unwrap()).unwrap();
                    // the same rows as merging the decoded partials one by one
                    let mut one = TilePartial::from_bytes(&parts[0]).unwrap();
                    for p in &parts[1..] {
                        one.merge(&TilePartial::from_bytes(p).unwrap()).unwrap();
                    }
                    assert_eq!(one.n(), a.n());
                    out.add(t, a).unwrap();
                }
                assert!(out.missing().is_empty());
                let got = out.finish().unwrap();
                let (rows, cols): (Vec<usize>, Vec<usize>) = if num_a == dims.len() {
                    ((0..4).collect(), (0..4).collect())
                } else {
                    ((0..num_a).collect(), (num_a..4).collect())
                };
                // Equal to the local pass: 1e-10 in f64, 1e-6 in f32 (each task's f32 sums
                // start at its own first row).
                let same = if compute == Compute::F64 { 1e-10 } else { 1e-6 };
                for debiased in [false, true] {
                    let g = got.cka_matrix(&rows, &cols, debiased).unwrap();
                    let w = want.cka_matrix(&rows, &cols, debiased).unwrap();
                    for (x, y) in g.iter().zip(&w) {
                        assert!((x - y).abs() < same, "{compute:?} {num_a}: {x} vs {y}");
                    }
                }
                // (the naive Gram formula is exact only without the offsets: layers 1, 3)
                let x = naive_cka(&xs[1], &xs[3], n, dims[1], dims[3], true);
                let v = got.cka_matrix(&[1], &[3], true).unwrap()[0];
                let tol = if compute == Compute::F64 { 1e-9 } else { 1e-6 };
                assert!(
                    (v - x).abs() < tol,
                    "{compute:?} {num_a} {}: {v} vs naive {x}",
                    plan.tiles.len()
                );
            }
        }
    }
}

#[test]
fn tile_partials_refuse_what_does_not_add_up() {
    use crate::monitor::NoMonitor;
    let n = 60usize;
    let dims = [30usize, 20];
    let xs: Vec<Vec<f64>> = dims.iter().map(|&d| data(n, d, 5, 3.0)).collect();
    let names = vec!["a".to_string(), "b".to_string()];
    let src = f64_rows(&xs, &dims, n);
    let b = Budget::argument((pass_bytes(&dims, 16, Compute::F64) as f64 * 0.9) as u64).unwrap();
    let plan = plan_tiles(&shape(&dims, 1, n as u64, Some(16), Compute::F64), &b).unwrap();
    let cross = (0..plan.tiles.len())
        .find(|&t| matches!(plan.tiles[t], Tile::Cross(..)))
        .expect("a cross tile");
    let run = |rows: std::ops::Range<u64>, shift: Option<&[f64]>| {
        plan.run_tile(
            &src,
            &names,
            cross,
            rows,
            shift,
            true,
            &Budget::unchecked(),
            &NoMonitor,
        )
    };
    let shift = plan.tile_shift(&src, cross).unwrap().unwrap();
    // Cross tiles merge only under one shift (each range's own first-block means differ).
    let mut p = run(0..30, None).unwrap();
    assert!(matches!(
        p.merge(&run(30..60, None).unwrap()),
        Err(Error::Mismatch(_))
    ));
    let mut p = run(0..30, Some(&shift)).unwrap();
    p.merge(&run(30..60, Some(&shift)).unwrap()).unwrap();
    // Serialised cross tiles: every truncation and a bad magic are format errors.
    let bytes = p.to_bytes().unwrap();
    for cut in [0, 7, 12, 40, bytes.len() - 1] {
        assert!(is_format_err(TilePartial::from_bytes(&bytes[..cut])));
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(is_format_err(TilePartial::from_bytes(&long)));
    // A range beyond the rows, a tile beyond the plan, a partial of too few rows.
    assert!(run(10..61, Some(&shift)).is_err());
    assert!(plan
        .run_tile(
            &src,
            &names,
            99,
            0..5,
            None,
            true,
            &Budget::unchecked(),
            &NoMonitor
        )
        .is_err());
    let mut out = PairStatsBuilder::new(&plan, &names, n as u64).unwrap();
    assert!(matches!(
        out.add(cross, run(0..30, Some(&shift)).unwrap()),
        Err(Error::Mismatch(_))
    ));
    assert!(out.finish().is_err(), "tiles missing");
    // A plan edited to nonsense is refused before any work.
    let mut badp = plan.clone();
    badp.pieces[0].cols = 0..31;
    assert!(badp.validate().is_err());
    // A non-finite value is named by its row in the source, not in the task's range.
    let mut bad = xs.clone();
    bad[1][45 * dims[1] + 3] = f64::NAN;
    let src2 = f64_rows(&bad, &dims, n);
    for t in 0..plan.tiles.len() {
        if !plan.tile_layers(t).unwrap().contains(&1) {
            continue;
        }
        match plan.run_tile(
            &src2,
            &names,
            t,
            30..60,
            Some(&shift).filter(|_| t == cross).map(|v| v.as_slice()),
            true,
            &Budget::unchecked(),
            &NoMonitor,
        ) {
            Err(Error::NonFinite(msg)) => assert!(msg.contains("row 45"), "{msg}"),
            other => panic!("tile {t}: {:?}", other.map(|p| p.n())),
        }
    }
    // With non-finite values let through, the first bad row survives a bytes merge as the
    // store's row (the second range's rows come after the first's).
    for t in 0..plan.tiles.len() {
        if !matches!(plan.tiles[t], Tile::Diag(_)) || !plan.tile_layers(t).unwrap().contains(&1) {
            continue;
        }
        let part = |rows: std::ops::Range<u64>| {
            plan.run_tile(
                &src2,
                &names,
                t,
                rows,
                None,
                false,
                &Budget::unchecked(),
                &NoMonitor,
            )
            .unwrap()
            .to_bytes()
            .unwrap()
        };
        let merged = merge_partial_bytes(&part(0..30), &part(30..60)).unwrap();
        let TilePartial::Diag(acc) = TilePartial::from_bytes(&merged).unwrap() else {
            panic!("a diagonal tile")
        };
        let m = acc.finalize().unwrap();
        let k = plan
            .tile_pieces(t)
            .unwrap()
            .iter()
            .position(|&p| plan.pieces[p].layer == 1);
        assert_eq!(m.nonfinite[k.unwrap()], Some(45));
        // and a bytes merge of malformed bytes is a format error
        assert!(is_format_err(merge_partial_bytes(&merged[..50], &merged)));
    }
    // A task over a tighter budget than the plan's is refused before reading a row.
    assert!(matches!(
        plan.run_tile(
            &src,
            &names,
            cross,
            0..n as u64,
            Some(&shift),
            true,
            &Budget::argument(1000).unwrap(),
            &NoMonitor
        ),
        Err(Error::Memory(_))
    ));
}

/// Two related layers (`y` a noisy function of `x`) at unit scale, row-major.
fn related(n: usize, dx: usize, dy: usize) -> (Vec<f64>, Vec<f64>) {
    let x = data(n, dx, 91, 0.0);
    let mut y = data(n, dy, 92, 0.0);
    for a in 0..n {
        for c in 0..dy {
            y[a * dy + c] = 0.3 * y[a * dy + c] + (x[a * dx + c % dx] * 1.7).tanh();
        }
    }
    (x, y)
}

/// Linear CKA (biased, debiased) of layers 0 and 1 through every route: the single pass, a
/// tiled pass (the wide layer split into pieces), the Gram route.
fn every_route(
    x: Vec<f64>,
    y: Vec<f64>,
    n: usize,
    dims: [usize; 2],
    as_f32: bool,
    compute: Compute,
) -> Vec<crate::error::Result<[f64; 2]>> {
    use crate::monitor::NoMonitor;
    use crate::store::stream::{ArrayLayer, ArrayRows};
    use crate::store::Values;
    let (x32, y32): (Vec<f32>, Vec<f32>) = (
        x.iter().map(|&v| v as f32).collect(),
        y.iter().map(|&v| v as f32).collect(),
    );
    let layer = |i: usize| {
        let v = match (as_f32, i) {
            (true, 0) => Values::F32(&x32),
            (true, _) => Values::F32(&y32),
            (false, 0) => Values::F64(&x),
            (false, _) => Values::F64(&y),
        };
        ArrayLayer::new(v, n, dims[i], dims[i]).unwrap()
    };
    let src = ArrayRows::new(vec![layer(0), layer(1)]).unwrap();
    let names = vec!["x".to_string(), "y".to_string()];
    let both = |st: crate::error::Result<PairStats>| -> crate::error::Result<[f64; 2]> {
        let st = st?;
        Ok([
            st.cka_matrix(&[0], &[1], false)?[0],
            st.cka_matrix(&[0], &[1], true)?[0],
        ])
    };
    let un = Budget::unchecked();
    let single = accumulate(&src, &names, Some(16), true, &un, compute, &NoMonitor)
        .and_then(|a| a.finalize())
        .and_then(|m| PairStats::from_moments(&m, &[0], &[1]));
    let b = Budget::argument((pass_bytes(&dims, 16, compute) as f64 * 0.3) as u64).unwrap();
    let plan = plan_tiles(&shape(&dims, 2, n as u64, Some(16), compute), &b).unwrap();
    assert!(plan.pieces.len() > 2, "the wide layer is split: {plan:?}");
    let tiled = run_tiled(&src, &names, &plan, true, &b, &NoMonitor);
    let gram = GramPlan::new(&shape(&dims, 2, n as u64, None, compute), &un)
        .and_then(|p| p.run(&src, &names, true, &NoMonitor));
    vec![both(single), both(tiled), both(gram)]
}

#[test]
fn every_route_is_right_at_any_scale() {
    let (n, dims) = (61usize, [9usize, 300]);
    let (x, y) = related(n, dims[0], dims[1]);
    let want = [
        naive_cka(&x, &y, n, dims[0], dims[1], false),
        naive_cka(&x, &y, n, dims[0], dims[1], true),
    ];
    // f64 data: 1e±200 and subnormal-adjacent scales; f32 data: beyond 1e±18 (exact powers
    // of two, so the data are the unit data scaled exactly)
    let cases: Vec<(f64, bool, Compute)> = vec![
        (1.0, false, Compute::F64),
        (2f64.powi(665), false, Compute::F64),  // ~1e200
        (2f64.powi(-665), false, Compute::F64), // ~1e-200
        (2f64.powi(-1000), false, Compute::F64),
        (2f64.powi(60), true, Compute::F32),  // ~1e18
        (2f64.powi(100), true, Compute::F32), // ~1e30
        (2f64.powi(-85), true, Compute::F32), // ~1e-25
        (2f64.powi(60), false, Compute::F32), // f64 data, f32 products
    ];
    for (s, as_f32, compute) in cases {
        let xs: Vec<f64> = x.iter().map(|v| v * s).collect();
        let tol = if compute == Compute::F32 { 2e-6 } else { 1e-10 };
        for (route, got) in ["single", "tiled", "gram"].iter().zip(every_route(
            xs,
            y.clone(),
            n,
            dims,
            as_f32,
            compute,
        )) {
            let got = got.unwrap_or_else(|e| panic!("{route} at {s:e} ({compute:?}): {e}"));
            for k in 0..2 {
                assert!(
                    (got[k] - want[k]).abs() <= tol,
                    "{route} at {s:e} ({compute:?}, f32 data {as_f32}): {:?} vs {want:?}",
                    got
                );
            }
        }
    }
}

#[test]
fn outliers_fall_back_to_f64_or_are_an_error_never_a_wrong_number() {
    let (n, dims) = (61usize, [9usize, 300]);
    let (mut x, y) = related(n, dims[0], dims[1]);
    // One finite f32 outlier near f32's limit (a flipped exponent bit): the f32 products of
    // its block would overflow; those blocks are done in f64 — the same CKA as f64 products.
    x[5 * dims[0] + 2] = 9.9e37;
    let x32: Vec<f64> = x.iter().map(|&v| f64::from(v as f32)).collect();
    let y32: Vec<f64> = y.iter().map(|&v| f64::from(v as f32)).collect();
    let want = [
        naive_cka(&x32, &y32, n, dims[0], dims[1], false),
        naive_cka(&x32, &y32, n, dims[0], dims[1], true),
    ];
    for (route, got) in ["single", "tiled", "gram"].iter().zip(every_route(
        x32.clone(),
        y32.clone(),
        n,
        dims,
        true,
        Compute::F32,
    )) {
        let got = got.unwrap();
        // f32 products for the unit layer (the Gram route's f32 Gram entries are not
        // averaged over rows: the usual f32 accuracy, 1e-6)
        assert!(
            (got[0] - want[0]).abs() <= 1e-6 * want[0].abs(),
            "{route}: {got:?} vs {want:?}"
        );
        // The debiased self-HSIC of a layer that one row dominates is the difference of
        // sums equal to ~15 digits (the diagonal excluded): not computable from the moments;
        // NaN by the estimator's rule, never a number that looks right.
        assert!(
            got[1].is_nan() || (got[1] - want[1]).abs() <= 1e-6,
            "{route}: {got:?} vs {want:?}"
        );
    }
    // An f64 outlier whose square is beyond f64 (unit rows around it). Where the unit is
    // chosen from rows that hold it (the single pass's first block, whose deviations from the
    // sampled shift feel it; the tiles' sample; the Gram route's whole layer) the answer is
    // right; where it comes later than the rows that chose the unit, an error naming the
    // layer (allowed for the single pass when the outlier is not in its first block) —
    // never a NaN or 0.
    let s = 2f64.powi(-664);
    for (row, single_ok) in [(5usize, true), (50, false)] {
        let (mut xo, mut xr) = (x.clone(), x.clone());
        xo[row * dims[0] + 2] = 1e200;
        xr.iter_mut().for_each(|v| *v *= s);
        xr[row * dims[0] + 2] = 1e200 * s;
        let want = naive_cka(&xr, &y, n, dims[0], dims[1], false);
        let res = every_route(xo, y.clone(), n, dims, false, Compute::F64);
        for (k, (route, got)) in ["single", "tiled", "gram"].iter().zip(&res).enumerate() {
            match got {
                Ok(v) => {
                    assert!(
                        (v[0] - want).abs() <= 1e-9 * want,
                        "{route} {row}: {v:?} vs {want}"
                    )
                }
                Err(Error::NonFinite(msg)) if k == 0 && !single_ok => {
                    assert!(msg.contains("\"x\"") && msg.contains("overflow"), "{msg}")
                }
                other => panic!("{route} {row}: {other:?}"),
            }
        }
    }
}

#[test]
fn scaled_accumulators_merge_and_serialise_exactly() {
    let (n, dims) = (40usize, [6usize, 5]);
    let (x, y) = related(n, dims[0], dims[1]);
    // the halves choose different exponents (their first blocks differ by 2^5)
    let s = 2f64.powi(300);
    let mut xs: Vec<f64> = x.iter().map(|v| v * s).collect();
    for v in &mut xs[20 * dims[0]..] {
        *v *= 32.0;
    }
    let mut whole = MomentAccumulator::new(&dims).unwrap();
    whole.update(&[&xs[..], &y[..]], n).unwrap();
    let half = |r: std::ops::Range<usize>| {
        let mut a = MomentAccumulator::new(&dims).unwrap();
        a.update(
            &[
                &xs[r.start * dims[0]..r.end * dims[0]],
                &y[r.start * dims[1]..r.end * dims[1]],
            ],
            r.len(),
        )
        .unwrap();
        a
    };
    let (mut a, b) = (half(0..20), half(20..n));
    assert_ne!(a.scale_exps(), b.scale_exps());
    assert_eq!(a.scale_exps()[1], 0, "the unit layer is not scaled");
    let b2 = MomentAccumulator::from_bytes(&b.to_bytes().unwrap()).unwrap();
    assert_eq!(b2.scale_exps(), b.scale_exps());
    a.merge(&b2).unwrap();
    let (mw, mm) = (whole.finalize().unwrap(), a.finalize().unwrap());
    assert_ne!(
        mw.scale_exp, mm.scale_exp,
        "the merge keeps the first half's units"
    );
    for deb in [false, true] {
        let (p, q) = (mw.cka(0, 1, deb).unwrap(), mm.cka(0, 1, deb).unwrap());
        assert!((p - q).abs() < 1e-12, "{p} vs {q}");
    }
    // the means are in the data's units; the blocks back through the unscaled accessor
    let mean0 = xs.iter().step_by(dims[0]).sum::<f64>() / n as f64;
    assert!((mm.layer_mean(0).unwrap()[0] / mean0 - 1.0).abs() < 1e-12);
    let c00 = mm.block_unscaled(0, 0).unwrap()[0];
    let direct: f64 = xs
        .iter()
        .step_by(dims[0])
        .map(|v| (v - mean0) * (v - mean0))
        .sum();
    assert!((c00 / direct - 1.0).abs() < 1e-12, "{c00} vs {direct}");
    // a value whose square is beyond f64 after the unit was set (hand-fed blocks, no
    // sampled shift): an error naming the layer at finalize, not NaN
    let mut late = MomentAccumulator::new(&dims).unwrap();
    late.update(&[&x[..10 * dims[0]], &y[..10 * dims[1]]], 10)
        .unwrap();
    let mut x2 = x[10 * dims[0]..20 * dims[0]].to_vec();
    x2[3] = 1e200;
    late.update(&[&x2[..], &y[10 * dims[1]..20 * dims[1]]], 10)
        .unwrap();
    match late.finalize() {
        Err(Error::NonFinite(msg)) => assert!(msg.contains("layer0"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // ordinary data: no scaling at all (the same bits as before scaling existed)
    let mut plain = MomentAccumulator::new(&dims).unwrap();
    plain.update(&[&x[..], &y[..]], n).unwrap();
    assert_eq!(plain.scale_exps(), vec![0, 0]);
    assert!(plain.set_scale(&[1, 2]).is_err(), "set after rows");
    let mut manual = MomentAccumulator::new(&dims).unwrap();
    assert!(manual.set_scale(&[1]).is_err() && manual.set_scale(&[2000, 0]).is_err());
}

#[test]
fn scale_exponents_are_zero_within_the_band() {
    assert_eq!(scale_exponent(1.0), 0);
    assert_eq!(scale_exponent(2f64.powi(40) * 1.5), 0);
    assert_eq!(scale_exponent(2f64.powi(41)), 41);
    assert_eq!(scale_exponent(2f64.powi(-41) * 1.5), -41);
    assert_eq!(scale_exponent(1e300), 996);
    assert_eq!(scale_exponent(f64::MIN_POSITIVE / 4.0), -1000); // clamped
    assert_eq!(scale_exponent(0.0), 0);
    assert_eq!(scale_exponent(f64::NAN), 0);
    assert_eq!(scale_exponent(f64::INFINITY), 0);
    assert_eq!(ldexp(3.0, 2000), f64::INFINITY);
    assert_eq!(ldexp(ldexp(3.0, -1030), 1030), 3.0);
    assert_eq!(ldexp(1.0, -1074), f64::from_bits(1));
    assert_eq!(ldexp(3.0, -1080), 0.0);
}

/// Sums computed by another engine (here: naively, in the test, from the layout the plan
/// gives) made into each tile's partial give the local pass's statistics — single-pass and
/// tiled plans (diagonal and cross tiles, split layers), one and two sources, scaled layers —
/// and serialise and merge with the core's own partials of the same tile.
#[test]
fn sums_computed_elsewhere_make_the_same_tiles() {
    use crate::monitor::NoMonitor;
    let n = 97usize;
    let dims = [40usize, 300, 7, 129];
    let mut xs = offset_layers(n, &dims, 90, 500.0);
    for v in xs[2].iter_mut() {
        *v *= 1e30; // a layer that is scaled (2^-e) on every route
    }
    let names = layer_names(dims.len());
    let src = f64_rows(&xs, &dims, n);
    for num_a in [dims.len(), 2] {
        let full = pass_bytes(&dims, 50, Compute::F64) as f64;
        let b = Budget::argument((full * 0.35) as u64).unwrap();
        let tiled = plan_tiles(&shape(&dims, num_a, n as u64, Some(50), Compute::F64), &b).unwrap();
        assert!(tiled.tiles.iter().any(|t| matches!(t, Tile::Cross(..))));
        for plan in [TilePlan::single(&dims, num_a, 50, Compute::F64), tiled] {
            let want =
                run_tiled(&src, &names, &plan, true, &Budget::unchecked(), &NoMonitor).unwrap();
            let mut out = PairStatsBuilder::new(&plan, &names, n as u64).unwrap();
            for t in 0..plan.tiles.len() {
                let (pieces, kind) = plan.tile_layout(t).unwrap();
                let shift = plan.tile_shift(&src, t).unwrap().unwrap();
                let exps = plan.tile_scale(&src, t).unwrap();
                // w = [u, r] per row, u = (x − μ0)·2^-e per piece, r = ‖u_p‖²
                let d: usize = pieces.iter().map(|(_, c)| c.len()).sum();
                let lp = pieces.len();
                // rows 40.. here, rows ..40 by the core's own task
                let w: Vec<Vec<f64>> = (40..n)
                    .map(|a| {
                        let mut u = Vec::with_capacity(d + lp);
                        let mut r = Vec::with_capacity(lp);
                        for (p, (l, cols)) in pieces.iter().enumerate() {
                            let f = ldexp(1.0, -exps[p]);
                            let mut s = 0.0;
                            for c in cols.clone() {
                                let v = (xs[*l][a * dims[*l] + c] - shift[u.len()]) * f;
                                s += v * v;
                                u.push(v);
                            }
                            r.push(s);
                        }
                        u.extend(r);
                        u
                    })
                    .collect();
                // column indices of w of each side
                let (ca, cb): (Vec<usize>, Vec<usize>) = match kind {
                    None => ((0..d + lp).collect(), (0..d + lp).collect()),
                    Some(na) => {
                        let da: usize = pieces[..na].iter().map(|(_, c)| c.len()).sum();
                        let a = (0..da).chain(d..d + na).collect();
                        let b = (da..d).chain(d + na..d + lp).collect();
                        (a, b)
                    }
                };
                let mut products = Vec::with_capacity(ca.len() * cb.len());
                for &i in &ca {
                    for &j in &cb {
                        products.push(w.iter().map(|r| r[i] * r[j]).sum::<f64>());
                    }
                }
                let sums: Vec<f64> = (0..d + lp).map(|c| w.iter().map(|r| r[c]).sum()).collect();
                let nonfinite = vec![None; lp];
                let x = ExternalSums {
                    n: (n - 40) as u64,
                    shift: &shift,
                    exps: &exps,
                    products: &products,
                    sums: &sums,
                    nonfinite: &nonfinite,
                    check_finite: true,
                };
                let part = plan.partial_from_sums(&names, t, &x).unwrap();
                // it travels and merges as the core's own partial of the tile
                let bytes = part.to_bytes().unwrap();
                let own = plan
                    .run_tile(
                        &src,
                        &names,
                        t,
                        0..40,
                        Some(&shift),
                        true,
                        &Budget::unchecked(),
                        &NoMonitor,
                    )
                    .unwrap()
                    .to_bytes()
                    .unwrap();
                let merged = merge_partial_bytes(&own, &bytes).unwrap();
                assert_eq!(TilePartial::from_bytes(&merged).unwrap().n(), n as u64);
                out.add(t, TilePartial::from_bytes(&merged).unwrap())
                    .unwrap();
                // a wrong size is a typed error, not a panic
                let short = ExternalSums {
                    products: &products[1..],
                    ..x.clone()
                };
                assert!(matches!(
                    plan.partial_from_sums(&names, t, &short),
                    Err(Error::Mismatch(_))
                ));
            }
            let got = out.finish().unwrap();
            let (rows, cols): (Vec<usize>, Vec<usize>) = if num_a == dims.len() {
                ((0..4).collect(), (0..4).collect())
            } else {
                ((0..num_a).collect(), (num_a..4).collect())
            };
            for debiased in [false, true] {
                let g = got.cka_matrix(&rows, &cols, debiased).unwrap();
                let w = want.cka_matrix(&rows, &cols, debiased).unwrap();
                for (x, y) in g.iter().zip(&w) {
                    assert!(
                        (x - y).abs() < 1e-10,
                        "{num_a} {}: {x} vs {y}",
                        plan.tiles.len()
                    );
                }
            }
        }
    }
}
