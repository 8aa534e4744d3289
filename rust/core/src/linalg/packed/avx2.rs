//! The AVX2 + FMA micro-kernels of the packed products (x86-64; see `mod.rs`).
use std::arch::x86_64::*;
use std::sync::OnceLock;

pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// 16 × 6 f32 tile: 12 accumulators (2 × 8 lanes × 6 columns), widened to f64 at the end.
///
/// # Safety
/// AVX2 + FMA present; pointer contract of [`super::Kernel`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn micro_f32(kc: usize, a: *const f32, b: *const f32, c: *mut f64, ldc: usize) {
    // The C tile (6 columns × 128 bytes) is usually not cached: fetch it while the first
    // chain of FMAs runs instead of stalling on it in the epilogue.
    for j in 0..6 {
        // SAFETY: prefetching never faults; the addresses are inside the tile anyway.
        unsafe {
            let col = c.add(j * ldc);
            _mm_prefetch::<_MM_HINT_T0>(col.cast());
            _mm_prefetch::<_MM_HINT_T0>(col.add(8).cast());
            _mm_prefetch::<_MM_HINT_T0>(col.add(15).cast());
        }
    }
    let mut p0 = 0;
    while p0 < kc {
        let p1 = kc.min(p0 + <f32 as super::PackedElem>::CHAIN);
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        for p in p0..p1 {
            // SAFETY: p < kc; a has kc·16 and b kc·6 values.
            let (a0, a1, bp) = unsafe {
                let ap = a.add(p * 16);
                (
                    _mm256_loadu_ps(ap),
                    _mm256_loadu_ps(ap.add(8)),
                    b.add(p * 6),
                )
            };
            for (j, cj) in acc.iter_mut().enumerate() {
                // SAFETY: j < 6.
                let bj = unsafe { _mm256_broadcast_ss(&*bp.add(j)) };
                cj[0] = _mm256_fmadd_ps(a0, bj, cj[0]);
                cj[1] = _mm256_fmadd_ps(a1, bj, cj[1]);
            }
        }
        for (j, cj) in acc.iter().enumerate() {
            for (h, v) in cj.iter().enumerate() {
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(*v));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(*v));
                // SAFETY: rows h·8 .. h·8+8 of column j of the 16 × 6 tile.
                unsafe {
                    let p = c.add(j * ldc + h * 8);
                    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo));
                    _mm256_storeu_pd(p.add(4), _mm256_add_pd(_mm256_loadu_pd(p.add(4)), hi));
                }
            }
        }
        p0 = p1;
    }
}

f64_micro!(
    "avx2,fma",
    4,
    6,
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    _mm256_storeu_pd,
    _mm256_add_pd
);
