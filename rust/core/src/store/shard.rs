//! Shard files: safetensors header parsing with our own checks (every failure names the file,
//! the tensor and the expectation), backed by the `safetensors` crate as a second opinion so
//! that every accepted shard is also a valid safetensors file; and header serialisation.
use crate::error::{Error, Result};
use serde_json::Value;
use std::ops::Range;
use std::path::Path;

/// Largest header accepted (the safetensors limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types that may appear in a shard (layers: floats; row columns: I64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorDType {
    Float(super::dtype::DType),
    I64,
    /// Any other valid safetensors dtype name (rejected later with a clear message).
    Other(&'static str),
}

impl TensorDType {
    fn parse(s: &str) -> Option<TensorDType> {
        if let Some(d) = super::dtype::DType::from_name(s) {
            return Some(TensorDType::Float(d));
        }
        const OTHERS: [&str; 17] = [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "F8_E8M0",
            "F4",
            "F6_E2M3",
            "F6_E3M2",
            "I16",
            "U16",
            "I32",
            "U32",
            "U64",
            "C64",
            "F8_E4M3FNUZ",
            "F8_E5M2FNUZ",
        ];
        match s {
            "I64" => Some(TensorDType::I64),
            _ => OTHERS
                .iter()
                .find(|o| **o == s)
                .map(|o| TensorDType::Other(o)),
        }
    }
    fn bits(self) -> u64 {
        match self {
            TensorDType::Float(d) => 8 * d.size() as u64,
            TensorDType::I64 => 64,
            TensorDType::Other(n) => match n {
                "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
                | "F8_E5M2FNUZ" => 8,
                "F4" => 4,
                "F6_E2M3" | "F6_E3M2" => 6,
                "I16" | "U16" => 16,
                "I32" | "U32" => 32,
                _ => 64,
            },
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TensorDType::Float(d) => d.name(),
            TensorDType::I64 => "I64",
            TensorDType::Other(n) => n,
        }
    }
}

/// One tensor of a parsed header; `range` is absolute within the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<u64>,
    pub range: Range<usize>,
}

/// Parses and validates the safetensors header of `buf` (the whole file).
/// Checks: header length within the file and ≤ 100 MB, UTF-8, a JSON object, each entry with a
/// known dtype, integer shape and offsets, `shape × dtype = bytes`, offsets sorted contiguous
/// from 0 without overlap or gap, and the data ending exactly at the end of the file.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<Vec<TensorEntry>> {
    let file_len = buf.len() as u64;
    let Some(len_bytes) = buf.get(..8) else {
        return Err(Error::format(
            path,
            format!("file of {file_len} bytes is too short for a safetensors header (truncated?)"),
        ));
    };
    let mut a = [0u8; 8];
    a.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(a);
    if n > MAX_HEADER_BYTES {
        return Err(Error::format(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte (100 MB) limit"),
        ));
    }
    if n > file_len - 8 {
        return Err(Error::format(
            path,
            format!(
                "header length {n} goes beyond the end of the file ({file_len} bytes; truncated?)"
            ),
        ));
    }
    let data_start = 8 + n as usize;
    let header = &buf[8..data_start];
    let text = std::str::from_utf8(header)
        .map_err(|e| Error::format(path, format!("header is not UTF-8: {e}")))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("header is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(Error::format(path, "header must be a JSON object"));
    };
    let mut entries = Vec::with_capacity(obj.len());
    for (name, info) in &obj {
        if name == "__metadata__" {
            let ok = info
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(Error::format(
                    path,
                    "__metadata__ must be an object of strings",
                ));
            }
            continue;
        }
        let bad = |msg: String| Error::format(path, format!("tensor {name:?}: {msg}"));
        let io = info
            .as_object()
            .ok_or_else(|| bad("entry must be an object".into()))?;
        let dts = io
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing string \"dtype\"".into()))?;
        let dtype = TensorDType::parse(dts).ok_or_else(|| bad(format!("unknown dtype {dts:?}")))?;
        let shape_v = io
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing array \"shape\"".into()))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        for s in shape_v {
            shape
                .push(s.as_u64().ok_or_else(|| {
                    bad(format!("shape entry {s} is not a non-negative integer"))
                })?);
        }
        let off = io
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing array \"data_offsets\"".into()))?;
        let (Some(s), Some(e), 2) = (
            off.first().and_then(Value::as_u64),
            off.get(1).and_then(Value::as_u64),
            off.len(),
        ) else {
            return Err(bad(format!(
                "data_offsets must be two non-negative integers, got {}",
                Value::Array(off.clone())
            )));
        };
        if e < s {
            return Err(bad(format!(
                "data_offsets [{s}, {e}] end before they start"
            )));
        }
        let data_len = file_len - data_start as u64;
        if e > data_len {
            return Err(bad(format!(
                "data_offsets [{s}, {e}] out of bounds: the data section has {data_len} bytes (truncated?)"
            )));
        }
        let nbits = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bits()))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if nbits % 8 != 0 || nbits / 8 != e - s {
            return Err(bad(format!(
                "shape {shape:?} × {} = {} bytes, but data_offsets [{s}, {e}] span {} bytes",
                dtype.name(),
                nbits as f64 / 8.0,
                e - s
            )));
        }
        entries.push(TensorEntry {
            name: name.clone(),
            dtype,
            shape,
            range: (data_start + s as usize)..(data_start + e as usize),
        });
    }
    entries.sort_by_key(|t| (t.range.start, t.range.end));
    let mut pos = data_start;
    for t in &entries {
        if t.range.start < pos {
            return Err(Error::format(
                path,
                format!(
                    "tensor {:?}: data_offsets overlap the previous tensor",
                    t.name
                ),
            ));
        }
        if t.range.start > pos {
            return Err(Error::format(
                path,
                format!(
                    "tensor {:?}: data_offsets not contiguous ({} unused bytes before it)",
                    t.name,
                    t.range.start - pos
                ),
            ));
        }
        pos = t.range.end;
    }
    if pos != buf.len() {
        return Err(Error::format(
            path,
            format!("{} trailing bytes after the last tensor", buf.len() - pos),
        ));
    }
    // Second opinion: the reference parser must accept it too (interoperability).
    if let Err(e) = safetensors::SafeTensors::read_metadata(buf) {
        return Err(Error::format(
            path,
            format!("rejected by the safetensors parser: {e}"),
        ));
    }
    Ok(entries)
}

/// Builds a safetensors header for tensors laid out in the given order, contiguously.
/// Returns the 8-byte length prefix + JSON padded with spaces to a multiple of 8.
pub fn build_header(tensors: &[(&str, &str, Vec<u64>, u64)], meta: &[(&str, &str)]) -> Vec<u8> {
    // (name, dtype name, shape, byte length)
    let mut s = String::from("{");
    if !meta.is_empty() {
        s.push_str("\"__metadata__\":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&Value::from(*k).to_string());
            s.push(':');
            s.push_str(&Value::from(*v).to_string());
        }
        s.push('}');
    }
    let mut off = 0u64;
    for (i, (name, dt, shape, len)) in tensors.iter().enumerate() {
        if i > 0 || !meta.is_empty() {
            s.push(',');
        }
        let shape_s: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(
            "{}:{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            Value::from(*name),
            shape_s.join(","),
            off + len
        ));
        off += len;
    }
    s.push('}');
    while (s.len() + 8) % 8 != 0 {
        s.push(' ');
    }
    let mut out = Vec::with_capacity(8 + s.len());
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, &str, Vec<u64>, u64)]) -> Vec<u8> {
        let mut b = build_header(tensors, &[("format", "layerscope-shard")]);
        let total: u64 = tensors.iter().map(|t| t.3).sum();
        b.extend(std::iter::repeat_n(0u8, total as usize));
        b
    }

    #[test]
    fn build_and_parse() {
        let b = file(&[
            ("__row_id__", "I64", vec![3], 24),
            ("a", "BF16", vec![3, 5], 30),
        ]);
        let e = parse_header(&b, Path::new("s")).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, "a");
        assert_eq!(e[1].range.len(), 30);
        assert_eq!((b.len() - 54) % 8, 0);
    }

    fn header_bytes(json: &str, data: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        b
    }

    #[test]
    fn bad_headers() {
        let p = Path::new("s");
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
                20,
                "contiguous",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "out of bounds",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "bytes",
            ),
            (
                r#"{"a":{"dtype":"Q8","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "unknown dtype",
            ),
            (r#"[1,2]"#, 0, "JSON object"),
            (r#"{"a":1"#, 0, "JSON"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                12,
                "trailing",
            ),
        ];
        for (json, data, want) in cases {
            let e = parse_header(&header_bytes(json, data), p).unwrap_err();
            assert!(e.to_string().contains(want), "{json}: {e}");
            assert!(matches!(e, Error::Format { .. }));
        }
        let mut b = header_bytes("{}", 0);
        b[8] = 0xff;
        assert!(parse_header(&b, p)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
        let mut b = header_bytes("{}", 0);
        b[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
        assert!(parse_header(&b, p)
            .unwrap_err()
            .to_string()
            .contains("100 MB"));
        b[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(parse_header(&b, p)
            .unwrap_err()
            .to_string()
            .contains("beyond the end"));
        assert!(parse_header(&b[..5], p)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }
}
