//! Reader/writer round trips and bad-input cases.
use super::*;
use crate::error::Error;
use serde_json::json;
use std::path::Path;

fn data(rows: usize, cols: usize, seed: f64) -> Vec<f64> {
    (0..rows * cols)
        .map(|i| ((i as f64 + seed) * 0.37).sin() * 100.0 + seed)
        .collect()
}

fn write(path: &Path, dtype: Option<DType>, shard_bytes: u64, rows: usize) -> (Vec<f64>, Vec<f64>) {
    let a = data(rows, 3, 1.0);
    let b = data(rows, 5, 2.0);
    let opts = WriterOptions {
        shard_bytes,
        dtype,
        metadata: json!({"model": "m"}),
        ..Default::default()
    };
    let mut w = StoreWriter::create(path, opts).unwrap();
    // two appends of uneven size
    let h = rows / 3;
    for (s, e) in [(0, h), (h, rows)] {
        let sample: Vec<i64> = (s..e).map(|i| (i / 2) as i64).collect();
        w.append(
            &[
                ("a", ArrayData::new(Values::F64(&a[s * 3..e * 3]), e - s, 3)),
                ("b", ArrayData::new(Values::F64(&b[s * 5..e * 5]), e - s, 5)),
            ],
            None,
            &[("__sample__", &sample)],
        )
        .unwrap();
    }
    w.finish().unwrap();
    (a, b)
}

#[test]
fn roundtrip_f64_many_shards() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let (a, b) = write(&p, None, 200, 50);
    let s = Store::open(&p).unwrap();
    assert!(s.shards().len() > 5);
    assert_eq!(s.num_rows(), 50);
    assert!(s.is_complete());
    assert_eq!(
        s.layers()[1],
        LayerInfo {
            name: "b".into(),
            dim: 5,
            dtype: DType::F64
        }
    );
    assert_eq!(s.read_rows::<f64>(0, 0, 50).unwrap(), a);
    assert_eq!(
        s.read_rows::<f64>(1, 7, 33).unwrap(),
        b[7 * 5..33 * 5].to_vec()
    );
    assert_eq!(s.row_ids().unwrap(), (0..50).collect::<Vec<i64>>());
    assert_eq!(s.column("__sample__").unwrap().unwrap()[11], 5);
    assert_eq!(s.column("__label__").unwrap(), None);
    assert_eq!(s.metadata()["model"], "m");
    let t = s.take::<f64>(1, &[49, 0, 17]).unwrap();
    assert_eq!(&t[..5], &b[49 * 5..50 * 5]);
    assert_eq!(&t[10..], &b[17 * 5..18 * 5]);
    let blocks: Vec<_> = s
        .blocks::<f64>(&[1, 0], 7)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(blocks.len(), 8);
    assert_eq!(blocks[7].rows, 1);
    assert_eq!(blocks[2].start, 14);
    assert_eq!(blocks[2].data[1], a[14 * 3..21 * 3].to_vec());
    s.verify().unwrap();
    assert_eq!(s.find_nonfinite(0).unwrap(), None);
    assert!(matches!(s.layer_index("zz"), Err(Error::MissingLayer(m)) if m.contains("a, b")));
    assert!(s.read_rows::<f32>(0, 3, 51).is_err());
    assert!(s.read_rows::<f32>(2, 0, 1).is_err());
    assert!(s.take::<f32>(0, &[50]).is_err());
    assert!(s.blocks::<f32>(&[0], 0).next().unwrap().is_err());
}

#[test]
fn roundtrip_half_types_exact() {
    for dt in [DType::BF16, DType::F16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let (a, _) = write(&p, Some(dt), 1 << 20, 20);
        let s = Store::open(&p).unwrap();
        let got = s.read_rows::<f32>(0, 0, 20).unwrap();
        let got64 = s.read_rows::<f64>(0, 0, 20).unwrap();
        for ((x, g), g64) in a.iter().zip(&got).zip(&got64) {
            let want = match dt {
                DType::BF16 => half::bf16::from_f64(*x).to_f32(),
                DType::F16 => half::f16::from_f64(*x).to_f32(),
                _ => *x as f32,
            };
            assert_eq!(*g, want, "{dt}");
            assert_eq!(*g64, want as f64, "{dt}");
        }
    }
}

#[test]
fn large_parallel_read_matches_serial() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let rows = 3000;
    let a: Vec<f32> = (0..rows * 200).map(|i| i as f32 * 0.5).collect();
    let mut w = StoreWriter::create(
        &p,
        WriterOptions {
            shard_bytes: 300_000,
            dtype: Some(DType::BF16),
            ..Default::default()
        },
    )
    .unwrap();
    w.append(
        &[("x", ArrayData::new(Values::F32(&a), rows, 200))],
        None,
        &[],
    )
    .unwrap();
    w.finish().unwrap();
    let s = Store::open(&p).unwrap();
    let all = s.read_rows::<f32>(0, 0, rows as u64).unwrap();
    for (i, v) in all.iter().enumerate() {
        assert_eq!(*v, half::bf16::from_f32(a[i]).to_f32());
    }
    let part = s.read_rows::<f32>(0, 1234, 2900).unwrap();
    assert_eq!(part, all[1234 * 200..2900 * 200].to_vec());
}

#[test]
fn nonfinite_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let mut a = data(40, 3, 0.0);
    a[25 * 3 + 1] = f64::NAN;
    a[33 * 3] = f64::INFINITY;
    let mut w = StoreWriter::create(
        &p,
        WriterOptions {
            shard_bytes: 100,
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    w.append(&[("a", ArrayData::new(Values::F64(&a), 40, 3))], None, &[])
        .unwrap();
    w.finish().unwrap();
    let s = Store::open(&p).unwrap();
    assert_eq!(s.find_nonfinite(0).unwrap(), Some(25));
    assert!(s.read_rows::<f64>(0, 25, 26).unwrap()[1].is_nan());
}

#[test]
fn interrupted_writer_leaves_valid_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let a = data(10, 4, 0.0);
    {
        let mut w = StoreWriter::create(
            &p,
            WriterOptions {
                shard_bytes: 4 * (4 * 8 + 8),
                ..Default::default()
            },
        )
        .unwrap();
        w.append(
            &[("a", ArrayData::new(Values::F64(&a), 10, 4))],
            Some(&(100..110).collect::<Vec<i64>>()),
            &[],
        )
        .unwrap();
        assert_eq!(w.rows_committed(), 8);
        // dropped without finish: the 2 buffered rows are lost, the 8 committed rows stay
    }
    let s = Store::open(&p).unwrap();
    assert_eq!(s.num_rows(), 8);
    assert!(!s.is_complete());
    assert_eq!(s.row_ids().unwrap(), (100..108).collect::<Vec<i64>>());
    assert_eq!(s.read_rows::<f64>(0, 0, 8).unwrap(), a[..32].to_vec());
    s.verify().unwrap();
    // no temp files left
    let names: Vec<String> = std::fs::read_dir(&p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn writer_checks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    write(&p, None, 1000, 10);
    std::fs::write(p.join("notes.txt"), "keep me").unwrap();
    assert!(matches!(
        StoreWriter::create(&p, WriterOptions::default()),
        Err(Error::Exists { .. })
    ));
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(
        StoreWriter::create(
            &file,
            WriterOptions {
                overwrite: true,
                ..Default::default()
            }
        ),
        Err(Error::Exists { .. })
    ));
    let mut w = StoreWriter::create(
        &p,
        WriterOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(p.join("notes.txt").exists());
    assert!(!p.join("shard-00000.safetensors").exists());
    let x = [1.0f32; 6];
    w.append(&[("a", ArrayData::new(Values::F32(&x), 2, 3))], None, &[])
        .unwrap();
    let e = w
        .append(&[("b", ArrayData::new(Values::F32(&x), 2, 3))], None, &[])
        .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    let e = w
        .append(&[("a", ArrayData::new(Values::F32(&x), 3, 2))], None, &[])
        .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    let e = w
        .append(&[("a", ArrayData::new(Values::F32(&x), 2, 2))], None, &[])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = w
        .append(
            &[("a", ArrayData::new(Values::F32(&x), 2, 3))],
            Some(&[1]),
            &[],
        )
        .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    w.finish().unwrap();
    let s = Store::open(&p).unwrap();
    assert_eq!(s.num_rows(), 2);
    assert_eq!(s.layers().len(), 1);
}

/// Writes a valid 1-shard store and returns (folder, shard path, manifest path).
fn small(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = dir.join("s");
    write(&p, Some(DType::F32), 1 << 20, 6);
    (
        p.clone(),
        p.join("shard-00000.safetensors"),
        p.join(MANIFEST_NAME),
    )
}

fn edit_manifest(m: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(m).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(m, v.to_string()).unwrap();
}

#[test]
fn bad_stores() {
    let dir = tempfile::tempdir().unwrap();
    // missing folder / manifest
    assert!(matches!(
        Store::open(&dir.path().join("nope")),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        Store::open(dir.path()),
        Err(Error::NotFound { .. })
    ));

    // truncated shard
    let (p, sh, _) = small(&dir.path().join("t"));
    let bytes = std::fs::read(&sh).unwrap();
    std::fs::write(&sh, &bytes[..bytes.len() - 10]).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert!(
        matches!(e, Error::Format { .. }) && e.to_string().contains("truncated"),
        "{e}"
    );

    // missing shard
    let (p, sh, _) = small(&dir.path().join("m"));
    std::fs::remove_file(&sh).unwrap();
    assert!(matches!(Store::open(&p), Err(Error::NotFound { .. })));

    // manifest disagrees: rows, dims, dtype, bytes, checksum
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "rows",
            Box::new(|v| {
                v["shards"][0]["rows"] = json!(5);
                v["num_rows"] = json!(5);
            }),
        ),
        ("dim", Box::new(|v| v["layers"][0]["dim"] = json!(4))),
        (
            "dtype",
            Box::new(|v| v["layers"][0]["dtype"] = json!("F16")),
        ),
        ("bytes", Box::new(|v| v["shards"][0]["bytes"] = json!(12))),
    ];
    for (what, f) in cases {
        let (p, _, m) = small(&dir.path().join(format!("x{what}")));
        edit_manifest(&m, f);
        let e = Store::open(&p).unwrap_err();
        assert!(matches!(e, Error::Mismatch(_)), "{what}: {e}");
        assert!(
            e.to_string().contains("shard-00000.safetensors"),
            "{what}: {e}"
        );
    }
    let (p, _, m) = small(&dir.path().join("sha"));
    edit_manifest(&m, |v| v["shards"][0]["sha256"] = json!("a".repeat(64)));
    let s = Store::open(&p).unwrap();
    assert!(matches!(s.verify(), Err(Error::Mismatch(_))));
    assert!(Store::open_with(
        &p,
        OpenOptions {
            verify_checksums: true
        }
    )
    .is_err());

    // escaping names
    for bad in ["../x.safetensors", "/etc/passwd"] {
        let (p, _, m) = small(&dir.path().join(format!("e{}", bad.len())));
        edit_manifest(&m, |v| v["shards"][0]["file"] = json!(bad));
        let e = Store::open(&p).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
    }
    #[cfg(unix)]
    {
        let (p, sh, _) = small(&dir.path().join("link"));
        let outside = dir.path().join("outside.safetensors");
        std::fs::rename(&sh, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &sh).unwrap();
        let e = Store::open(&p).unwrap_err();
        assert!(e.to_string().contains("outside the store folder"), "{e}");
    }
    // duplicate layer names
    let (p, _, m) = small(&dir.path().join("dup"));
    edit_manifest(&m, |v| {
        let l = v["layers"][0].clone();
        v["layers"][1] = l;
    });
    assert!(Store::open(&p)
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
}

#[test]
fn foreign_shard_contents() {
    // A shard whose layers disagree in rows, and one without __row_id__.
    let dir = tempfile::tempdir().unwrap();
    let (p, sh, _) = small(dir.path());
    let mk = |tensors: &[(&str, &str, Vec<u64>, u64)]| {
        let mut b = shard::build_header(tensors, &[]);
        let n: u64 = tensors.iter().map(|t| t.3).sum();
        b.extend(std::iter::repeat_n(0u8, n as usize));
        b
    };
    let f = mk(&[
        ("__row_id__", "I64", vec![6], 48),
        ("__sample__", "I64", vec![6], 48),
        ("a", "F32", vec![6, 3], 72),
        ("b", "F32", vec![5, 5], 100),
    ]);
    std::fs::write(&sh, &f).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert!(
        matches!(e, Error::Format { .. }) && e.to_string().contains("rows differ across layers"),
        "{e}"
    );
    let f = mk(&[
        ("__sample__", "I64", vec![6], 48),
        ("a", "F32", vec![6, 3], 72),
        ("b", "F32", vec![6, 5], 120),
    ]);
    std::fs::write(&sh, &f).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert!(e.to_string().contains("__row_id__"), "{e}");
    let f = mk(&[
        ("__row_id__", "F64", vec![6], 48),
        ("__sample__", "I64", vec![6], 48),
        ("a", "F32", vec![6, 3], 72),
        ("b", "F32", vec![6, 5], 120),
    ]);
    std::fs::write(&sh, &f).unwrap();
    let e = Store::open(&p).unwrap_err();
    assert!(e.to_string().contains("expected I64"), "{e}");
}
