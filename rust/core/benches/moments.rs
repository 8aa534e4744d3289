//! Criterion benchmarks of engine 1: the moment accumulator's block update (one SYRK of the
//! shifted, concatenated block, f64), finalisation and all-pairs linear CKA.
//! Throughput is reported in elements; GFLOP/s = rows · (D+L)² / time (the SYRK's flops).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use layerscope_core::engine::moments::MomentAccumulator;
use layerscope_core::measures::cka::LinearCka;
use std::hint::black_box;

fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n * d)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) + 100.0 * ((i % d) as f32 / d as f32)
        })
        .collect()
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("moments_update");
    g.sample_size(10);
    for &(layers, d, rows) in &[(4usize, 256usize, 2048usize), (13, 768, 1024)] {
        let dims = vec![d; layers];
        let blocks: Vec<Vec<f32>> = (0..layers).map(|l| data(rows, d, l as u64)).collect();
        let refs: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
        let dz = (layers * d + layers) as u64;
        g.throughput(Throughput::Elements(rows as u64 * dz * dz));
        g.bench_with_input(
            BenchmarkId::new("flops", format!("{layers}x{d}x{rows}")),
            &refs,
            |b, refs| {
                let mut acc = MomentAccumulator::new(&dims).unwrap();
                acc.update(refs, rows).unwrap();
                b.iter(|| acc.update(black_box(refs), rows).unwrap());
            },
        );
    }
    g.finish();
}

fn finalize_and_cka(c: &mut Criterion) {
    let (layers, d, rows) = (13usize, 768usize, 512usize);
    let dims = vec![d; layers];
    let blocks: Vec<Vec<f32>> = (0..layers).map(|l| data(rows, d, l as u64)).collect();
    let refs: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
    let mut acc = MomentAccumulator::new(&dims).unwrap();
    acc.update(&refs, rows).unwrap();
    let idx: Vec<usize> = (0..layers).collect();
    let mut g = c.benchmark_group("moments_finalize");
    g.sample_size(10);
    g.bench_function("finalize_13x768", |b| {
        b.iter(|| acc.clone().finalize().unwrap())
    });
    let m = acc.clone().finalize().unwrap();
    g.bench_function("cka_all_pairs_13x768_biased_debiased", |b| {
        b.iter(|| {
            let a = m.cka_matrix(&idx, &idx, false).unwrap();
            let d = m.cka_matrix(&idx, &idx, true).unwrap();
            black_box((a, d))
        })
    });
    g.finish();
}

criterion_group!(benches, update, finalize_and_cka);
criterion_main!(benches);
