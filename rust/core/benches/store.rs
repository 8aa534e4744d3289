//! Criterion benches of the activation store (layerscope-core, no Python).
//!
//! A store of 4 layers × 768 features × 16 384 rows in BF16, F16 and F32 (24–96 MiB of
//! payload) is written once to a temp folder; the benches measure, in stored payload
//! bytes per second:
//! * `read_block_into/<dtype>`: all 4 layers, all rows, converted to f32 into reused
//!   buffers (the conversion + copy cost, pages already mapped);
//! * `stream/<dtype>`: the one block reader (`store::stream::run`: 1 024-row blocks, a
//!   reader thread one block ahead, reused buffers, pages released after each block) — what
//!   every one-pass engine pays for its input;
//! * `take/bf16`: 1 024 random rows of one layer (gather);
//! * `write/<dtype>`: `StoreWriter` appending f32 input and converting (sha256, fsync and
//!   atomic renames included, so the figure depends on the disk).
//!
//! `cargo bench -p layerscope-core --bench store` (the Python-side comparison with
//! safetensors / numpy is `benches/bench_store.py`).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use layerscope_core::monitor::NoMonitor;
use layerscope_core::store::{
    stream, ArrayData, DType, Store, StoreRows, StoreWriter, Values, WriterOptions,
};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

const LAYERS: usize = 4;
const DIM: usize = 768;
const ROWS: usize = 16_384;
const BLOCK: usize = 1_024;

/// LLM-like activations: unit spread on top of per-feature offsets of ~300.
fn data(layer: usize) -> Vec<f32> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ layer as u64;
    (0..ROWS * DIM)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * 3.0 + 300.0 * (((i % DIM) as f32 * 0.37).sin())
        })
        .collect()
}

fn write(path: &Path, dtype: DType, inputs: &[Vec<f32>], overwrite: bool) {
    let opts = WriterOptions {
        dtype: Some(dtype),
        overwrite,
        shard_bytes: 32 << 20,
        ..Default::default()
    };
    let mut w = StoreWriter::create(path, opts).expect("create");
    let names: Vec<String> = (0..LAYERS).map(|l| format!("layer.{l}")).collect();
    let batch: Vec<(&str, ArrayData)> = names
        .iter()
        .zip(inputs)
        .map(|(n, x)| (n.as_str(), ArrayData::new(Values::F32(x), ROWS, DIM)))
        .collect();
    w.append(&batch, None, &[]).expect("append");
    w.finish().expect("finish");
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs: Vec<Vec<f32>> = (0..LAYERS).map(data).collect();
    let layers: Vec<usize> = (0..LAYERS).collect();
    let dtypes = [DType::BF16, DType::F16, DType::F32];
    for dt in dtypes {
        write(&dir.path().join(dt.name()), dt, &inputs, false);
    }

    let mut g = c.benchmark_group("read_block_into");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for dt in dtypes {
        let s = Store::open(&dir.path().join(dt.name())).expect("open");
        let mut bufs: Vec<Vec<f32>> = vec![vec![0f32; ROWS * DIM]; LAYERS];
        g.throughput(Throughput::Bytes((LAYERS * ROWS * DIM * dt.size()) as u64));
        g.bench_function(BenchmarkId::from_parameter(dt.name()), |b| {
            b.iter(|| {
                let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
                s.read_block_into(&layers, 0, ROWS as u64, &mut outs)
                    .expect("read");
                black_box(&outs);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("stream");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for dt in dtypes {
        let s = Store::open(&dir.path().join(dt.name())).expect("open");
        let src = StoreRows::new(&s, layers.clone()).expect("select");
        g.throughput(Throughput::Bytes((LAYERS * ROWS * DIM * dt.size()) as u64));
        g.bench_function(BenchmarkId::from_parameter(dt.name()), |b| {
            b.iter(|| {
                stream::run::<f32>(&src, BLOCK, &NoMonitor, |data, _| {
                    black_box(data);
                    Ok(())
                })
                .expect("stream")
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("take");
    g.sample_size(10).measurement_time(Duration::from_secs(2));
    let s = Store::open(&dir.path().join("BF16")).expect("open");
    let rows: Vec<u64> = (0..BLOCK as u64)
        .map(|i| (i * 2_654_435_761) % ROWS as u64)
        .collect();
    g.throughput(Throughput::Bytes((BLOCK * DIM * 2) as u64));
    g.bench_function("bf16", |b| {
        b.iter(|| black_box(s.take::<f32>(0, &rows).expect("take")))
    });
    g.finish();

    let mut g = c.benchmark_group("write");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for dt in dtypes {
        let p = dir.path().join(format!("w-{}", dt.name()));
        g.throughput(Throughput::Bytes((LAYERS * ROWS * DIM * dt.size()) as u64));
        g.bench_function(BenchmarkId::from_parameter(dt.name()), |b| {
            b.iter(|| write(&p, dt, &inputs, true))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
