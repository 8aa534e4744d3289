//! The activation store (normative spec: docs/FORMAT.md, format_version 1).
//!
//! A folder with a JSON manifest `layerscope.json` and safetensors shards
//! `shard-NNNNN.safetensors`. Each shard holds one `[rows, dim]` tensor per layer (F16, BF16,
//! F32 or F64; the same `rows` for every layer), an I64 `__row_id__ [rows]` and optional I64
//! row columns (`__sample__`, `__position__`, `__label__`).
//!
//! * [`Store`]: opens, validates everything before trusting it, memory-maps the shards and
//!   reads row ranges / gathers / row blocks of any layers as `f32` or `f64` (unaligned-safe).
//! * [`stream`]: THE block reader — [`RowSource`]s ([`StoreRows`], side by side [`Rows`]) and
//!   [`stream::run`], the one pass over row blocks that every streaming engine consumes.
//! * [`StoreWriter`]: appends batches, rotates shards by size, commits each shard and the
//!   manifest atomically, so an interrupted writer leaves a valid store of finished shards.
mod dtype;
pub mod files;
mod lock;
mod manifest;
mod mapped;
mod reader;
mod shard;
pub mod stream;
pub mod views;
mod writer;

pub use dtype::{DType, Element, Values};
pub use lock::LOCK_NAME;
pub use manifest::{
    LayerInfo, Manifest, ShardInfo, FORMAT_TAG, FORMAT_VERSION, KNOWN_COLUMNS, MANIFEST_NAME,
    ROW_ID,
};
pub use reader::{OpenOptions, Store};
pub use shard::{parse_header, MAX_HEADER_BYTES};
pub use stream::{ReadAs, RowSource, Rows, StoreRows};
pub use views::{Columns, RowRange, Subset};
pub use writer::{ArrayData, StoreWriter, WriterOptions};

#[cfg(test)]
mod tests;
