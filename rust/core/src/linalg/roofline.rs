//! The machine's FMA roofline, measured and stated: the core clock (a chain of dependent
//! integer adds, one cycle each), the vector FMA throughput per cycle (independent FMA
//! chains in registers on every rayon thread at once, in the widest ISA the packed kernels
//! use), and from them the peak `cores × clock × FMA units × lanes × 2` that every benchmark
//! prints beside numpy's GEMM rates and its kernel's rate ([`measure`]).
use rayon::prelude::*;
use std::time::Instant;

/// What [`measure`] found.
#[derive(Debug, Clone)]
pub struct Roofline {
    /// The packed kernels' ISA ([`super::packed::simd_kernel`]).
    pub kernel: &'static str,
    /// Worker threads (rayon's pool: the cores the kernels run on).
    pub cores: usize,
    /// Measured cycles per second of one core (while all cores ran the FMA test); 0 where
    /// it cannot be measured (not x86-64).
    pub clock_hz: f64,
    /// f32 lanes of one vector of `kernel` (16 AVX-512, 8 AVX2, 1 portable).
    pub lanes_f32: usize,
    /// FMA instructions per cycle and core, measured (vector width `lanes_f32`).
    pub fma_per_cycle: f64,
    /// FMA units per core: `fma_per_cycle` rounded (at least 1).
    pub fma_units: usize,
    /// `cores × clock × fma_units × lanes_f32 × 2` flop/s (f32); f64 is half.
    pub peak_f32: f64,
    /// The register-only FMA test's own flop/s (f32, all cores).
    pub measured_f32: f64,
}

/// Measure the roofline (about 0.2 s).
pub fn measure() -> Roofline {
    let kernel = super::packed::simd_kernel();
    let lanes_f32 = match kernel {
        "avx512" => 16,
        "avx2+fma" => 8,
        _ => 1,
    };
    let cores = rayon::current_num_threads();
    let clock_hz = clock_hz();
    // FMA test on every thread at once (a shared clock: turbo under full load), each
    // thread timing its own loop (a thread woken late does not count against the others):
    // each thread's best of five rounds, then the slowest thread.
    const ITERS: u64 = 10_000_000;
    let mut best = vec![f64::INFINITY; cores];
    for _ in 0..5 {
        let times = rayon::broadcast(|_| {
            let t = Instant::now();
            std::hint::black_box(fma_chains(kernel, ITERS));
            t.elapsed().as_secs_f64()
        });
        for (b, t) in best.iter_mut().zip(times) {
            *b = b.min(t);
        }
    }
    let slowest = best.into_iter().fold(0.0, f64::max);
    let per_core = (ITERS * CHAINS as u64) as f64 / slowest; // FMA instructions per second
    let measured_f32 = per_core * cores as f64 * lanes_f32 as f64 * 2.0;
    let fma_per_cycle = if clock_hz > 0.0 {
        per_core / clock_hz
    } else {
        0.0
    };
    let fma_units = (fma_per_cycle.round() as usize).max(1);
    let peak_f32 = cores as f64 * clock_hz * fma_units as f64 * lanes_f32 as f64 * 2.0;
    Roofline {
        kernel,
        cores,
        clock_hz,
        lanes_f32,
        fma_per_cycle,
        fma_units,
        peak_f32,
        measured_f32,
    }
}

/// Independent FMA chains per test loop (latency 4–5 × 2 units needs at least 10).
const CHAINS: usize = 12;

/// Cycles per second: 200 dependent adds per loop trip (1 cycle each; the loop's own
/// decrement and branch run beside them), best of three.
#[cfg(target_arch = "x86_64")]
fn clock_hz() -> f64 {
    const TRIPS: u64 = 500_000;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut x = 0u64;
        let t = Instant::now();
        // SAFETY: register-only arithmetic on the operands named here; no memory, no stack.
        unsafe {
            std::arch::asm!(
                "2:",
                ".rept 200",
                "add {x}, {one}",
                ".endr",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                one = in(reg) 1u64,
                n = inout(reg) TRIPS => _,
                options(nomem, nostack),
            );
        }
        std::hint::black_box(x);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (TRIPS * 200) as f64 / best
}

#[cfg(not(target_arch = "x86_64"))]
fn clock_hz() -> f64 {
    0.0
}

fn fma_chains(kernel: &str, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if kernel == "avx512" {
            // SAFETY: the kernel name says the CPU has AVX-512F + VL.
            return unsafe { x86::fma512(iters) };
        }
        if kernel == "avx2+fma" {
            // SAFETY: the kernel name says the CPU has AVX2 + FMA.
            return unsafe { x86::fma256(iters) };
        }
    }
    let _ = kernel;
    let mut acc = [1.0f32; CHAINS];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    acc.par_iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `CHAINS` independent FMA chains (one register each, named so none is spilled),
    /// then the sum of all lanes (so the loop is not optimised away).
    macro_rules! chains {
        ($iters:expr, $set1:ident, $fmadd:ident, $reduce:expr) => {
            chains!(@ $iters, $set1, $fmadd, $reduce, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11)
        };
        (@ $iters:expr, $set1:ident, $fmadd:ident, $reduce:expr, $($c:ident),+) => {{
            const _: () = assert!([$(stringify!($c)),+].len() == super::CHAINS);
            let (m, a) = ($set1(0.999_999), $set1(1e-7));
            $(let mut $c = $set1(1.0);)+
            for _ in 0..$iters {
                $($c = $fmadd($c, m, a);)+
            }
            [$($c),+].iter().map(|v| $reduce(*v)).sum::<f32>()
        }};
    }

    /// # Safety
    /// AVX-512F + VL present.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn fma512(iters: u64) -> f32 {
        chains!(iters, _mm512_set1_ps, _mm512_fmadd_ps, |v| {
            _mm512_reduce_add_ps(v)
        })
    }

    /// # Safety
    /// AVX2 + FMA present.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256(iters: u64) -> f32 {
        let sum8 = |v: __m256| {
            let mut out = [0f32; 8];
            // SAFETY: out holds 8 f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
            out.iter().sum::<f32>()
        };
        chains!(iters, _mm256_set1_ps, _mm256_fmadd_ps, sum8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plausible figures: a clock between 0.5 and 8 GHz, at least one FMA unit, and the
    /// FMA test within a factor 2 of the peak stated from them.
    #[test]
    fn roofline_is_plausible() {
        let r = measure();
        eprintln!("{r:?}");
        assert!(r.cores >= 1 && r.lanes_f32 >= 1);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(r.clock_hz > 5e8 && r.clock_hz < 8e9, "{r:?}");
            assert!(r.fma_units >= 1 && r.peak_f32 > 0.0, "{r:?}");
            assert!(r.measured_f32 < 2.0 * r.peak_f32, "{r:?}");
        }
    }
}
