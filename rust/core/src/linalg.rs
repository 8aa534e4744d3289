//! Small dense linear-algebra helpers on top of faer (row-major / column-major `f64`
//! buffers in, out). Shared by the moment engine and the measures built on it.
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};

/// Upper triangle (diagonal included) of `dst (+)= WᵀW` for the row-major `m × k` matrix `W`
/// stored in `w` (= the column-major `k × m` matrix `wt`; `dst += wt · wtᵀ` with
/// [`Accum::Add`], `dst = …` with [`Accum::Replace`]). `dst` is a column-major `k × k`
/// buffer; only its upper triangle is touched (SYRK-like: half the flops of a full
/// product). f64 or f32 (sums in the element type).
pub fn syrk_upper<T>(dst: &mut [T], w: &[T], k: usize, m: usize, accum: Accum, par: Par)
where
    T: faer::traits::ComplexField + Copy + From<f32>,
{
    debug_assert_eq!(dst.len(), k * k);
    debug_assert_eq!(w.len(), k * m);
    if k == 0 || m == 0 {
        return;
    }
    let wt = MatRef::from_column_major_slice(w, k, m);
    let d = MatMut::from_column_major_slice_mut(dst, k, k);
    tri_matmul(
        d,
        BlockStructure::TriangularUpper,
        accum,
        wt,
        BlockStructure::Rectangular,
        wt.transpose(),
        BlockStructure::Rectangular,
        T::from(1.0f32),
        par,
    );
}

/// Copy the upper triangle of the column-major square `k × k` buffer onto its lower triangle.
pub fn symmetrize_from_upper(a: &mut [f64], k: usize) {
    for j in 0..k {
        for i in 0..j {
            a[i * k + j] = a[j * k + i];
        }
    }
}

/// `g = x xᵀ` for the row-major `m × d` matrix `x` (a Gram matrix), as a row-major (= column
/// major, it is symmetric) `m × m` buffer.
pub fn gram(x: &[f64], m: usize, d: usize, par: Par) -> Vec<f64> {
    let mut g = vec![0.0; m * m];
    if m == 0 {
        return g;
    }
    if d > 0 {
        // Row-major m×d is column-major d×m: xt. g = xtᵀ xt.
        let xt = MatRef::from_column_major_slice(x, d, m);
        let gm = MatMut::from_column_major_slice_mut(&mut g, m, m);
        tri_matmul(
            gm,
            BlockStructure::TriangularUpper,
            Accum::Replace,
            xt.transpose(),
            BlockStructure::Rectangular,
            xt,
            BlockStructure::Rectangular,
            1.0,
            par,
        );
    }
    symmetrize_from_upper(&mut g, m);
    g
}

/// Squared Frobenius norm of the sub-block `rows × cols` of the column-major `k × k` buffer.
pub fn block_sq_norm(
    a: &[f64],
    k: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> f64 {
    let mut s = 0.0;
    for j in cols {
        let col = &a[j * k + rows.start..j * k + rows.end];
        s += col.iter().map(|v| v * v).sum::<f64>();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syrk_matches_naive() {
        let (m, k) = (7, 5);
        let w: Vec<f64> = (0..m * k).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let mut dst = vec![0.0; k * k];
        syrk_upper(&mut dst, &w, k, m, Accum::Add, Par::Seq);
        symmetrize_from_upper(&mut dst, k);
        for i in 0..k {
            for j in 0..k {
                let want: f64 = (0..m).map(|a| w[a * k + i] * w[a * k + j]).sum();
                assert!((dst[j * k + i] - want).abs() < 1e-12);
            }
        }
        let g = gram(&w, m, k, Par::Seq);
        for a in 0..m {
            for b in 0..m {
                let want: f64 = (0..k).map(|i| w[a * k + i] * w[b * k + i]).sum();
                assert!((g[a * m + b] - want).abs() < 1e-12);
            }
        }
    }
}
