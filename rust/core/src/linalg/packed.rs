//! Packed SYRK and GEMM: the upper triangle (diagonal included) of `C += UᵀU` for a strided
//! `k × n` matrix `U` ([`syrk_upper_add`]), or all of `C += AᵀB` ([`gemm_tn_add`]: the cross
//! block of a tiled pass), products in `T` (f32 or f64), the result **added into an f64**
//! column-major `C`. This is the moment engine's one hot loop (`n · D²` multiply-adds per pass).
//!
//! # Why not faer's triangular matmul
//! On AVX2 machines faer 0.24 reaches about 55 % of OpenBLAS's sgemm (measured on the
//! project's 2-core EPYC: 80–89 GFLOP/s against 140), and its f32 path needs an f32 `D × D`
//! staging buffer (400 MB at D = 9984) that is then added into the f64 accumulator. Here the
//! f32 register accumulators of each micro-tile are widened to f64 and added into `C`
//! directly by the micro-kernel every [`PackedElem::CHAIN`] rows (128 for f32): no staging
//! buffer, and no f32 sum longer than 128 terms.
//!
//! # Structure (BLIS, Van Zee & van de Geijn 2015)
//! For each slice of [`PackedElem::KC`] rows of `U`: pack all `NR`-column panels and all
//! `MR`-column panels of the slice once (shared, read-only; `U` is symmetric in its two
//! roles), then in parallel over macro tiles `(MC rows) × (NC columns)` of the upper
//! triangle run the `MR × NR` micro-kernel over every micro-tile that holds an element on or
//! above the diagonal (the tile's `MC × KC` A-panels stay in L2 across its columns). Macro tiles of one slice write disjoint parts of `C`; slices run one after the
//! other (so `C`'s f64 values are read and written once per slice).
//!
//! Micro-kernels: AVX2 + FMA (`16 × 6` f32, `8 × 6` f64; detected at run time) or a portable
//! Rust one with the same blocking (same summation order per micro-tile, so results differ
//! between the two only by FMA's single rounding).
use rayon::prelude::*;

/// Element types the packed SYRK multiplies in.
pub trait PackedElem: Copy + Send + Sync + Default + 'static {
    /// Micro-tile rows (contiguous in `C`).
    const MR: usize;
    /// Micro-tile columns.
    const NR: usize;
    /// Rows of `U` per slice (`C` is read and written once per slice).
    const KC: usize;
    /// Longest sum carried in `T` registers: every `CHAIN` rows the micro-kernel adds its
    /// accumulators into the (L1-resident) f64 tile and restarts them.
    const CHAIN: usize;
    /// Macro-tile rows (one thread-local packed block of `MC × KC`).
    const MC: usize;
    /// Macro-tile columns.
    const NC: usize;
    /// `c[j·ldc + i] += Σ_p a[p·MR + i] · b[p·NR + j]` for the full `MR × NR` tile.
    ///
    /// # Safety
    /// `a` holds `kc·MR`, `b` `kc·NR` readable elements; `c` addresses an `MR × NR` tile
    /// with column stride `ldc`, valid for reads and writes and not aliased elsewhere.
    unsafe fn micro(kc: usize, a: *const Self, b: *const Self, c: *mut f64, ldc: usize);
}

/// A raw pointer to `C` shared by the macro-tile tasks (which write disjoint tiles).
#[derive(Clone, Copy)]
struct CPtr(*mut f64);
// SAFETY: tasks dereference it only for the disjoint tiles they own, between barriers.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// `C + off` (a method, so that closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `off` is inside `C`.
    unsafe fn at(self, off: usize) -> *mut f64 {
        // SAFETY: the caller keeps `off` inside the buffer.
        unsafe { self.0.add(off) }
    }
}

/// A strided view of the `k × n` matrix `U`: element `(p, c)` is `u[p·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    pub u: &'a [T],
    pub k: usize,
    pub n: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<T: Copy + Default> Strided<'_, T> {
    fn check(&self) {
        if self.k > 0 && self.n > 0 {
            let last = (self.k - 1) * self.rs + (self.n - 1) * self.cs;
            assert!(last < self.u.len(), "packed syrk: U view out of bounds");
        }
    }

    /// `dst[p·W + j] = U(p0 + p, c0 + j)` for `p < kc`, `j < W` (zero past column `n`).
    fn pack<const W: usize>(&self, dst: &mut [T], p0: usize, kc: usize, c0: usize) {
        let w = W.min(self.n - c0);
        for (p, out) in dst[..kc * W].chunks_exact_mut(W).enumerate() {
            let base = (p0 + p) * self.rs + c0 * self.cs;
            if self.cs == 1 && w == W {
                // Fixed-size copy: inlined as vector moves (a memcpy call per 24–64 bytes
                // cost ~7 % of a pass).
                let src: &[T; W] = self.u[base..base + W].try_into().expect("W elements");
                let dst: &mut [T; W] = out.try_into().expect("W elements");
                *dst = *src;
                continue;
            } else if self.cs == 1 {
                out[..w].copy_from_slice(&self.u[base..base + w]);
            } else {
                for (j, o) in out[..w].iter_mut().enumerate() {
                    *o = self.u[base + j * self.cs];
                }
            }
            out[w..].fill(T::default());
        }
    }
}

/// Upper triangle (diagonal included) of `C += UᵀU`; `C` is column-major `n × n` inside a
/// buffer with column stride `ldc ≥ n`. Entries below the diagonal are not touched.
/// `pack` is a reusable buffer (its contents are overwritten; it grows to `2·n·KC` values;
/// a refused allocation of it is an [`crate::Error::Memory`]).
pub fn syrk_upper_add<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    u: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, u, u, true, pack, T::micro)
}

/// [`syrk_upper_add`] with the portable micro-kernel (tests compare both).
pub fn syrk_upper_add_portable<T: PackedElem + Portable>(
    c: &mut [f64],
    ldc: usize,
    u: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, u, u, true, pack, T::micro_portable)
}

/// `C += AᵀB` for strided `k × m` `A` and `k × n` `B` (the same `k`); `C` is column-major
/// `m × n` with column stride `ldc ≥ m`. The same kernel as [`syrk_upper_add`] (products in
/// `T`, sums of at most [`PackedElem::CHAIN`] terms in `T`, added into the f64 `C`), over
/// every tile: the cross block of two groups of columns. `pack` grows to `(m + n)·KC`.
pub fn gemm_tn_add<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, a, b, false, pack, T::micro)
}

/// [`gemm_tn_add`] with the portable micro-kernel (tests compare both).
pub fn gemm_tn_add_portable<T: PackedElem + Portable>(
    c: &mut [f64],
    ldc: usize,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, a, b, false, pack, T::micro_portable)
}

type Micro<T> = unsafe fn(usize, *const T, *const T, *mut f64, usize);

/// `C += AᵀB` (`C` is `m × n`, `m = a.n`, `n = b.n`); with `upper` (SYRK: `a` and `b` are
/// the same view) only the tiles holding an element on or above the diagonal are computed
/// and only those elements written.
fn product_with<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    upper: bool,
    pack: &mut Vec<T>,
    micro: Micro<T>,
) -> crate::Result<()> {
    let (k, m, n) = (a.k, a.n, b.n);
    assert_eq!(
        a.k, b.k,
        "packed product: A and B have different row counts"
    );
    if k == 0 || n == 0 || m == 0 {
        return Ok(());
    }
    a.check();
    b.check();
    assert!(
        ldc >= m && c.len() >= (n - 1) * ldc + m,
        "packed product: C too small"
    );
    // Slices of KC rows (fewer when U has fewer: the panels are sized by the slice).
    let (mr, nr, kcap, mc, nc) = (T::MR, T::NR, T::KC.min(k), T::MC, T::NC);
    debug_assert!(mc % mr == 0 && nc % nr == 0);
    // Packed panels of one slice: all NR-column panels (B side) and all MR-column panels
    // (A side), each packed once per slice.
    let b_len = n.div_ceil(nr) * nr * kcap;
    let a_len = m.div_ceil(mr) * mr * kcap;
    if pack.len() < a_len + b_len {
        *pack = Vec::new();
        *pack = super::hinted_vec(a_len + b_len, "the packed panels of the SYRK")?;
    }
    let (ap_all, bp_all) = pack[..a_len + b_len].split_at_mut(a_len);
    let cp = CPtr(c.as_mut_ptr());
    // Macro tiles (with upper: those with an element on or above the diagonal, i.e. row
    // start < col end).
    let tasks: Vec<(usize, usize)> = (0..n.div_ceil(nc))
        .flat_map(|jb| {
            let j_end = ((jb + 1) * nc).min(n);
            (0..m.div_ceil(mc))
                .filter(move |ib| !upper || ib * mc < j_end)
                .map(move |ib| (ib, jb))
        })
        .collect();
    for p0 in (0..k).step_by(kcap) {
        let kc = kcap.min(k - p0);
        bp_all
            .par_chunks_mut(nr * kcap)
            .enumerate()
            .for_each(|(jp, dst)| pack_w::<T>(&b, dst, p0, kc, jp * nr, nr));
        ap_all
            .par_chunks_mut(mr * kcap)
            .enumerate()
            .for_each(|(ip, dst)| pack_w::<T>(&a, dst, p0, kc, ip * mr, mr));
        let (ap_all, bp_all) = (&*ap_all, &*bp_all);
        tasks.par_iter().for_each_init(
            || [0f64; 16 * 8],
            |tmp, &(ib, jb)| {
                let (i0, i1) = (ib * mc, ((ib + 1) * mc).min(m));
                let (j0, j1) = (jb * nc, ((jb + 1) * nc).min(n));
                for jp in j0 / nr..j1.div_ceil(nr) {
                    let js = jp * nr;
                    let jn = nr.min(n - js);
                    let b = bp_all[jp * nr * kcap..].as_ptr();
                    for is in (i0..i1).step_by(mr) {
                        if upper && is >= js + jn {
                            break; // this and later micro-tiles lie below the diagonal
                        }
                        let im = mr.min(m - is);
                        let a = ap_all[is * kcap..].as_ptr();
                        if im == mr && jn == nr && (!upper || is + mr <= js + 1) {
                            // SAFETY: a/b hold kc·MR / kc·NR packed values; the tile
                            // (is.., js..) lies inside C (checked above) and inside this
                            // task's macro tile, which no other task of this slice writes.
                            unsafe { micro(kc, a, b, cp.at(js * ldc + is), ldc) };
                        } else {
                            // Edge or diagonal tile: compute into a local tile, add the
                            // entries that exist (and, with upper, lie on or above the
                            // diagonal).
                            let t = &mut tmp[..mr * nr];
                            t.fill(0.0);
                            // SAFETY: as above; t is an MR × NR tile with stride MR.
                            unsafe { micro(kc, a, b, t.as_mut_ptr(), mr) };
                            for j in 0..jn {
                                let rows = if upper {
                                    im.min((js + j + 1).saturating_sub(is))
                                } else {
                                    im
                                };
                                for i in 0..rows {
                                    // SAFETY: (is+i, js+j) is inside C and this task's tile.
                                    unsafe { *cp.at((js + j) * ldc + is + i) += t[j * mr + i] };
                                }
                            }
                        }
                    }
                }
            },
        );
    }
    Ok(())
}

fn pack_w<T: PackedElem>(
    u: &Strided<'_, T>,
    dst: &mut [T],
    p0: usize,
    kc: usize,
    c0: usize,
    w: usize,
) {
    match w {
        6 => u.pack::<6>(dst, p0, kc, c0),
        8 => u.pack::<8>(dst, p0, kc, c0),
        16 => u.pack::<16>(dst, p0, kc, c0),
        _ => unreachable!("panel width {w}"),
    }
}

/// The portable micro-kernel (plain Rust; the compiler vectorises what it can).
pub trait Portable: PackedElem {
    /// Same contract as [`PackedElem::micro`].
    ///
    /// # Safety
    /// As [`PackedElem::micro`].
    unsafe fn micro_portable(kc: usize, a: *const Self, b: *const Self, c: *mut f64, ldc: usize);
}

macro_rules! portable_micro {
    ($t:ty, $mr:expr, $nr:expr) => {
        impl Portable for $t {
            unsafe fn micro_portable(
                kc: usize,
                a: *const $t,
                b: *const $t,
                c: *mut f64,
                ldc: usize,
            ) {
                // SAFETY: the caller guarantees kc·MR / kc·NR readable packed values.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(a, kc * $mr),
                        std::slice::from_raw_parts(b, kc * $nr),
                    )
                };
                for (ac, bc) in a.chunks(<$t>::CHAIN * $mr).zip(b.chunks(<$t>::CHAIN * $nr)) {
                    let mut acc = [[0 as $t; $mr]; $nr];
                    for (ap, bp) in ac.chunks_exact($mr).zip(bc.chunks_exact($nr)) {
                        for (col, &bj) in acc.iter_mut().zip(bp) {
                            for (x, &ai) in col.iter_mut().zip(ap) {
                                *x += ai * bj;
                            }
                        }
                    }
                    for (j, col) in acc.iter().enumerate() {
                        for (i, &v) in col.iter().enumerate() {
                            // SAFETY: the tile (MR × NR, stride ldc) is valid and exclusive.
                            unsafe { *c.add(j * ldc + i) += f64::from(v) };
                        }
                    }
                }
            }
        }
    };
}
portable_micro!(f32, 16, 6);
portable_micro!(f64, 8, 6);

impl PackedElem for f32 {
    const MR: usize = 16;
    const NR: usize = 6;
    const KC: usize = 768;
    const CHAIN: usize = 128;
    const MC: usize = 64;
    const NC: usize = 768;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f64, ldc: usize) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA; the pointer contract is the caller's.
            return unsafe { avx2::micro_f32(kc, a, b, c, ldc) };
        }
        // SAFETY: same contract.
        unsafe { Self::micro_portable(kc, a, b, c, ldc) }
    }
}

impl PackedElem for f64 {
    const MR: usize = 8;
    const NR: usize = 6;
    const KC: usize = 384;
    const CHAIN: usize = 384;
    const MC: usize = 64;
    const NC: usize = 768;
    unsafe fn micro(kc: usize, a: *const f64, b: *const f64, c: *mut f64, ldc: usize) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA; the pointer contract is the caller's.
            return unsafe { avx2::micro_f64(kc, a, b, c, ldc) };
        }
        // SAFETY: same contract.
        unsafe { Self::micro_portable(kc, a, b, c, ldc) }
    }
}

/// Whether the AVX2 + FMA micro-kernels are used on this CPU.
pub fn simd_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        return "avx2+fma";
    }
    "portable"
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// 16 × 6 f32 tile: 12 accumulators (2 × 8 lanes × 6 columns), widened to f64 at the end.
    ///
    /// # Safety
    /// AVX2 + FMA present; pointer contract of `PackedElem::micro`.
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

    /// 8 × 6 f64 tile: 12 accumulators (2 × 4 lanes × 6 columns).
    ///
    /// # Safety
    /// AVX2 + FMA present; pointer contract of `PackedElem::micro`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_f64(kc: usize, a: *const f64, b: *const f64, c: *mut f64, ldc: usize) {
        for j in 0..6 {
            // SAFETY: as in `micro_f32`.
            unsafe {
                let col = c.add(j * ldc);
                _mm_prefetch::<_MM_HINT_T0>(col.cast());
                _mm_prefetch::<_MM_HINT_T0>(col.add(7).cast());
            }
        }
        let mut acc = [[_mm256_setzero_pd(); 2]; 6];
        for p in 0..kc {
            // SAFETY: p < kc; a has kc·8 and b kc·6 values.
            let (a0, a1, bp) = unsafe {
                let ap = a.add(p * 8);
                (
                    _mm256_loadu_pd(ap),
                    _mm256_loadu_pd(ap.add(4)),
                    b.add(p * 6),
                )
            };
            for (j, cj) in acc.iter_mut().enumerate() {
                // SAFETY: j < 6.
                let bj = unsafe { _mm256_broadcast_sd(&*bp.add(j)) };
                cj[0] = _mm256_fmadd_pd(a0, bj, cj[0]);
                cj[1] = _mm256_fmadd_pd(a1, bj, cj[1]);
            }
        }
        for (j, cj) in acc.iter().enumerate() {
            for (h, v) in cj.iter().enumerate() {
                // SAFETY: rows h·4 .. h·4+4 of column j of the 8 × 6 tile.
                unsafe {
                    let p = c.add(j * ldc + h * 4);
                    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), *v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64) / ((1u64 << 53) as f64) - 0.5
            })
            .collect()
    }

    /// Naive f64 upper triangle of UᵀU (from the same rounded values) and of |U|ᵀ|U| (the
    /// scale of the rounding-error bound).
    fn naive(u: &[f64], k: usize, n: usize, rs: usize, cs: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut c, mut a) = (vec![0.0; n * n], vec![0.0; n * n]);
        for j in 0..n {
            for i in 0..=j {
                let pr = (0..k).map(|p| u[p * rs + i * cs] * u[p * rs + j * cs]);
                c[j * n + i] = pr.clone().sum();
                a[j * n + i] = pr.map(f64::abs).sum();
            }
        }
        (c, a)
    }

    /// `eps`: unit roundoff of `T`. Error bound of a recursive sum of `m` products:
    /// `γ_m Σ|u_pi u_pj|`, `γ_m = m·eps / (1 − m·eps)`, `m = min(k, CHAIN)` terms in `T` (the f64
    /// additions of the slices add ≤ `k·2⁻⁵³` relative).
    fn check<T: PackedElem + Portable + Into<f64>>(from: fn(f64) -> T, eps: f64) {
        // Sizes straddling every blocking boundary (MR, NR, MC, NC, KC).
        for &(k, n) in &[
            (1, 1),
            (3, 5),
            (17, 7),
            (40, 33),
            (T::KC + 3, 70),
            (2 * T::KC + 1, 9),
            (50, T::NC + 21),
        ] {
            for transposed in [false, true] {
                let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
                let u: Vec<T> = lcg(k * n, (k * 31 + n) as u64)
                    .into_iter()
                    .map(from)
                    .collect();
                let uf: Vec<f64> = u.iter().map(|&v| v.into()).collect();
                let (want, abs) = naive(&uf, k, n, rs, cs);
                let m = k.min(T::CHAIN) as f64;
                let gamma = m * eps / (1.0 - m * eps) + k as f64 * 1.2e-16;
                let ldc = n + 3;
                for portable in [false, true] {
                    // Start from a non-zero C (the kernel adds) with sentinels below the diagonal.
                    let mut c: Vec<f64> = (0..ldc * n).map(|i| (i % 7) as f64 * 0.25).collect();
                    let c0 = c.clone();
                    let view = Strided {
                        u: &u,
                        k,
                        n,
                        rs,
                        cs,
                    };
                    let mut pack = Vec::new();
                    if portable {
                        syrk_upper_add_portable(&mut c, ldc, view, &mut pack).unwrap();
                    } else {
                        syrk_upper_add(&mut c, ldc, view, &mut pack).unwrap();
                    }
                    for j in 0..n {
                        for i in 0..ldc {
                            let (got, base) = (c[j * ldc + i], c0[j * ldc + i]);
                            if i <= j && i < n {
                                let w = want[j * n + i];
                                let bound = gamma * abs[j * n + i] + 4.0 * f64::EPSILON;
                                assert!(
                                    (got - base - w).abs() <= bound,
                                    "k={k} n={n} t={transposed} p={portable} ({i},{j}): {} vs {w}",
                                    got - base
                                );
                            } else {
                                assert_eq!(
                                    got, base,
                                    "touched ({i},{j}) below the diagonal / padding"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f64_matches_naive() {
        check::<f64>(|x| x, f64::EPSILON / 2.0);
    }

    #[test]
    fn f32_matches_naive_of_rounded_values() {
        check::<f32>(|x| x as f32, f64::from(f32::EPSILON) / 2.0);
    }

    /// `gemm_tn_add` against a naive f64 `AᵀB` of the same (rounded) values, on views of
    /// one buffer (column groups of one row-major block, as the tiled pass uses it) and on
    /// shapes straddling every blocking boundary.
    fn check_gemm<T: PackedElem + Portable + Into<f64>>(from: fn(f64) -> T, eps: f64) {
        for &(k, m, n) in &[
            (1, 1, 1),
            (3, 5, 2),
            (17, 7, 40),
            (T::KC + 3, 70, 13),
            (2 * T::KC + 1, 9, 31),
            (50, T::MC + 5, T::NC + 21),
        ] {
            let width = m + n + 3;
            let buf: Vec<T> = lcg(k * width, (k * 7 + m * 3 + n) as u64)
                .into_iter()
                .map(from)
                .collect();
            let uf: Vec<f64> = buf.iter().map(|&v| v.into()).collect();
            // A = columns 1..1+m, B = columns 2+m..2+m+n of the row-major k × width block.
            let (a0, b0) = (1, 2 + m);
            let ldc = m + 2;
            for portable in [false, true] {
                let mut c: Vec<f64> = (0..ldc * n).map(|i| (i % 5) as f64 * 0.5).collect();
                let c0 = c.clone();
                let a = Strided {
                    u: &buf[a0..],
                    k,
                    n: m,
                    rs: width,
                    cs: 1,
                };
                let b = Strided {
                    u: &buf[b0..],
                    k,
                    n,
                    rs: width,
                    cs: 1,
                };
                let mut pack = Vec::new();
                if portable {
                    gemm_tn_add_portable(&mut c, ldc, a, b, &mut pack).unwrap();
                } else {
                    gemm_tn_add(&mut c, ldc, a, b, &mut pack).unwrap();
                }
                let mm = k.min(T::CHAIN) as f64;
                let gamma = mm * eps / (1.0 - mm * eps) + k as f64 * 1.2e-16;
                for j in 0..n {
                    for i in 0..ldc {
                        let (got, base) = (c[j * ldc + i], c0[j * ldc + i]);
                        if i < m {
                            let pr =
                                (0..k).map(|p| uf[p * width + a0 + i] * uf[p * width + b0 + j]);
                            let w: f64 = pr.clone().sum();
                            let abs: f64 = pr.map(f64::abs).sum();
                            assert!(
                                (got - base - w).abs() <= gamma * abs + 4.0 * f64::EPSILON,
                                "k={k} m={m} n={n} p={portable} ({i},{j}): {} vs {w}",
                                got - base
                            );
                        } else {
                            assert_eq!(got, base, "touched padding row {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_f64_matches_naive() {
        check_gemm::<f64>(|x| x, f64::EPSILON / 2.0);
    }

    #[test]
    fn gemm_f32_matches_naive_of_rounded_values() {
        check_gemm::<f32>(|x| x as f32, f64::from(f32::EPSILON) / 2.0);
    }

    #[test]
    fn empty_is_noop() {
        let mut c = vec![1.0; 4];
        let u: Vec<f32> = vec![];
        syrk_upper_add(
            &mut c,
            2,
            Strided {
                u: &u,
                k: 0,
                n: 2,
                rs: 2,
                cs: 1,
            },
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(c, vec![1.0; 4]);
    }
}
