//! The manifest `layerscope.json`: parsing with full validation, and serialisation.
use super::dtype::DType;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::path::Path;

/// The name of the manifest file inside a store folder.
pub const MANIFEST_NAME: &str = "layerscope.json";
/// The `format` tag of a manifest.
pub const FORMAT_TAG: &str = "layerscope-store";
/// The only format version this library reads and writes.
pub const FORMAT_VERSION: u64 = 1;
/// The row-id tensor every shard holds.
pub const ROW_ID: &str = "__row_id__";
/// The well-known optional row columns (any `__name__` column is allowed; these are documented).
pub const KNOWN_COLUMNS: [&str; 3] = ["__sample__", "__position__", "__label__"];
/// Largest manifest file accepted (bytes).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// One layer of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub name: String,
    pub dim: usize,
    pub dtype: DType,
}

/// One shard as recorded by the manifest (plus its first global row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// File name inside the store folder (a single plain path component).
    pub file: String,
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256 of the whole shard file.
    pub sha256: String,
    /// Global index of the shard's first row.
    pub start_row: u64,
}

/// The parsed, validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub layers: Vec<LayerInfo>,
    pub columns: Vec<String>,
    pub shards: Vec<ShardInfo>,
    pub num_rows: u64,
    pub complete: bool,
    pub metadata: Value,
}

/// True for a name that may be a shard file: one plain path component, no separators, not
/// `.`/`..`, no NUL, not hidden (temp files are hidden).
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0', ':'])
        && name.len() <= 255
}

/// True for a valid optional column name: `__x__` with a non-empty inner part, not reserved.
pub fn is_column_name(name: &str) -> bool {
    name.len() > 4
        && name.starts_with("__")
        && name.ends_with("__")
        && name != ROW_ID
        && name != "__metadata__"
}

/// True for a valid layer name: non-empty, not starting with `__` (reserved for columns).
pub fn is_layer_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with("__") && name.len() <= 4096
}

fn get_u64(obj: &Map<String, Value>, key: &str, path: &Path, what: &str) -> Result<u64> {
    match obj.get(key) {
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::format(
                path,
                format!("{what}: \"{key}\" must be a non-negative integer, got {v}"),
            )
        }),
        None => Err(Error::format(path, format!("{what}: missing \"{key}\""))),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &Path, what: &str) -> Result<&'a str> {
    match obj.get(key) {
        Some(v) => v.as_str().ok_or_else(|| {
            Error::format(path, format!("{what}: \"{key}\" must be a string, got {v}"))
        }),
        None => Err(Error::format(path, format!("{what}: missing \"{key}\""))),
    }
}

/// The manifest's array `key` of objects, each with its place (`"layers[3]"`) for messages.
fn objects<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &Path,
) -> Result<Vec<(String, &'a Map<String, Value>)>> {
    let items = obj
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| Error::format(path, format!("manifest: \"{key}\" must be an array")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let what = format!("{key}[{i}]");
            match v.as_object() {
                Some(o) => Ok((what, o)),
                None => Err(Error::format(path, format!("{what} must be an object"))),
            }
        })
        .collect()
}

impl Manifest {
    /// The layers' names, in order.
    pub fn layer_names(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.name.as_str()).collect()
    }

    /// Parses and validates manifest bytes. `path` is used in error messages only.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::format(path, format!("manifest is not UTF-8: {e}")))?;
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("manifest is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "manifest must be a JSON object"))?;
        match obj.get("format").and_then(Value::as_str) {
            Some(FORMAT_TAG) => {}
            other => {
                return Err(Error::format(
                    path,
                    format!("manifest \"format\" must be \"{FORMAT_TAG}\", got {other:?}"),
                ))
            }
        }
        let version = get_u64(obj, "format_version", path, "manifest")?;
        if version != FORMAT_VERSION {
            return Err(Error::format(
                path,
                format!("unsupported format_version {version}; this library reads version {FORMAT_VERSION}"),
            ));
        }
        // layers
        let layers_v = objects(obj, "layers", path)?;
        let mut layers = Vec::with_capacity(layers_v.len());
        let mut seen = HashSet::new();
        for (what, lo) in layers_v {
            let name = get_str(lo, "name", path, &what)?;
            if !is_layer_name(name) {
                return Err(Error::format(
                    path,
                    format!("{what}: invalid layer name {name:?} (empty, or starts with \"__\")"),
                ));
            }
            if !seen.insert(name.to_string()) {
                return Err(Error::format(
                    path,
                    format!("duplicate layer name {name:?}"),
                ));
            }
            let dim = get_u64(lo, "dim", path, &what)?;
            if dim == 0 || dim > (1 << 32) {
                return Err(Error::format(
                    path,
                    format!("layer {name:?}: dim {dim} out of range [1, 2^32]"),
                ));
            }
            let dts = get_str(lo, "dtype", path, &what)?;
            let dtype = DType::from_name(dts).ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "layer {name:?}: unknown dtype {dts:?}, expected F16, BF16, F32 or F64"
                    ),
                )
            })?;
            layers.push(LayerInfo {
                name: name.to_string(),
                dim: dim as usize,
                dtype,
            });
        }
        // columns
        let mut columns = Vec::new();
        if let Some(c) = obj.get("columns") {
            let arr = c.as_array().ok_or_else(|| {
                Error::format(path, "manifest: \"columns\" must be an array of names")
            })?;
            let mut seen = HashSet::new();
            for c in arr {
                let name = c.as_str().ok_or_else(|| {
                    Error::format(
                        path,
                        format!("manifest: column name must be a string, got {c}"),
                    )
                })?;
                if !is_column_name(name) {
                    return Err(Error::format(
                        path,
                        format!(
                            "invalid column name {name:?} (expected \"__name__\", not __row_id__)"
                        ),
                    ));
                }
                if !seen.insert(name) {
                    return Err(Error::format(
                        path,
                        format!("duplicate column name {name:?}"),
                    ));
                }
                columns.push(name.to_string());
            }
        }
        // shards
        let shards_v = objects(obj, "shards", path)?;
        if !shards_v.is_empty() && layers.is_empty() {
            return Err(Error::format(path, "manifest lists shards but no layers"));
        }
        let mut shards = Vec::with_capacity(shards_v.len());
        let mut files = HashSet::new();
        let mut start_row: u64 = 0;
        for (what, so) in shards_v {
            let file = get_str(so, "file", path, &what)?;
            if !is_plain_file_name(file) {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: shard file name {file:?} must be a plain file name inside the store folder \
                         (no path separators, no \"..\", not absolute, not hidden)"
                    ),
                ));
            }
            if !files.insert(file.to_string()) {
                return Err(Error::format(
                    path,
                    format!("{what}: shard file {file:?} listed twice"),
                ));
            }
            let rows = get_u64(so, "rows", path, &what)?;
            let bytes = get_u64(so, "bytes", path, &what)?;
            let sha = get_str(so, "sha256", path, &what)?;
            if sha.len() != 64
                || !sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Error::format(
                    path,
                    format!("{what}: sha256 must be 64 lower-case hex digits"),
                ));
            }
            shards.push(ShardInfo {
                file: file.to_string(),
                rows,
                bytes,
                sha256: sha.to_string(),
                start_row,
            });
            start_row = start_row
                .checked_add(rows)
                .ok_or_else(|| Error::format(path, "total row count overflows"))?;
        }
        let num_rows = get_u64(obj, "num_rows", path, "manifest")?;
        if num_rows != start_row {
            return Err(Error::format(
                path,
                format!("num_rows is {num_rows} but the shards hold {start_row} rows"),
            ));
        }
        let complete = match obj.get("complete") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(Error::format(
                    path,
                    format!("\"complete\" must be a boolean, got {v}"),
                ))
            }
        };
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(m @ Value::Object(_)) => m.clone(),
            Some(v) => {
                return Err(Error::format(
                    path,
                    format!("\"metadata\" must be a JSON object, got {v}"),
                ))
            }
        };
        Ok(Manifest {
            layers,
            columns,
            shards,
            num_rows,
            complete,
            metadata,
        })
    }

    /// The manifest as JSON (pretty, stable key order as written here).
    pub fn to_json(&self) -> Value {
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| json!({"name": l.name, "dim": l.dim, "dtype": l.dtype.name()}))
            .collect();
        let shards: Vec<Value> = self
            .shards
            .iter()
            .map(|s| json!({"file": s.file, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256}))
            .collect();
        json!({
            "format": FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "layers": layers,
            "columns": self.columns,
            "shards": shards,
            "num_rows": self.num_rows,
            "complete": self.complete,
            "metadata": self.metadata,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"format": FORMAT_TAG, "format_version": 1,
               "layers": [{"name": "a", "dim": 3, "dtype": "F32"}],
               "columns": ["__sample__"],
               "shards": [{"file": "shard-00000.safetensors", "rows": 2, "bytes": 100,
                           "sha256": "0".repeat(64)}],
               "num_rows": 2, "metadata": {"model": "x"}})
    }

    fn parse(v: &Value) -> Result<Manifest> {
        Manifest::parse(v.to_string().as_bytes(), Path::new("m.json"))
    }

    #[test]
    fn roundtrip() {
        let m = parse(&base()).unwrap();
        assert_eq!(m.layers[0].dtype, DType::F32);
        let again = Manifest::parse(&m.to_bytes(), Path::new("m.json")).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn rejects() {
        let cases: Vec<(&str, Value)> = vec![
            (
                "layers",
                json!([{"name": "a", "dim": 3, "dtype": "F32"}, {"name": "a", "dim": 3, "dtype": "F32"}]),
            ),
            ("layers", json!([{"name": "a", "dim": 3, "dtype": "Q8"}])),
            ("layers", json!([{"name": "a", "dim": 0, "dtype": "F32"}])),
            ("layers", json!([{"name": "__a", "dim": 3, "dtype": "F32"}])),
            ("num_rows", json!(3)),
            ("format_version", json!(2)),
            ("metadata", json!([1])),
            ("columns", json!(["sample"])),
        ];
        for (k, v) in cases {
            let mut m = base();
            m[k] = v.clone();
            assert!(matches!(parse(&m), Err(Error::Format { .. })), "{k} = {v}");
        }
        for bad in ["../x", "/abs", "a/b", "..", ".hidden", "a\\b", ""] {
            let mut m = base();
            m["shards"][0]["file"] = json!(bad);
            let e = parse(&m).unwrap_err();
            assert!(e.to_string().contains("plain file name"), "{bad}: {e}");
        }
        assert!(Manifest::parse(b"\xff\xfe", Path::new("m")).is_err());
        assert!(Manifest::parse(b"[1,2]", Path::new("m")).is_err());
    }
}
