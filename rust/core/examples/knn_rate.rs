//! `cargo run --release --example knn_rate -- M D K`: wall time of the exact kNN graph
//! (`engine::neighbors::knn`) of `M` random points in `D` dims (an LLM-like mean offset),
//! the distance GEMM's `2·M²·D` flops per second, best of three.
use layerscope_core::engine::neighbors::{knn, Cpu, RowMajor};
use layerscope_core::memory::Budget;
use layerscope_core::NoMonitor;
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let (m, d, k) = (
        a.first().copied().unwrap_or(20000),
        a.get(1).copied().unwrap_or(768),
        a.get(2).copied().unwrap_or(20),
    );
    let mut s = 7u64;
    let x: Vec<f64> = (0..m * d)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64) / ((1u64 << 53) as f64) - 0.5 + (i % d) as f64 * 0.01
        })
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let g = knn(
            RowMajor { x: &x, m, d },
            k,
            &Budget::unchecked(),
            &NoMonitor,
            &Cpu,
        )
        .unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(g);
    }
    let flops = 2.0 * (m * m * d) as f64;
    println!(
        "kNN m={m} d={d} k={k}: {best:.3} s, {:.1} GFLOP/s on the distance GEMM",
        flops / best / 1e9
    );
}
