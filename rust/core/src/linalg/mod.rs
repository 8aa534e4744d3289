//! Small dense linear-algebra helpers (row-major / column-major `f64` buffers in, out) and
//! the packed SYRK kernel ([`packed`]). Shared by the moment engine and the measures built on it.
pub mod packed;
pub mod roofline;

use rayon::prelude::*;

/// A `Vec` of `len` default values (zeros) for large buffers (the moment accumulator, block
/// and panel buffers): on Linux the range is advised for transparent huge pages before it is
/// first touched, and the values are written (in parallel) rather than left to `calloc`'s
/// shared zero page — so the SYRK's first read-then-write of each page is not a
/// copy-on-write fault with a TLB shootdown, and column-strided access needs ~500× fewer TLB
/// entries. Values are identical either way.
/// A refused allocation is an [`crate::Error::Memory`] naming `what` (never an abort).
pub fn hinted_vec<T: Copy + Default + Send + Sync>(
    len: usize,
    what: impl std::fmt::Display,
) -> crate::Result<Vec<T>> {
    let mut v: Vec<T> = crate::memory::try_with_capacity(len, what)?;
    advise_huge_pages(v.as_mut_ptr().cast(), len * std::mem::size_of::<T>());
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 15)
        .for_each(|c| {
            for x in c {
                x.write(T::default());
            }
        });
    // SAFETY: all `len` elements were initialised just above (capacity ≥ len).
    unsafe { v.set_len(len) };
    Ok(v)
}

/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned interior of `[ptr, ptr + bytes)` (a hint:
/// failures are ignored, results never depend on it). No-op off Linux and below 4 MiB.
fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if bytes < 2 * HUGE {
            return;
        }
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside one live allocation owned by the caller;
            // MADV_HUGEPAGE changes no contents and no permissions.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
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
pub fn gram(x: &[f64], m: usize, d: usize) -> crate::Result<Vec<f64>> {
    let mut g = crate::memory::try_vec(m * m, 0.0, format_args!("a {m} × {m} Gram matrix"))?;
    if m == 0 {
        return Ok(g);
    }
    // g = UᵀU for U = xᵀ (d × m): element (feature p, row c) = x[c·d + p].
    let view = packed::Strided {
        u: x,
        k: d,
        n: m,
        rs: 1,
        cs: d,
    };
    packed::syrk_upper_add(&mut g, m, view, &mut Vec::new())?;
    symmetrize_from_upper(&mut g, m);
    Ok(g)
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
    fn gram_matches_naive() {
        let (m, k) = (7, 5);
        let w: Vec<f64> = (0..m * k).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let g = gram(&w, m, k).unwrap();
        for a in 0..m {
            for b in 0..m {
                let want: f64 = (0..k).map(|i| w[a * k + i] * w[b * k + i]).sum();
                assert!((g[a * m + b] - want).abs() < 1e-12);
            }
        }
    }
}
