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
