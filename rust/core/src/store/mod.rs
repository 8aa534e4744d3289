//! The activation store (normative spec: docs/FORMAT.md, format_version 1).
//!
//! A folder with a JSON manifest `layerscope.json` and safetensors shards
//! `shard-NNNNN.safetensors`. Each shard holds one `[rows, dim]` tensor per layer (F16, BF16,
//! F32 or F64; the same `rows` for every layer), an I64 `__row_id__ [rows]` and optional I64
//! row columns (`__sample__`, `__position__`, `__label__`).
//!
//! * [`Store`]: opens, validates everything before trusting it, memory-maps the shards and
//!   reads row ranges / gathers / row blocks of any layers as `f32` or `f64` (unaligned-safe).
//! * [`StoreWriter`]: appends batches, rotates shards by size, commits each shard and the
//!   manifest atomically, so an interrupted writer leaves a valid store of finished shards.
mod dtype;
mod manifest;
mod reader;
mod shard;
mod writer;

pub use dtype::{DType, Element, Values};
pub use manifest::{
    LayerInfo, Manifest, ShardInfo, FORMAT_TAG, FORMAT_VERSION, KNOWN_COLUMNS, MANIFEST_NAME,
    ROW_ID,
};
pub use reader::{Block, OpenOptions, Store};
pub use shard::{parse_header, MAX_HEADER_BYTES};
pub use writer::{ArrayData, StoreWriter, WriterOptions};

#[cfg(test)]
mod tests;
