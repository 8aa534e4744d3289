//! The AVX-512 micro-kernels of the packed products (x86-64; see `mod.rs`).
use std::arch::x86_64::*;
use std::sync::OnceLock;

pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl"))
}

/// The upper 8 lanes of a 16-lane f32 vector (AVX-512F only; `extractf32x8` is DQ).
#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
fn hi8(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// 32 × 12 f32 tile: 24 accumulators (2 × 16 lanes × 12 columns, of the 32 registers),
/// widened to f64 and added into `C` every `CHAIN` rows.
///
/// # Safety
/// AVX-512F present; the pointer contract of [`super::Kernel`].
#[target_feature(enable = "avx512f,avx512vl")]
pub unsafe fn micro_f32(kc: usize, a: *const f32, b: *const f32, c: *mut f64, ldc: usize) {
    // The C tile (12 columns × 256 bytes) is usually not cached: fetch it while the
    // first chain of FMAs runs.
    for j in 0..12 {
        // SAFETY: prefetching never faults; the addresses are inside the tile anyway.
        unsafe {
            let col = c.add(j * ldc);
            for q in [0, 8, 16, 24, 31] {
                _mm_prefetch::<_MM_HINT_T0>(col.add(q).cast());
            }
        }
    }
    let chain = <f32 as super::PackedElem>::CHAIN;
    let mut p0 = 0;
    while p0 < kc {
        let len = chain.min(kc - p0);
        // SAFETY: rows p0 .. p0 + len of the packed panels; the same tile.
        unsafe { chain_f32(len, a.add(p0 * 32), b.add(p0 * 12), c, ldc) };
        p0 += len;
    }
}

/// One chain of [`micro_f32`]: `len ≤ CHAIN` rows summed in f32 registers, then added
/// into the f64 tile. A function of its own with named accumulators: with the chain
/// loop around it and the accumulators in an array, LLVM kept only 19 vector registers
/// and spilled 9 of the 24 accumulators around every FMA (0.45× the rate).
///
/// # Safety
/// As [`micro_f32`], for `len` rows.
#[inline(never)]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn chain_f32(len: usize, a: *const f32, b: *const f32, c: *mut f64, ldc: usize) {
    // One named register pair per column (`(ca, cb, j)`: rows 0..16 and 16..32 of
    // column j), written once here and expanded by `tile!`.
    macro_rules! tile {
        ($(($ca:ident, $cb:ident, $j:literal))+) => {{
            $(let (mut $ca, mut $cb) = (_mm512_setzero_ps(), _mm512_setzero_ps());)+
            for p in 0..len {
                // SAFETY: p < len; a has len·32 and b len·12 values.
                unsafe {
                    let ap = a.add(p * 32);
                    let (a0, a1) = (_mm512_loadu_ps(ap), _mm512_loadu_ps(ap.add(16)));
                    let bp = b.add(p * 12);
                    $(
                        let bj = _mm512_set1_ps(*bp.add($j));
                        $ca = _mm512_fmadd_ps(a0, bj, $ca);
                        $cb = _mm512_fmadd_ps(a1, bj, $cb);
                    )+
                }
            }
            [$([$ca, $cb]),+]
        }};
    }
    let acc = tile! {
        (c0a, c0b, 0) (c1a, c1b, 1) (c2a, c2b, 2) (c3a, c3b, 3) (c4a, c4b, 4) (c5a, c5b, 5)
        (c6a, c6b, 6) (c7a, c7b, 7) (c8a, c8b, 8) (c9a, c9b, 9) (c10a, c10b, 10) (c11a, c11b, 11)
    };
    for (j, cj) in acc.iter().enumerate() {
        for (h, v) in cj.iter().enumerate() {
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(*v));
            let hi = _mm512_cvtps_pd(hi8(*v));
            // SAFETY: rows h·16 .. h·16+16 of column j of the 32 × 12 tile.
            unsafe {
                let p = c.add(j * ldc + h * 16);
                _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
                _mm512_storeu_pd(p.add(8), _mm512_add_pd(_mm512_loadu_pd(p.add(8)), hi));
            }
        }
    }
}

f64_micro!(
    "avx512f,avx512vl",
    8,
    12,
    _mm512_setzero_pd,
    _mm512_loadu_pd,
    _mm512_set1_pd,
    _mm512_fmadd_pd,
    _mm512_storeu_pd,
    _mm512_add_pd
);
