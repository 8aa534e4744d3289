//! Element types of the store and the conversion of stored little-endian bytes to `f32`/`f64`.
//!
//! Stored data may be unaligned inside a shard (tensors follow each other without padding), so
//! every conversion reads elements with `from_le_bytes` from byte chunks; no pointer casts.
//! bf16 → f32 is exact (`bits << 16`); f16 → f32/f64 is exact (`half`); f64 → f32 rounds to
//! nearest-even (the only lossy read).
use std::fmt;

/// The dtype of a stored layer (safetensors names `F16`, `BF16`, `F32`, `F64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// The safetensors / manifest spelling (`"BF16"`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// The numpy-style spelling (`"bfloat16"`, `"float32"`, …).
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// Parses the safetensors spelling; `None` for anything else (including valid safetensors
    /// dtypes that a layer may not have, such as `I64`).
    pub fn from_name(s: &str) -> Option<DType> {
        match s {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            "F64" => Some(DType::F64),
            _ => None,
        }
    }

    /// Parses either spelling (`"BF16"`, `"bfloat16"`, `"float32"`, `"f32"`…), case-insensitive.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f32" | "float32" | "float" => Some(DType::F32),
            "f64" | "float64" | "double" => Some(DType::F64),
            _ => None,
        }
    }

    /// True when the element bit pattern starting at `b` (little endian) is NaN or ±Inf.
    #[inline]
    fn nonfinite_at(self, b: &[u8]) -> bool {
        match self {
            DType::BF16 => {
                let v = u16::from_le_bytes([b[0], b[1]]);
                v & 0x7f80 == 0x7f80
            }
            DType::F16 => {
                let v = u16::from_le_bytes([b[0], b[1]]);
                v & 0x7c00 == 0x7c00
            }
            DType::F32 => {
                let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                v & 0x7f80_0000 == 0x7f80_0000
            }
            DType::F64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[..8]);
                u64::from_le_bytes(a) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
            }
        }
    }

    /// Index of the first NaN/±Inf element in `bytes` (a whole number of elements).
    pub fn first_nonfinite(self, bytes: &[u8]) -> Option<usize> {
        bytes
            .chunks_exact(self.size())
            .position(|c| self.nonfinite_at(c))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A numeric type that stored elements can be read as (`f32` or `f64`).
pub trait Element: Copy + Send + Sync + Default + 'static {
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Converts `dst.len()` elements of `dtype` from the little-endian bytes `src`
    /// (`src.len() == dst.len() * dtype.size()`; extra bytes are ignored, missing ones leave
    /// the tail of `dst` untouched — callers pass exact lengths).
    fn convert(dtype: DType, src: &[u8], dst: &mut [Self]);
    fn is_finite(self) -> bool;
    fn to_f64(self) -> f64;
}

/// `f64 → f32` rounding to odd: exact values are kept, an inexact one becomes whichever of
/// the two enclosing `f32` values has an odd last significand bit. Rounding that result once
/// more to a format with at least 2 fewer significand bits (bf16: 8, f16: 11 vs 24) gives the
/// correctly rounded (nearest-even) result of the original `f64` (Boldo & Melquiond, "Emulation
/// of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008).
/// `half`'s own `from_f64` is not used: it rounds twice (via a nearest-even `f32`) or ignores
/// the low 32 bits of the `f64` significand, which errs on near-ties.
#[inline]
pub fn f64_to_f32_round_odd(x: f64) -> f32 {
    let t = x as f32;
    if x.is_nan() || t as f64 == x {
        return t;
    }
    let bits = t.to_bits();
    // Truncate toward zero (|t| > |x| means t was rounded up in magnitude; the magnitude
    // bits of a non-zero finite or infinite f32 are at least 1), then force the odd bit.
    let trunc = if (t as f64).abs() > x.abs() {
        bits - 1
    } else {
        bits
    };
    f32::from_bits(trunc | 1)
}

/// Correctly rounded (nearest-even) `f64 → bf16` bits.
#[inline]
pub fn f64_to_bf16_bits(x: f64) -> u16 {
    half::bf16::from_f32(f64_to_f32_round_odd(x)).to_bits()
}

/// Correctly rounded (nearest-even) `f64 → f16` bits (as `numpy.astype(float16)`).
#[inline]
pub fn f64_to_f16_bits(x: f64) -> u16 {
    half::f16::from_f32(f64_to_f32_round_odd(x)).to_bits()
}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// [`Element`] for `f32` and `f64`: the stored dtypes decoded little-endian into `$t`
/// (f16 staged through an aligned buffer so that `half` can use F16C when present; the three
/// expressions turn an f32 and an f64 into `$t`, and `$t` into an f64).
macro_rules! element {
    ($t:ty, $name:literal, $f16_slice:ident, $x:ident as f32 => $from_f32:expr,
     $y:ident as f64 => $from_f64:expr, $z:ident to f64 => $to_f64:expr) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            fn convert(dtype: DType, src: &[u8], dst: &mut [$t]) {
                match dtype {
                    DType::BF16 => {
                        for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                            let $x = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                            *d = $from_f32;
                        }
                    }
                    DType::F16 => {
                        let mut tmp = [half::f16::ZERO; 256];
                        for (dc, sc) in dst.chunks_mut(256).zip(src.chunks(512)) {
                            let n = dc.len().min(sc.len() / 2);
                            for (t, c) in tmp[..n].iter_mut().zip(sc.chunks_exact(2)) {
                                *t = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                            }
                            half::slice::HalfFloatSliceExt::$f16_slice(&tmp[..n], &mut dc[..n]);
                        }
                    }
                    DType::F32 => {
                        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                            let $x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            *d = $from_f32;
                        }
                    }
                    DType::F64 => {
                        for (d, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            let $y = f64::from_le_bytes(a);
                            *d = $from_f64;
                        }
                    }
                }
            }
            #[inline]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline]
            fn to_f64(self) -> f64 {
                let $z = self;
                $to_f64
            }
        }
    };
}
element!(f32, "f32", convert_to_f32_slice, x as f32 => x, x as f64 => x as f32, x to f64 => x as f64);
element!(f64, "f64", convert_to_f64_slice, x as f32 => x as f64, x as f64 => x, x to f64 => x);

/// Input values handed to the writer: native floats or raw 16-bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    /// IEEE half-precision bit patterns.
    F16Bits(&'a [u16]),
    /// bfloat16 bit patterns (e.g. a torch bf16 tensor viewed as uint16).
    BF16Bits(&'a [u16]),
}

impl Values<'_> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::F16Bits(v) | Values::BF16Bits(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype these values are in.
    pub fn dtype(&self) -> DType {
        match self {
            Values::F32(_) => DType::F32,
            Values::F64(_) => DType::F64,
            Values::F16Bits(_) => DType::F16,
            Values::BF16Bits(_) => DType::BF16,
        }
    }

    /// Appends elements `[from, to)` converted to `dtype` (little endian) to `out`.
    /// Conversions are correctly rounded to nearest-even (f64 inputs via
    /// `f64_to_f32_round_odd`); same-dtype copies are bit exact, NaN/Inf are kept. `Error::InvalidArgument` (and `out` unchanged) when `[from, to)` is not a
    /// range of the values.
    pub fn encode_into(
        &self,
        from: usize,
        to: usize,
        dtype: DType,
        out: &mut Vec<u8>,
    ) -> crate::error::Result<()> {
        if from > to || to > self.len() {
            return Err(crate::error::Error::invalid(format!(
                "element range [{from}, {to}) out of bounds for {} values",
                self.len()
            )));
        }
        let size = dtype.size();
        let base = out.len();
        out.try_reserve((to - from) * size).map_err(|_| {
            crate::error::Error::Memory(format!(
                "could not allocate {} for encoding {} values of a shard",
                crate::memory::fmt_bytes(((to - from) * size) as u128),
                to - from
            ))
        })?;
        out.resize(base + (to - from) * size, 0);
        let dst = &mut out[base..];
        // Fixed-size chunk writes (no per-element capacity checks) so that the loops vectorise.
        macro_rules! enc {
            ($src:expr, $f:expr) => {
                for (d, &x) in dst.chunks_exact_mut(size).zip(&$src[from..to]) {
                    d.copy_from_slice(&$f(x));
                }
            };
        }
        use half::{bf16, f16};
        match (*self, dtype) {
            (Values::F32(s), DType::F32) => enc!(s, |x: f32| x.to_le_bytes()),
            (Values::F32(s), DType::F64) => enc!(s, |x: f32| (x as f64).to_le_bytes()),
            (Values::F32(s), DType::F16) => {
                enc!(s, |x: f32| f16::from_f32(x).to_bits().to_le_bytes())
            }
            (Values::F32(s), DType::BF16) => {
                enc!(s, |x: f32| bf16::from_f32(x).to_bits().to_le_bytes())
            }
            (Values::F64(s), DType::F32) => enc!(s, |x: f64| (x as f32).to_le_bytes()),
            (Values::F64(s), DType::F64) => enc!(s, |x: f64| x.to_le_bytes()),
            (Values::F64(s), DType::F16) => enc!(s, |x: f64| f64_to_f16_bits(x).to_le_bytes()),
            (Values::F64(s), DType::BF16) => {
                enc!(s, |x: f64| f64_to_bf16_bits(x).to_le_bytes())
            }
            (Values::F16Bits(s), DType::F16) | (Values::BF16Bits(s), DType::BF16) => {
                enc!(s, |x: u16| x.to_le_bytes())
            }
            (Values::F16Bits(s), DType::F32) => {
                enc!(s, |x: u16| f16::from_bits(x).to_f32().to_le_bytes())
            }
            (Values::F16Bits(s), DType::F64) => {
                enc!(s, |x: u16| f16::from_bits(x).to_f64().to_le_bytes())
            }
            (Values::F16Bits(s), DType::BF16) => {
                enc!(s, |x: u16| bf16::from_f32(f16::from_bits(x).to_f32())
                    .to_bits()
                    .to_le_bytes())
            }
            (Values::BF16Bits(s), DType::F32) => enc!(s, |x: u16| bf16_to_f32(x).to_le_bytes()),
            (Values::BF16Bits(s), DType::F64) => {
                enc!(s, |x: u16| (bf16_to_f32(x) as f64).to_le_bytes())
            }
            (Values::BF16Bits(s), DType::F16) => {
                enc!(s, |x: u16| f16::from_f32(bf16_to_f32(x))
                    .to_bits()
                    .to_le_bytes())
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_and_f16_exact() {
        let vals = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            3.140625,
            65504.0,
            1e-3,
            f32::INFINITY,
        ];
        for &v in &vals {
            let b = half::bf16::from_f32(v);
            let bytes = b.to_bits().to_le_bytes();
            let mut out = [0f32; 1];
            f32::convert(DType::BF16, &bytes, &mut out);
            assert_eq!(out[0].to_bits(), b.to_f32().to_bits());
            let h = half::f16::from_f32(v);
            let bytes = h.to_bits().to_le_bytes();
            let mut out64 = [0f64; 1];
            f64::convert(DType::F16, &bytes, &mut out64);
            assert_eq!(out64[0], h.to_f64());
        }
    }

    #[test]
    fn long_f16_slice_and_unaligned() {
        let n = 1000;
        let src: Vec<u16> = (0..n)
            .map(|i| half::f16::from_f32(i as f32 * 0.25 - 7.0).to_bits())
            .collect();
        let mut bytes = vec![0u8]; // force odd alignment
        for s in &src {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        let mut out = vec![0f32; n];
        f32::convert(DType::F16, &bytes[1..], &mut out);
        for (i, o) in out.iter().enumerate() {
            assert_eq!(*o, i as f32 * 0.25 - 7.0);
        }
    }

    /// Independent reference: the nearest of the two enclosing values (found by exhaustive
    /// search over the target's bit patterns near the f32 rounding), ties to even.
    fn nearest<F: Fn(u16) -> f64>(x: f64, to_f64: F, guess: u16) -> u16 {
        let mut best = guess;
        for d in -3i32..=3 {
            let c = (guess as i32 + d) as u16;
            let v = to_f64(c);
            if v.is_nan() || (v.signum() != x.signum() && v != 0.0) {
                continue;
            }
            let (e, eb) = ((v - x).abs(), (to_f64(best) - x).abs());
            if e < eb || (e == eb && c & 1 == 0 && best & 1 == 1) {
                best = c;
            }
        }
        best
    }

    #[test]
    fn f64_to_half_types_correctly_rounded() {
        let bf = |b: u16| half::bf16::from_bits(b).to_f64();
        let hf = |b: u16| half::f16::from_bits(b).to_f64();
        let mut xs = vec![1.0 + 2f64.powi(-8) + 2f64.powi(-40), 1.0 + 2f64.powi(-8)];
        xs.push(1.0 + 2f64.powi(-11) + 2f64.powi(-45)); // f16 near-tie
        xs.push(-(3.0 + 2f64.powi(-7) * 3.0 + 2f64.powi(-50)));
        xs.push(300.0 + 2f64.powi(-30));
        let mut r = 12345u64;
        for _ in 0..20000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            // random f64 in a safe range, half of them nudged onto near-ties
            let x = f64::from_bits((r & 0x000f_ffff_ffff_ffff) | (((r >> 52) % 40 + 1003) << 52));
            let x = if r & 1 == 0 { -x } else { x };
            xs.push(x);
            let tie = (half::bf16::from_f64(x).to_f64()
                + bf(half::bf16::from_f64(x).to_bits() + 1))
                / 2.0;
            xs.push(tie + tie * 2f64.powi(-40));
            xs.push(tie - tie * 2f64.powi(-40));
        }
        for &x in &xs {
            let gb = half::bf16::from_f32(x as f32).to_bits();
            assert_eq!(f64_to_bf16_bits(x), nearest(x, bf, gb), "bf16 {x:e}");
            if x.abs() < 60000.0 && x.abs() > 1e-4 {
                let gh = half::f16::from_f32(x as f32).to_bits();
                assert_eq!(f64_to_f16_bits(x), nearest(x, hf, gh), "f16 {x:e}");
            }
        }
        assert!(f64_to_bf16_bits(f64::NAN) & 0x7fff > 0x7f80);
        assert_eq!(f64_to_bf16_bits(1e300), 0x7f80);
        assert_eq!(f64_to_bf16_bits(-1e-300), 0x8000);
        assert_eq!(f64_to_f16_bits(1e10), 0x7c00);
        assert_eq!(f64_to_f32_round_odd(0.5), 0.5);
    }

    #[test]
    fn nonfinite_detection() {
        for dt in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let mut bytes = Vec::new();
            Values::F64(&[1.0, 2.0, f64::NAN, 3.0])
                .encode_into(0, 4, dt, &mut bytes)
                .unwrap();
            assert_eq!(dt.first_nonfinite(&bytes), Some(2), "{dt}");
            let mut bytes = Vec::new();
            Values::F64(&[1.0, -65000.0])
                .encode_into(0, 2, dt, &mut bytes)
                .unwrap();
            assert_eq!(dt.first_nonfinite(&bytes), None, "{dt}");
        }
    }
}
