//! `cargo run --release --example pass_rate -- L d rows blocks`: the f32 moment update
//! (`MomentAccumulator::update`, Compute::F32) on in-memory f32 blocks of `L` layers × `d`,
//! against the SYRK alone on the same shapes: the time the update spends outside the kernel.
use layerscope_core::engine::moments::{Compute, MomentAccumulator};
use layerscope_core::linalg::{hinted_vec, packed};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let (nl, d, rows, blocks) = (a[0], a[1], a[2], a[3]);
    let mut s = 1u64;
    let data: Vec<Vec<f32>> = (0..nl)
        .map(|_| {
            (0..rows * d)
                .map(|i| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 40) as f32) / (1u64 << 24) as f32 - 0.5 + (i % d) as f32 * 0.1
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
    let dims = vec![d; nl];
    let t = Instant::now();
    let mut acc = MomentAccumulator::new(&dims)
        .unwrap()
        .with_compute(Compute::F32);
    let t_new = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..blocks {
        acc.update(&refs, rows).unwrap();
    }
    let t_upd = t.elapsed().as_secs_f64();
    let dd = nl * d;
    let u: Vec<f32> = hinted_vec(rows * dd, "u").unwrap();
    let mut c: Vec<f64> = hinted_vec((dd + nl) * (dd + nl), "c").unwrap();
    let mut pack = Vec::new();
    let view = packed::Strided {
        u: &u,
        k: rows,
        n: dd,
        rs: dd,
        cs: 1,
    };
    let t = Instant::now();
    for _ in 0..blocks {
        packed::syrk_upper_add(&mut c, dd + nl, view, &mut pack).unwrap();
    }
    let t_syrk = t.elapsed().as_secs_f64();
    println!(
        "L={nl} d={d} rows={rows} x{blocks}: new {t_new:.3} s, updates {t_upd:.3} s, SYRK alone {t_syrk:.3} s ({:.0} GFLOP/s); outside the kernel {:.3} s",
        (blocks * rows * dd * dd) as f64 / t_syrk / 1e9,
        t_upd - t_syrk
    );
}
