//! `cargo run --release --example syrk_rate -- D K [f32|f64] [reps]`: GFLOP/s of the packed
//! SYRK `C += UᵀU` (upper triangle, `K × D` row-major `U`, f64 `D × D` `C`), n·D² flops per
//! call (the moment engine's count), best and mean of `reps` calls after one warm-up.
use layerscope_core::linalg::{hinted_vec, packed};
use std::time::Instant;

fn run<T: packed::PackedElem + From<f32>>(d: usize, k: usize, reps: usize) {
    let mut u: Vec<T> = hinted_vec(k * d, "u").unwrap();
    let mut s = 1u64;
    for x in u.iter_mut() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = T::from(((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5);
    }
    let mut c: Vec<f64> = hinted_vec(d * d, "c").unwrap();
    let mut pack = Vec::new();
    let view = packed::Strided {
        u: &u,
        k,
        n: d,
        rs: d,
        cs: 1,
    };
    packed::syrk_upper_add(&mut c, d, view, &mut pack).unwrap();
    let flops = (k * d * d) as f64;
    let mut ts = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        packed::syrk_upper_add(&mut c, d, view, &mut pack).unwrap();
        ts.push(t.elapsed().as_secs_f64());
    }
    let best = ts.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = ts.iter().sum::<f64>() / ts.len() as f64;
    println!(
        "D={d} K={k} {}: best {:.1} GFLOP/s, mean {:.1} GFLOP/s ({:.3} s/call) kernel {}",
        std::any::type_name::<T>(),
        flops / best / 1e9,
        flops / mean / 1e9,
        mean,
        packed::simd_kernel()
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let d: usize = a.get(1).map_or(4096, |v| v.parse().unwrap());
    let k: usize = a.get(2).map_or(4096, |v| v.parse().unwrap());
    let reps: usize = a.get(4).map_or(5, |v| v.parse().unwrap());
    match a.get(3).map_or("f32", |v| v.as_str()) {
        "f64" => run::<f64>(d, k, reps),
        _ => run::<f32>(d, k, reps),
    }
}
