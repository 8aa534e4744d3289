//! Bounded fuzzing of shard-header and manifest parsing: random and mutated bytes must give
//! a typed error or a valid result, never a panic.
use layerscope_core::store::{
    parse_header, ArrayData, Manifest, Store, StoreWriter, Values, WriterOptions,
};
use layerscope_core::Error;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// A valid store written once; returns (shard bytes, manifest bytes).
fn valid() -> &'static (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    static V: OnceLock<(tempfile::TempDir, Vec<u8>, Vec<u8>)> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let a: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut w = StoreWriter::create(&p, WriterOptions::default()).unwrap();
        w.append(
            &[("a", ArrayData::new(Values::F32(&a), 4, 3))],
            None,
            &[("__sample__", &[0, 0, 1, 1])],
        )
        .unwrap();
        w.finish().unwrap();
        let shard = std::fs::read(p.join("shard-00000.safetensors")).unwrap();
        let man = std::fs::read(p.join("layerscope.json")).unwrap();
        (dir, shard, man)
    })
}

fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::Format { .. } | Error::Mismatch(_) | Error::NotFound { .. } | Error::Io { .. }
    )
}

fn mutate(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(i, v) in edits {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn header_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = parse_header(&bytes, Path::new("f")) { prop_assert!(typed(&e)); }
    }

    #[test]
    fn header_random_json(json in "\\{(\"[a-z_]{0,4}\":\\{\"dtype\":\"(F32|BF16|I64|Q8)\",\"shape\":\\[[0-9]{0,2}(,[0-9]{1,2})?\\],\"data_offsets\":\\[[0-9]{1,3},[0-9]{1,3}\\]\\},?){0,3}\\}", pad in 0usize..64) {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, pad));
        if let Err(e) = parse_header(&b, Path::new("f")) { prop_assert!(typed(&e)); }
    }

    #[test]
    fn header_mutated(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in proptest::option::of(any::<usize>())) {
        let b = mutate(&valid().1, &edits, cut);
        if let Err(e) = parse_header(&b, Path::new("f")) { prop_assert!(typed(&e)); }
    }

    #[test]
    fn manifest_mutated(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in proptest::option::of(any::<usize>())) {
        let b = mutate(&valid().2, &edits, cut);
        if let Err(e) = Manifest::parse(&b, Path::new("m")) { prop_assert!(typed(&e)); }
    }

    #[test]
    fn open_mutated_store(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), target_manifest in any::<bool>(), cut in proptest::option::of(any::<usize>())) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::create_dir(&p).unwrap();
        let (_, shard, man) = valid();
        let (s, m) = if target_manifest { (shard.clone(), mutate(man, &edits, cut)) } else { (mutate(shard, &edits, cut), man.clone()) };
        std::fs::write(p.join("shard-00000.safetensors"), s).unwrap();
        std::fs::write(p.join("layerscope.json"), m).unwrap();
        match Store::open(&p) {
            Err(e) => prop_assert!(typed(&e), "{e}"),
            Ok(st) => {
                // whatever was accepted must be readable without panicking
                for l in 0..st.layers().len() {
                    let _ = st.read_rows::<f64>(l, 0, st.num_rows());
                    let _ = st.find_nonfinite(l);
                }
                let _ = st.row_ids();
                let _ = st.verify();
            }
        }
    }
}
