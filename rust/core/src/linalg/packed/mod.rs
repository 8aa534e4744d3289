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
//! Micro-kernels, chosen at run time ([`PackedElem::kernels`]): AVX-512F + VL (`32 × 12` f32,
//! `16 × 12` f64: 24 of the 32 vector registers accumulate), AVX2 + FMA (`16 × 6` f32, `8 × 6`
//! f64: 12 of 16), or a portable Rust one with the AVX2 blocking. Every kernel sums each
//! element's products in the same order (row by row, restarted every `CHAIN` rows), so
//! results differ between kernels only by FMA's single rounding.
//! On the project's 2-core Zen 5 (OpenBLAS picks its Haswell kernels there: sgemm 256,
//! dgemm 122 GFLOP/s) the AVX-512 kernels run the `9984²` SYRK at 452 (f32) and 231 (f64)
//! GFLOP/s, the AVX2 ones at 244 and 122 (`cargo run --release --example syrk_rate`).
use rayon::prelude::*;

/// Element types the packed SYRK multiplies in.
pub trait PackedElem: Copy + Send + Sync + Default + 'static {
    /// Rows of `U` per slice (`C` is read and written once per slice); the same for every
    /// kernel of a type, so that the planner's memory figures hold whichever one runs.
    const KC: usize;
    /// Longest sum carried in `T` registers: every `CHAIN` rows a micro-kernel adds its
    /// accumulators into the (L1-resident) f64 tile and restarts them. The same for every
    /// kernel of a type (it is the accuracy contract, [`crate::engine::moments`]'s
    /// `F32_SUM_ROWS`).
    const CHAIN: usize;
    /// Every micro-kernel this CPU runs for `Self`, fastest first; the portable one last.
    fn kernels() -> Vec<Kernel<Self>>;
    /// The kernel [`syrk_upper_add`] and [`gemm_tn_add`] use: the first of [`Self::kernels`]
    /// that [`SIMD_ENV`] allows.
    fn kernel() -> Kernel<Self> {
        let cap = simd_cap();
        let all = Self::kernels();
        let portable = all[all.len() - 1];
        all.into_iter()
            .find(|k| rank(k.name) <= cap)
            .unwrap_or(portable)
    }
}

/// Environment variable capping the packed kernels' ISA: `avx2` (no AVX-512) or
/// `portable` (no SIMD intrinsics) — to measure what a machine without them gets, or to
/// rule a kernel out; unset or any other value: the fastest the CPU runs. Results are the
/// same whichever kernel runs, up to FMA rounding.
pub const SIMD_ENV: &str = "LAYERSCOPE_SIMD";

fn rank(name: &str) -> u8 {
    match name {
        "portable" => 0,
        "avx2+fma" => 1,
        _ => 2,
    }
}

/// The highest kernel rank [`SIMD_ENV`] allows (read once).
fn simd_cap() -> u8 {
    static CAP: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var(SIMD_ENV).as_deref() {
        Ok("avx2") => 1,
        Ok("portable") => 0,
        _ => 2,
    })
}

type Micro<T> = unsafe fn(usize, *const T, *const T, *mut f64, usize);

/// A micro-kernel and its blocking: `micro(kc, a, b, c, ldc)` does
/// `c[j·ldc + i] += Σ_p a[p·mr + i] · b[p·nr + j]` for the full `mr × nr` tile (sums of at most
/// [`PackedElem::CHAIN`] products in `T`, each added into the f64 `c`); macro tiles are
/// `mc × nc` (multiples of `mr`, `nr`).
#[derive(Clone, Copy)]
pub struct Kernel<T> {
    /// `"avx512"`, `"avx2+fma"` or `"portable"`.
    pub name: &'static str,
    /// Micro-tile rows (contiguous in `C`).
    pub mr: usize,
    /// Micro-tile columns.
    pub nr: usize,
    /// Macro-tile rows (one `mc × KC` block of packed A panels, kept in L2).
    pub mc: usize,
    /// Macro-tile columns.
    pub nc: usize,
    /// # Safety (of calling it)
    /// `a` holds `kc·mr`, `b` `kc·nr` readable elements; `c` addresses an `mr × nr` tile
    /// with column stride `ldc`, valid for reads and writes and not aliased elsewhere.
    micro: Micro<T>,
}

impl<T> std::fmt::Debug for Kernel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}×{}", self.name, self.mr, self.nr)
    }
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
/// `pack` is a reusable buffer (its contents are overwritten; it grows to about `2·n·KC`
/// values; a refused allocation of it is an [`crate::Error::Memory`]).
pub fn syrk_upper_add<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    u: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, u, u, true, pack, &T::kernel())
}

/// `C += AᵀB` for strided `k × m` `A` and `k × n` `B` (the same `k`); `C` is column-major
/// `m × n` with column stride `ldc ≥ m`. The same kernel as [`syrk_upper_add`] (products in
/// `T`, sums of at most [`PackedElem::CHAIN`] terms in `T`, added into the f64 `C`), over
/// every tile: the cross block of two groups of columns. `pack` grows to about `(m + n)·KC`.
pub fn gemm_tn_add<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    pack: &mut Vec<T>,
) -> crate::Result<()> {
    product_with::<T>(c, ldc, a, b, false, pack, &T::kernel())
}

/// `C += AᵀB` (`C` is `m × n`, `m = a.n`, `n = b.n`) with the given kernel (the tests run
/// each of [`PackedElem::kernels`]); with `upper` (SYRK: `a` and `b` are
/// the same view) only the tiles holding an element on or above the diagonal are computed
/// and only those elements written.
fn product_with<T: PackedElem>(
    c: &mut [f64],
    ldc: usize,
    a: Strided<'_, T>,
    b: Strided<'_, T>,
    upper: bool,
    pack: &mut Vec<T>,
    kernel: &Kernel<T>,
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
    let (mr, nr, kcap, mc, nc) = (kernel.mr, kernel.nr, T::KC.min(k), kernel.mc, kernel.nc);
    let micro = kernel.micro;
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
            || [0f64; MAX_TILE],
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

/// The left factor `A` (a strided `k × m` view) of many products `AᵀB`, packed once into the
/// `mr`-column panels of every [`PackedElem::KC`]-row slice: the products with blocks `B`
/// ([`PackedA::gemm_tn_add_seq`]) then pack only `B` (the kNN's row blocks against all the
/// rows: packing all of `A` again for every block cost as much as a third of the GEMM).
/// Layout: slice `s` (rows `p0 = s·KC ..`, `kc` of them) at `mpad·p0`, its panel `ip` at
/// `+ ip·mr·kc` (`mpad` = `m` rounded up to `mr`), so the buffer is `mpad · k` values.
pub struct PackedA<T: PackedElem> {
    kernel: Kernel<T>,
    k: usize,
    m: usize,
    buf: Vec<T>,
}

impl<T: PackedElem> PackedA<T> {
    /// Bytes of the packed copy of a `k × m` `A` (for memory plans), for any kernel.
    pub fn bytes(k: usize, m: usize) -> u128 {
        (m as u128 + 31) * k as u128 * std::mem::size_of::<T>() as u128
    }

    /// Pack `a` for `kernel` (in parallel over panels; a refused allocation is an
    /// [`crate::Error::Memory`]).
    pub fn new(kernel: Kernel<T>, a: Strided<'_, T>) -> crate::Result<Self> {
        a.check();
        let (k, m, mr) = (a.k, a.n, kernel.mr);
        let mpad = m.div_ceil(mr) * mr;
        let mut buf: Vec<T> = super::hinted_vec(mpad * k, "the packed copy of the sample")?;
        if m > 0 {
            for (s, slice) in buf.chunks_mut(mpad * T::KC).enumerate() {
                let p0 = s * T::KC;
                let kc = T::KC.min(k - p0);
                slice
                    .par_chunks_mut(mr * kc)
                    .enumerate()
                    .for_each(|(ip, dst)| pack_w::<T>(&a, dst, p0, kc, ip * mr, mr));
            }
        }
        Ok(Self { kernel, k, m, buf })
    }

    /// `C += AᵀB` for a strided `k × n` `B` (the same `k`), on the calling thread (callers
    /// run blocks of `B` in parallel); `C` is column-major `m × n` with column stride
    /// `ldc ≥ m`. Same arithmetic as [`gemm_tn_add`]. `pack` grows to `n`·`KC` values.
    pub fn gemm_tn_add_seq(
        &self,
        c: &mut [f64],
        ldc: usize,
        b: Strided<'_, T>,
        pack: &mut Vec<T>,
    ) -> crate::Result<()> {
        let (k, m, n) = (self.k, self.m, b.n);
        assert_eq!(b.k, k, "packed product: A and B have different row counts");
        if k == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        b.check();
        assert!(
            ldc >= m && c.len() >= (n - 1) * ldc + m,
            "packed product: C too small"
        );
        let Kernel { mr, nr, micro, .. } = self.kernel;
        let mpad = m.div_ceil(mr) * mr;
        let npad = n.div_ceil(nr) * nr;
        let b_len = npad * T::KC.min(k);
        if pack.len() < b_len {
            *pack = Vec::new();
            *pack = crate::memory::try_vec(b_len, T::default(), "a packed block")?;
        }
        let mut tmp = [0f64; MAX_TILE];
        for p0 in (0..k).step_by(T::KC) {
            let kc = T::KC.min(k - p0);
            for (jp, dst) in pack[..npad * kc].chunks_mut(nr * kc).enumerate() {
                pack_w::<T>(&b, dst, p0, kc, jp * nr, nr);
            }
            let aslice = &self.buf[mpad * p0..mpad * p0 + mpad * kc];
            // A panel outer (from memory once, then from L2 for every B panel), B inner.
            for (ip, ap) in aslice.chunks_exact(mr * kc).enumerate() {
                let is = ip * mr;
                let im = mr.min(m - is);
                for jp in 0..n.div_ceil(nr) {
                    let js = jp * nr;
                    let jn = nr.min(n - js);
                    let bp = pack[jp * nr * kc..].as_ptr();
                    if im == mr && jn == nr {
                        // SAFETY: ap/bp hold kc·mr / kc·nr packed values; the mr × nr
                        // tile at (is, js) lies inside C (checked above), borrowed mutably.
                        unsafe {
                            micro(kc, ap.as_ptr(), bp, c.as_mut_ptr().add(js * ldc + is), ldc)
                        };
                    } else {
                        let t = &mut tmp[..mr * nr];
                        t.fill(0.0);
                        // SAFETY: as above; t is an mr × nr tile with stride mr.
                        unsafe { micro(kc, ap.as_ptr(), bp, t.as_mut_ptr(), mr) };
                        for j in 0..jn {
                            let col = &mut c[(js + j) * ldc + is..(js + j) * ldc + is + im];
                            for (x, v) in col.iter_mut().zip(&t[j * mr..j * mr + im]) {
                                *x += v;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The largest `mr · nr` of any kernel (the edge tiles' scratch).
const MAX_TILE: usize = 32 * 12;

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
        12 => u.pack::<12>(dst, p0, kc, c0),
        16 => u.pack::<16>(dst, p0, kc, c0),
        32 => u.pack::<32>(dst, p0, kc, c0),
        _ => unreachable!("panel width {w}"),
    }
}

/// The portable micro-kernels (plain Rust; the compiler vectorises what it can), with the
/// AVX2 kernels' blocking (same summation order per micro-tile, so results differ from
/// theirs only by FMA's single rounding).
macro_rules! portable_micro {
    ($name:ident, $t:ty, $mr:expr, $nr:expr) => {
        /// # Safety
        /// The pointer contract of [`Kernel`] (`mr × nr` tile).
        unsafe fn $name(kc: usize, a: *const $t, b: *const $t, c: *mut f64, ldc: usize) {
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
    };
}
portable_micro!(portable_f32, f32, 16, 6);
portable_micro!(portable_f64, f64, 8, 6);

impl PackedElem for f32 {
    const KC: usize = 768;
    const CHAIN: usize = 128;
    fn kernels() -> Vec<Kernel<f32>> {
        let mut out = Vec::with_capacity(3);
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                out.push(Kernel {
                    name: "avx512",
                    mr: 32,
                    nr: 12,
                    mc: 64,
                    nc: 768,
                    micro: avx512::micro_f32,
                });
            }
            if avx2::available() {
                out.push(Kernel {
                    name: "avx2+fma",
                    mr: 16,
                    nr: 6,
                    mc: 64,
                    nc: 768,
                    micro: avx2::micro_f32,
                });
            }
        }
        out.push(Kernel {
            name: "portable",
            mr: 16,
            nr: 6,
            mc: 64,
            nc: 768,
            micro: portable_f32,
        });
        out
    }
}

impl PackedElem for f64 {
    const KC: usize = 384;
    const CHAIN: usize = 384;
    fn kernels() -> Vec<Kernel<f64>> {
        let mut out = Vec::with_capacity(3);
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                out.push(Kernel {
                    name: "avx512",
                    mr: 16,
                    nr: 12,
                    mc: 64,
                    nc: 768,
                    micro: avx512::micro_f64,
                });
            }
            if avx2::available() {
                out.push(Kernel {
                    name: "avx2+fma",
                    mr: 8,
                    nr: 6,
                    mc: 64,
                    nc: 768,
                    micro: avx2::micro_f64,
                });
            }
        }
        out.push(Kernel {
            name: "portable",
            mr: 8,
            nr: 6,
            mc: 64,
            nc: 768,
            micro: portable_f64,
        });
        out
    }
}

/// The vector ISA the packed kernels and the moment pass's other loops use: 2 (AVX-512F,
/// and VL for the kernels), 1 (AVX2 + FMA) or 0 (baseline), as detected and capped by
/// [`SIMD_ENV`].
pub fn simd_level() -> u8 {
    rank(f32::kernel().name)
}

/// The micro-kernel the packed products use on this CPU (`"avx512"`, `"avx2+fma"` or
/// `"portable"`).
pub fn simd_kernel() -> &'static str {
    f32::kernel().name
}

/// The f64 micro-kernel of both x86 ISAs (`micro_f64` in `avx2` and `avx512`): a
/// `2·lanes × nr` tile in `2·nr` accumulators, one f64 sum over all `kc` rows, added into
/// `C` at the end (f64 needs no chain).
#[cfg(target_arch = "x86_64")]
macro_rules! f64_micro {
    ($features:literal, $lanes:literal, $nr:literal, $zero:ident, $load:ident, $splat:ident,
     $fmadd:ident, $store:ident, $add:ident) => {
        /// `2·lanes × nr` f64 tile (`8 × 6` AVX2, `16 × 12` AVX-512).
        ///
        /// # Safety
        /// The CPU has `$features`; the pointer contract of [`super::Kernel`].
        #[target_feature(enable = $features)]
        pub unsafe fn micro_f64(kc: usize, a: *const f64, b: *const f64, c: *mut f64, ldc: usize) {
            const MR: usize = 2 * $lanes;
            for j in 0..$nr {
                // SAFETY: prefetching never faults; the addresses are inside the tile.
                unsafe {
                    let col = c.add(j * ldc);
                    _mm_prefetch::<_MM_HINT_T0>(col.cast());
                    _mm_prefetch::<_MM_HINT_T0>(col.add($lanes).cast());
                    _mm_prefetch::<_MM_HINT_T0>(col.add(MR - 1).cast());
                }
            }
            let mut acc = [[$zero(); 2]; $nr];
            for p in 0..kc {
                // SAFETY: p < kc; a has kc·MR and b kc·nr values.
                let (a0, a1, bp) = unsafe {
                    let ap = a.add(p * MR);
                    ($load(ap), $load(ap.add($lanes)), b.add(p * $nr))
                };
                for (j, cj) in acc.iter_mut().enumerate() {
                    // SAFETY: j < nr.
                    let bj = $splat(unsafe { *bp.add(j) });
                    cj[0] = $fmadd(a0, bj, cj[0]);
                    cj[1] = $fmadd(a1, bj, cj[1]);
                }
            }
            for (j, cj) in acc.iter().enumerate() {
                for (h, v) in cj.iter().enumerate() {
                    // SAFETY: rows h·lanes .. (h+1)·lanes of column j of the tile.
                    unsafe {
                        let p = c.add(j * ldc + h * $lanes);
                        $store(p, $add($load(p), *v));
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
    fn check<T: PackedElem + Into<f64>>(from: fn(f64) -> T, eps: f64) {
        let kernels = T::kernels();
        assert_eq!(kernels.last().unwrap().name, "portable");
        // Sizes straddling every blocking boundary (MR, NR, MC, NC, KC).
        for &(k, n) in &[
            (1, 1),
            (3, 5),
            (17, 7),
            (40, 33),
            (T::KC + 3, 70),
            (2 * T::KC + 1, 9),
            (50, 768 + 21),
            (130, 2 * 64 + 45),
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
                for kernel in &kernels {
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
                    product_with(&mut c, ldc, view, view, true, &mut pack, kernel).unwrap();
                    for j in 0..n {
                        for i in 0..ldc {
                            let (got, base) = (c[j * ldc + i], c0[j * ldc + i]);
                            if i <= j && i < n {
                                let w = want[j * n + i];
                                let bound = gamma * abs[j * n + i] + 4.0 * f64::EPSILON;
                                assert!(
                                    (got - base - w).abs() <= bound,
                                    "k={k} n={n} t={transposed} {kernel:?} ({i},{j}): {} vs {w}",
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

    /// Every `C[i, j]` (`i < m`) moved from `c0` by the sum of `terms(i, j)` (the `k`
    /// products, in f64) within the rounding bound of sums of at most `CHAIN` products in
    /// `T` added into f64; the padding rows `m..ldc` untouched.
    fn assert_added<T: PackedElem>(
        c: &[f64],
        c0: &[f64],
        ldc: usize,
        (k, m, n): (usize, usize, usize),
        eps: f64,
        kernel: &Kernel<T>,
        terms: impl Fn(usize, usize) -> Vec<f64>,
    ) {
        let mm = k.min(T::CHAIN) as f64;
        let gamma = mm * eps / (1.0 - mm * eps) + k as f64 * 1.2e-16;
        for j in 0..n {
            for i in 0..ldc {
                let (got, base) = (c[j * ldc + i], c0[j * ldc + i]);
                if i < m {
                    let pr = terms(i, j);
                    let w: f64 = pr.iter().sum();
                    let abs: f64 = pr.iter().map(|v| v.abs()).sum();
                    assert!(
                        (got - base - w).abs() <= gamma * abs + 4.0 * f64::EPSILON,
                        "k={k} m={m} n={n} {kernel:?} ({i},{j}): {} vs {w}",
                        got - base
                    );
                } else {
                    assert_eq!(got, base, "touched padding row {i}");
                }
            }
        }
    }

    /// `gemm_tn_add` against a naive f64 `AᵀB` of the same (rounded) values, on views of
    /// one buffer (column groups of one row-major block, as the tiled pass uses it) and on
    /// shapes straddling every blocking boundary.
    fn check_gemm<T: PackedElem + Into<f64>>(from: fn(f64) -> T, eps: f64) {
        let kernels = T::kernels();
        for &(k, m, n) in &[
            (1, 1, 1),
            (3, 5, 2),
            (17, 7, 40),
            (T::KC + 3, 70, 13),
            (2 * T::KC + 1, 9, 31),
            (50, 64 + 5, 768 + 21),
            (129, 2 * 64 + 33, 37),
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
            for kernel in &kernels {
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
                product_with(&mut c, ldc, a, b, false, &mut pack, kernel).unwrap();
                let terms = |i: usize, j: usize| {
                    (0..k)
                        .map(|p| uf[p * width + a0 + i] * uf[p * width + b0 + j])
                        .collect()
                };
                assert_added::<T>(&c, &c0, ldc, (k, m, n), eps, kernel, terms);
            }
        }
    }

    /// [`PackedA`]: `A` packed once, then products with several blocks of `B`, against a
    /// naive f64 `AᵀB`; both views column-strided (rows of a row-major sample, as the kNN
    /// uses them), shapes straddling KC and every kernel's tile.
    fn check_packed_a<T: PackedElem + Into<f64>>(from: fn(f64) -> T, eps: f64) {
        for &(k, m, n) in &[
            (1, 1, 1),
            (5, 37, 13),
            (T::KC + 7, 70, 29),
            (2 * T::KC + 1, 33, 12),
        ] {
            let xs: Vec<T> = lcg(k * (m + n), (k + 5 * m + n) as u64)
                .into_iter()
                .map(from)
                .collect();
            let xf: Vec<f64> = xs.iter().map(|&v| v.into()).collect();
            // rows 0..m are A's columns, rows m..m+n B's (row-major, width k)
            for kernel in T::kernels() {
                let a = Strided {
                    u: &xs,
                    k,
                    n: m,
                    rs: 1,
                    cs: k,
                };
                let pa = PackedA::new(kernel, a).unwrap();
                let ldc = m + 1;
                let mut c: Vec<f64> = (0..ldc * n).map(|i| (i % 3) as f64).collect();
                let c0 = c.clone();
                let mut pack = Vec::new();
                // B in two blocks of columns (one pack buffer reused)
                let half = n / 2;
                for (j0, j1) in [(0, half), (half, n)] {
                    let b = Strided {
                        u: &xs[(m + j0) * k..],
                        k,
                        n: j1 - j0,
                        rs: 1,
                        cs: k,
                    };
                    pa.gemm_tn_add_seq(&mut c[j0 * ldc..], ldc, b, &mut pack)
                        .unwrap();
                }
                let terms = |i: usize, j: usize| {
                    (0..k)
                        .map(|p| xf[i * k + p] * xf[(m + j) * k + p])
                        .collect()
                };
                assert_added::<T>(&c, &c0, ldc, (k, m, n), eps, &kernel, terms);
            }
        }
    }

    #[test]
    fn packed_a_matches_naive() {
        check_packed_a::<f32>(|x| x as f32, f64::from(f32::EPSILON) / 2.0);
        check_packed_a::<f64>(|x| x, f64::EPSILON / 2.0);
    }

    #[test]
    fn gemm_f64_matches_naive() {
        check_gemm::<f64>(|x| x, f64::EPSILON / 2.0);
    }

    #[test]
    fn gemm_f32_matches_naive_of_rounded_values() {
        check_gemm::<f32>(|x| x as f32, f64::from(f32::EPSILON) / 2.0);
    }

    /// The fastest kernel the CPU runs is the one used, and every kernel is tested above.
    #[test]
    fn kernels_follow_the_cpu() {
        let names: Vec<&str> = f32::kernels().iter().map(|k| k.name).collect();
        assert_eq!(
            names,
            f64::kernels().iter().map(|k| k.name).collect::<Vec<_>>()
        );
        assert_eq!(simd_kernel(), names[0]);
        #[cfg(target_arch = "x86_64")]
        {
            let has512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl");
            let has2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let mut want = Vec::new();
            if has512 {
                want.push("avx512");
            }
            if has2 {
                want.push("avx2+fma");
            }
            want.push("portable");
            assert_eq!(names, want);
        }
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
