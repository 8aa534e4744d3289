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

/// A streamed block: `(start, rows, one row-major buffer per layer)`.
type Streamed<T> = (u64, usize, Vec<Vec<T>>);

/// Every block of `layers` streamed by the one block reader.
fn collect_blocks<T: stream::ReadAs>(
    s: &Store,
    layers: &[usize],
    block_rows: usize,
) -> Result<Vec<Streamed<T>>, Error> {
    let src = stream::StoreRows::new(s, layers.to_vec())?;
    let mut out = Vec::new();
    let mut start = 0u64;
    stream::run::<T>(&src, block_rows, &crate::monitor::NoMonitor, |blk, rows| {
        out.push((start, rows, blk.iter().map(|b| b.to_vec()).collect()));
        start += rows as u64;
        Ok(())
    })?;
    Ok(out)
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
    let blocks = collect_blocks::<f64>(&s, &[1, 0], 7).unwrap();
    assert_eq!(blocks.len(), 8);
    assert_eq!(blocks[7].1, 1);
    assert_eq!(blocks[2].0, 14);
    assert_eq!(blocks[2].2[1], a[14 * 3..21 * 3].to_vec());
    s.verify().unwrap();
    assert_eq!(s.find_nonfinite(0).unwrap(), None);
    assert!(matches!(s.layer_index("zz"), Err(Error::MissingLayer(m)) if m.contains("a, b")));
    assert!(s.read_rows::<f32>(0, 3, 51).is_err());
    assert!(s.read_rows::<f32>(2, 0, 1).is_err());
    assert!(s.take::<f32>(0, &[50]).is_err());
    assert!(collect_blocks::<f32>(&s, &[0], 0).is_err());
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
    let mut w = StoreWriter::create(&p, sharded(300_000, Some(DType::BF16))).unwrap();
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
    let mut w = StoreWriter::create(&p, sharded(100, Some(DType::F32))).unwrap();
    w.append(&[("a", ArrayData::new(Values::F64(&a), 40, 3))], None, &[])
        .unwrap();
    w.finish().unwrap();
    let s = Store::open(&p).unwrap();
    assert_eq!(s.find_nonfinite(0).unwrap(), Some(25));
    assert!(s.read_rows::<f64>(0, 25, 26).unwrap()[1].is_nan());
}

/// Default writer options but for the shard size and the store dtype.
fn sharded(shard_bytes: u64, dtype: Option<DType>) -> WriterOptions {
    WriterOptions {
        shard_bytes,
        dtype,
        ..Default::default()
    }
}

#[test]
fn interrupted_writer_leaves_valid_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let a = data(10, 4, 0.0);
    {
        let mut w = StoreWriter::create(&p, sharded(4 * (4 * 8 + 8), None)).unwrap();
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
    // verify_checksums: opening stays cheap, the first read of the shard checks it
    let v = Store::open_with(
        &p,
        OpenOptions {
            verify_checksums: true,
        },
    )
    .unwrap();
    assert!(v.verifies_checksums());
    let e = v.read_rows::<f64>(0, 0, 2).unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");
    assert!(matches!(v.row_ids(), Err(Error::Mismatch(_))));
    assert!(s.read_rows::<f64>(0, 0, 2).is_ok()); // without verification: read

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
    // The shard `small` wrote, then three defects of it.
    let good = vec![
        ("__row_id__", "I64", vec![6], 48),
        ("__sample__", "I64", vec![6], 48),
        ("a", "F32", vec![6, 3], 72),
        ("b", "F32", vec![6, 5], 120),
    ];
    let mut rows_differ = good.clone();
    rows_differ[3] = ("b", "F32", vec![5, 5], 100);
    let no_row_id = good[1..].to_vec();
    let mut float_ids = good.clone();
    float_ids[0].1 = "F64";
    for (tensors, want) in [
        (rows_differ, "rows differ across layers"),
        (no_row_id, "__row_id__"),
        (float_ids, "expected I64"),
    ] {
        std::fs::write(&sh, mk(&tensors)).unwrap();
        let e = Store::open(&p).unwrap_err();
        assert!(
            matches!(e, Error::Format { .. }) && e.to_string().contains(want),
            "{want}: {e}"
        );
    }
}

#[test]
fn release_keeps_data_readable_and_blocks_cover_subsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    // f16 layers: "b" (dim 5) follows "a" (dim 3, 6 bytes a row), so it often starts unaligned.
    let (a, b) = write(&p, Some(DType::F16), 300, 64);
    let s = Store::open(&p).unwrap();
    assert!(s.shards().len() > 3);
    let before = s.read_block::<f64>(&[0, 1], 0, 64).unwrap();
    s.release(0, 64).unwrap();
    s.release(10, 10).unwrap();
    s.release(63, 64).unwrap();
    assert!(s.release(5, 65).is_err());
    assert!(s.release(6, 5).is_err());
    assert_eq!(s.read_block::<f64>(&[0, 1], 0, 64).unwrap(), before);
    for (x, g) in a.iter().zip(&before[0]) {
        assert_eq!(*g, half::f16::from_f64(*x).to_f64());
    }
    // every subset / order of layers, block sizes that do and do not divide the shard size
    for layers in [vec![1], vec![1, 0], vec![0, 0, 1]] {
        for br in [1usize, 5, 13, 64, 1000] {
            let blocks = collect_blocks::<f32>(&s, &layers, br).unwrap();
            assert_eq!(blocks.len(), 64usize.div_ceil(br));
            for (k, &l) in layers.iter().enumerate() {
                let dim = [3usize, 5][l];
                let cat: Vec<f32> = blocks.iter().flat_map(|bl| bl.2[k].clone()).collect();
                let want = s.read_rows::<f32>(l, 0, 64).unwrap();
                assert_eq!(cat, want, "layers {layers:?} block {br}");
                assert_eq!(cat.len(), 64 * dim);
            }
            let starts: Vec<u64> = blocks.iter().map(|bl| bl.0).collect();
            assert_eq!(starts, (0..64).step_by(br).collect::<Vec<u64>>());
        }
    }
    assert_eq!(
        s.read_rows::<f32>(1, 0, 64).unwrap(),
        b.iter()
            .map(|&x| half::f16::from_f64(x).to_f32())
            .collect::<Vec<_>>()
    );
    assert!(collect_blocks::<f32>(&s, &[2], 4).is_err());
    // caller buffers must have exactly the right size
    let mut small = vec![0f32; 5 * 3 - 1];
    assert!(matches!(
        s.read_rows_into(0, 0, 5, &mut small),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.take_into(0, &[1, 2, 3, 4, 5], &mut small),
        Err(Error::InvalidArgument(_))
    ));
    let (mut x, mut y) = (vec![0f64; 7 * 5], vec![0f64; 7 * 3]);
    s.read_block_into(&[1, 0], 30, 37, &mut [&mut x, &mut y])
        .unwrap();
    assert_eq!(y, s.read_rows::<f64>(0, 30, 37).unwrap());
    assert_eq!(x, s.read_rows::<f64>(1, 30, 37).unwrap());
    assert!(s
        .read_block_into(&[1], 30, 37, &mut [&mut x, &mut y])
        .is_err());
    let mut t = vec![0f32; 2 * 5];
    s.take_into(1, &[63, 0], &mut t).unwrap();
    assert_eq!(&t[5..], &s.read_rows::<f32>(1, 0, 1).unwrap()[..]);
    // an empty store has no blocks
    let e = dir.path().join("e");
    StoreWriter::create(&e, WriterOptions::default())
        .unwrap()
        .finish()
        .unwrap();
    let s = Store::open(&e).unwrap();
    assert_eq!(s.num_rows(), 0);
    assert!(collect_blocks::<f32>(&s, &[], 4).unwrap().is_empty());
    s.release(0, 0).unwrap();
}

#[test]
fn encode_rejects_bad_ranges() {
    let v = Values::F32(&[1.0, 2.0, 3.0]);
    let mut out = vec![7u8];
    assert!(v.encode_into(2, 4, DType::F32, &mut out).is_err());
    assert!(v.encode_into(2, 1, DType::F32, &mut out).is_err());
    assert_eq!(out, vec![7u8]);
    v.encode_into(1, 3, DType::BF16, &mut out).unwrap();
    assert_eq!(out.len(), 5);
    assert_eq!(
        &out[1..3],
        &half::bf16::from_f32(2.0).to_bits().to_le_bytes()
    );
}

#[test]
fn interrupted_append_keeps_finished_shards_and_poisons_writer() {
    use crate::monitor::FlagMonitor;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct StopAt<'a>(u64, &'a AtomicBool);
    impl crate::monitor::Monitor for StopAt<'_> {
        fn progress(&self, done: u64, _total: u64) -> crate::error::Result<()> {
            if done >= self.0 {
                self.1.store(true, Ordering::Relaxed);
            }
            FlagMonitor(self.1).progress(done, 0)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let a = data(25, 2, 0.0);
    let mut w = StoreWriter::create(&p, sharded(4 * (2 * 8 + 8), None)).unwrap(); // 4 rows a shard
                                                                                  // argument errors leave the writer usable
    assert!(w
        .append(
            &[("a", ArrayData::new(Values::F64(&a[..4]), 2, 2))],
            Some(&[1]),
            &[]
        )
        .is_err());
    w.append(
        &[("a", ArrayData::new(Values::F64(&a[..6]), 3, 2))],
        None,
        &[],
    )
    .unwrap();
    let flag = AtomicBool::new(false);
    let e = w
        .append_monitored(
            &[("a", ArrayData::new(Values::F64(&a[6..]), 22, 2))],
            None,
            &[],
            &StopAt(9, &flag),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    let committed = w.rows_committed();
    assert_eq!(committed, 12); // shards of rows 0-3, 4-7, 8-11; stopped at batch row 9
    let e = w
        .append(
            &[("a", ArrayData::new(Values::F64(&a[..2]), 1, 2))],
            None,
            &[],
        )
        .unwrap_err();
    assert!(e.to_string().contains("stopped part-way"), "{e}");
    assert!(w.finish().is_err());
    let s = Store::open(&p).unwrap();
    assert_eq!(s.num_rows(), committed);
    assert!(!s.is_complete());
    assert_eq!(s.read_rows::<f64>(0, 0, 12).unwrap(), a[..24].to_vec());
    assert_eq!(s.row_ids().unwrap(), (0..12).collect::<Vec<i64>>());
    s.verify().unwrap();
}

#[test]
fn the_block_reader_streams_subsets_and_stops_on_errors() {
    use crate::monitor::{FlagMonitor, NoMonitor};
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    write(&p, Some(DType::BF16), 250, 41);
    let s = Store::open(&p).unwrap();
    assert!(s.shards().len() > 3);
    for layers in [vec![0, 1], vec![1], vec![1, 1, 0]] {
        for br in [1usize, 4, 7, 41, 100] {
            let blocks = collect_blocks::<f64>(&s, &layers, br).unwrap();
            let starts: Vec<u64> = blocks.iter().map(|b| b.0).collect();
            assert_eq!(starts, (0..41).step_by(br).collect::<Vec<u64>>());
            for (k, &l) in layers.iter().enumerate() {
                let got: Vec<f64> = blocks.iter().flat_map(|b| b.2[k].clone()).collect();
                assert_eq!(
                    got,
                    s.read_rows::<f64>(l, 0, 41).unwrap(),
                    "{layers:?} {br}"
                );
            }
        }
    }
    // errors from f, the monitor and the arguments stop the stream
    let src = stream::StoreRows::new(&s, vec![0]).unwrap();
    let mut calls = 0;
    let e = stream::run::<f32>(&src, 5, &NoMonitor, |_, _| {
        calls += 1;
        if calls == 2 {
            Err(Error::invalid("stop"))
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("stop") && calls == 2);
    let flag = AtomicBool::new(true);
    let e = stream::run::<f32>(&src, 5, &FlagMonitor(&flag), |_, _| Ok(())).unwrap_err();
    assert!(matches!(e, Error::Interrupted));
    assert!(collect_blocks::<f32>(&s, &[0], 0).is_err());
    assert!(collect_blocks::<f32>(&s, &[9], 3).is_err());
}

#[test]
fn one_writer_per_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let w = StoreWriter::create(&p, WriterOptions::default()).unwrap();
    // a second writer, with or without overwrite, is refused and removes nothing
    for overwrite in [false, true] {
        let opts = WriterOptions {
            overwrite,
            ..WriterOptions::default()
        };
        let e = StoreWriter::create(&p, opts).err().unwrap();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("one writer at a time"), "{msg}");
    }
    assert!(p.join(MANIFEST_NAME).exists());
    w.finish().unwrap();
    // released when the writer is done; the lock's file is not part of the store
    let opts = WriterOptions {
        overwrite: true,
        ..WriterOptions::default()
    };
    StoreWriter::create(&p, opts).unwrap().finish().unwrap();
    assert_eq!(Store::open(&p).unwrap().num_rows(), 0);
    // a folder holding only a lock file (a writer that died before its first shard) is empty
    let q = dir.path().join("q");
    drop(StoreWriter::create(&q, WriterOptions::default()).unwrap());
    std::fs::remove_file(q.join(MANIFEST_NAME)).unwrap();
    StoreWriter::create(&q, WriterOptions::default()).unwrap();
    // a non-empty folder is refused before a lock file is put in it
    let r = dir.path().join("r");
    std::fs::create_dir(&r).unwrap();
    std::fs::write(r.join("notes.txt"), "x").unwrap();
    assert!(matches!(
        StoreWriter::create(&r, WriterOptions::default()),
        Err(Error::Exists { .. })
    ));
    assert!(!r.join(LOCK_NAME).exists());
}

#[test]
fn manifests_and_shards_must_be_regular_files_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (p, sh, m) = small(dir.path());
    // the manifest a FIFO: refused at once (an open would block until a writer came)
    let saved = std::fs::read(&m).unwrap();
    std::fs::remove_file(&m).unwrap();
    let c = std::ffi::CString::new(m.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = Store::open(&p).err().unwrap().to_string();
    assert!(e.contains("named pipe"), "{e}");
    // a link to /dev/zero, or to a file outside the store
    std::fs::remove_file(&m).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &m).unwrap();
    let e = Store::open(&p).err().unwrap().to_string();
    assert!(e.contains("outside the store folder"), "{e}");
    std::fs::remove_file(&m).unwrap();
    let outside = dir.path().join("elsewhere.json");
    std::fs::write(&outside, &saved).unwrap();
    std::os::unix::fs::symlink(&outside, &m).unwrap();
    let e = Store::open(&p).err().unwrap().to_string();
    assert!(e.contains("outside the store folder"), "{e}");
    // a link to a file of the store is fine
    std::fs::remove_file(&m).unwrap();
    std::fs::write(p.join("real.json"), &saved).unwrap();
    std::os::unix::fs::symlink("real.json", &m).unwrap();
    Store::open(&p).unwrap();
    // a shard that is a FIFO
    std::fs::remove_file(&sh).unwrap();
    let c = std::ffi::CString::new(sh.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = Store::open(&p).err().unwrap().to_string();
    assert!(e.contains("the shard is a named pipe"), "{e}");
}

#[test]
fn a_shard_changed_after_opening_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        verify_checksums: true,
    };
    // truncated (the mapped pages past the new end would raise SIGBUS)
    for verify in [false, true] {
        let (p, sh, _) = small(&dir.path().join(format!("t{verify}")));
        let s = Store::open_with(
            &p,
            OpenOptions {
                verify_checksums: verify,
            },
        )
        .unwrap();
        let good: Vec<f64> = s.read_rows(0, 0, 6).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&sh)
            .unwrap()
            .set_len(40)
            .unwrap();
        for e in [
            s.read_rows::<f64>(0, 0, 6).unwrap_err(),
            s.take::<f32>(0, &[5, 1]).unwrap_err(),
            s.row_ids().unwrap_err(),
            s.find_nonfinite(0).unwrap_err(),
            s.verify().unwrap_err(),
        ] {
            assert!(matches!(e, Error::Mismatch(_)), "{e}");
            assert!(e.to_string().contains("truncated"), "{e}");
            assert!(e.to_string().contains("shard-00000"), "{e}");
        }
        assert_eq!(good.len(), 6 * 3);
    }
    // modified in place, same size: refused (without hashing), named
    let (p, sh, _) = small(&dir.path().join("m"));
    let s = Store::open(&p).unwrap();
    let mut bytes = std::fs::read(&sh).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&sh, &bytes).unwrap();
    let e = s.read_rows::<f64>(0, 0, 1).unwrap_err();
    assert!(e.to_string().contains("was modified"), "{e}");
    // replaced by a new file (rename over it) or removed
    let (p, sh, _) = small(&dir.path().join("r"));
    let s = Store::open_with(&p, opts).unwrap();
    let copy = dir.path().join("copy");
    std::fs::copy(&sh, &copy).unwrap();
    std::fs::rename(&copy, &sh).unwrap();
    let e = s.read_rows::<f64>(0, 0, 1).unwrap_err();
    assert!(e.to_string().contains("replaced"), "{e}");
    std::fs::remove_file(&sh).unwrap();
    let e = s.read_rows::<f64>(0, 0, 1).unwrap_err();
    assert!(e.to_string().contains("removed"), "{e}");
    // an unchanged store reads, hashed once per shard on the first read
    let (p, _, _) = small(&dir.path().join("ok"));
    let s = Store::open_with(&p, opts).unwrap();
    assert_eq!(s.read_rows::<f64>(0, 0, 6).unwrap().len(), 18);
    assert!(s.verify().is_ok());
}
