//! Deterministic test data shared by the unit tests of the engines and the measures.

/// `n × d` row-major values: uniform in [−0.5, 0.5) from a 64-bit LCG seeded by `seed`, plus
/// a per-feature offset `offset · (feature + 1)` (the mean offsets of LLM activations).
pub fn data(n: usize, d: usize, seed: u64, offset: f64) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * d)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) + offset * ((i % d) as f64 + 1.0)
        })
        .collect()
}

/// Writes a store at `path` of layers `l0, l1, …` (row-major f32 values `xs[l]` of widths
/// `dims[l]`), `chunk` rows per append and shards of about `shard_bytes`, and opens it.
pub fn f32_store(
    path: &std::path::Path,
    xs: &[Vec<f32>],
    dims: &[usize],
    chunk: usize,
    shard_bytes: u64,
) -> crate::store::Store {
    use crate::store::{ArrayData, Store, StoreWriter, Values, WriterOptions};
    let n = xs[0].len() / dims[0];
    let opts = WriterOptions {
        shard_bytes,
        ..Default::default()
    };
    let mut w = StoreWriter::create(path, opts).unwrap();
    let names: Vec<String> = (0..dims.len()).map(|l| format!("l{l}")).collect();
    for start in (0..n).step_by(chunk) {
        let stop = (start + chunk).min(n);
        let layers: Vec<(&str, ArrayData)> = dims
            .iter()
            .enumerate()
            .map(|(l, &d)| {
                let v = Values::F32(&xs[l][start * d..stop * d]);
                (names[l].as_str(), ArrayData::new(v, stop - start, d))
            })
            .collect();
        w.append(&layers, None, &[]).unwrap();
    }
    w.finish().unwrap();
    Store::open(path).unwrap()
}

/// The `m × m` Gram matrix `X Xᵀ` of `m × d` row-major `x`, summed naively (the tests'
/// reference).
pub fn naive_gram(x: &[f64], m: usize, d: usize) -> Vec<f64> {
    let mut g = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            g[i * m + j] = (0..d).map(|f| x[i * d + f] * x[j * d + f]).sum();
        }
    }
    g
}
