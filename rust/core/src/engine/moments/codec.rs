//! The byte serialisation of a [`MomentAccumulator`] (versioned, little-endian, the upper
//! triangle of `S` only) and of a [`CrossAccumulator`] (its sums in full); every inconsistency in bytes read back is an [`Error::Format`]
//! (the accumulator travels between processes and machines: Ray, checkpoints).
use super::accumulator::{offsets_of, Compute, MomentAccumulator, Scratch};
use super::cross::CrossAccumulator;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"LSMOMACC";
const VERSION: u32 = 1;

impl MomentAccumulator {
    /// Versioned little-endian serialisation (upper triangle of `S` only).
    /// A refused allocation of the blob is an [`Error::Memory`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let dz = self.dz();
        let names: usize = self.names.iter().map(|n| n.len() + 8).sum();
        let mut out = crate::memory::try_with_capacity(
            64 + names + self.dims.len() * 16 + dz * (dz + 1) * 4 + dz * 16,
            "the serialised moment accumulator",
        )?;
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.dims.len() as u64).to_le_bytes());
        for &dl in &self.dims {
            out.extend_from_slice(&(dl as u64).to_le_bytes());
        }
        for name in &self.names {
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.n.to_le_bytes());
        out.push(self.check_finite as u8);
        for nf in &self.nonfinite {
            out.extend_from_slice(&nf.unwrap_or(u64::MAX).to_le_bytes());
        }
        out.push(self.shift.is_some() as u8);
        if let Some(sh) = &self.shift {
            put_f64s(&mut out, sh);
        }
        debug_assert_eq!(self.sums.len(), dz);
        put_f64s(&mut out, &self.sums);
        for j in 0..dz {
            put_f64s(&mut out, &self.s[j * dz..j * dz + j + 1]);
        }
        Ok(out)
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(fmt_err("not a layerscope moment accumulator (bad magic)"));
        }
        let version = u32::from_le_bytes(r.arr::<4>()?);
        if version != VERSION {
            return Err(fmt_err(format!(
                "unsupported accumulator version {version} (this build reads {VERSION})"
            )));
        }
        let lc = r.u64()? as usize;
        if lc == 0 || lc > r.remaining() / 8 {
            return Err(fmt_err(format!("bad layer count {lc}")));
        }
        let mut dims = Vec::with_capacity(lc);
        for _ in 0..lc {
            let dl = r.u64()?;
            if dl == 0 || dl > (r.remaining() as u64) {
                return Err(fmt_err(format!("bad layer width {dl}")));
            }
            dims.push(dl as usize);
        }
        let mut names = Vec::with_capacity(lc);
        for _ in 0..lc {
            let len = r.u64()? as usize;
            let s = r.take(len)?;
            names.push(
                String::from_utf8(s.to_vec()).map_err(|_| fmt_err("layer name is not UTF-8"))?,
            );
        }
        let n = r.u64()?;
        let check_finite = match r.take(1)?[0] {
            0 => false,
            1 => true,
            v => return Err(fmt_err(format!("bad flag byte {v}"))),
        };
        let mut nonfinite = Vec::with_capacity(lc);
        for _ in 0..lc {
            let v = r.u64()?;
            nonfinite.push(if v == u64::MAX { None } else { Some(v) });
        }
        let has_shift = match r.take(1)?[0] {
            0 => false,
            1 => true,
            v => return Err(fmt_err(format!("bad flag byte {v}"))),
        };
        let d = dims
            .iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .ok_or_else(|| fmt_err("widths overflow"))?;
        let dz = d + lc;
        // Exact remaining length check before allocating anything large.
        let tri = (dz as u128) * (dz as u128 + 1) / 2;
        let need = (if has_shift { d as u128 } else { 0 } + dz as u128 + tri) * 8;
        if need != r.remaining() as u128 {
            return Err(fmt_err(format!(
                "accumulator payload has {} bytes, expected {need} for widths {dims:?}",
                r.remaining()
            )));
        }
        if (n == 0) == has_shift {
            return Err(fmt_err("row count and shift disagree"));
        }
        let shift = if has_shift { Some(r.f64s(d)?) } else { None };
        let sums = r.f64s(dz)?;
        let mut s = crate::linalg::hinted_vec(dz * dz, "the deserialised moment accumulator")?;
        for j in 0..dz {
            let col = r.f64s(j + 1)?;
            s[j * dz..j * dz + j + 1].copy_from_slice(&col);
        }
        Ok(MomentAccumulator {
            offsets: offsets_of(&dims),
            dims,
            names,
            shift,
            s,
            sums,
            n,
            check_finite,
            row_base: 0,
            nonfinite,
            compute: Compute::F64,
            scratch: Scratch::default(),
        })
    }
}

const CROSS_MAGIC: &[u8; 8] = b"LSCROSSA";

/// Whether `bytes` start as a serialised [`CrossAccumulator`] (else they are read as a
/// [`MomentAccumulator`]).
pub fn is_cross(bytes: &[u8]) -> bool {
    bytes.starts_with(CROSS_MAGIC)
}

impl CrossAccumulator {
    /// Versioned little-endian serialisation: layout, names, row count, first non-finite
    /// rows, the shift, then the sums (`su`, `sr`, `uu`, `ur`, `ru`, `rr`) in full.
    /// A refused allocation of the blob is an [`Error::Memory`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let sums = self.su.len() + self.sr.len() + self.uu.len() + self.ur.len();
        let sums = sums + self.ru.len() + self.rr.len();
        let names: usize = self.names.iter().map(|n| n.len() + 8).sum();
        let shift = self.shift.as_ref().map_or(0, |s| s.len());
        let mut out = crate::memory::try_with_capacity(
            64 + names + self.dims.len() * 16 + (shift + sums) * 8,
            "the serialised cross tile",
        )?;
        out.extend_from_slice(CROSS_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.dims.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.na as u64).to_le_bytes());
        for &dl in &self.dims {
            out.extend_from_slice(&(dl as u64).to_le_bytes());
        }
        for name in &self.names {
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.n.to_le_bytes());
        out.push(self.check_finite as u8);
        for nf in &self.nonfinite {
            out.extend_from_slice(&nf.unwrap_or(u64::MAX).to_le_bytes());
        }
        out.push(self.shift.is_some() as u8);
        if let Some(sh) = &self.shift {
            put_f64s(&mut out, sh);
        }
        for part in [&self.su, &self.sr, &self.uu, &self.ur, &self.ru, &self.rr] {
            put_f64s(&mut out, part);
        }
        Ok(out)
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8)? != CROSS_MAGIC {
            return Err(fmt_err("not a layerscope cross tile (bad magic)"));
        }
        let version = u32::from_le_bytes(r.arr::<4>()?);
        if version != VERSION {
            return Err(fmt_err(format!(
                "unsupported cross tile version {version} (this build reads {VERSION})"
            )));
        }
        let lc = r.u64()? as usize;
        let na = r.u64()? as usize;
        if lc < 2 || lc > r.remaining() / 8 || na == 0 || na >= lc {
            return Err(fmt_err(format!("bad layer counts {lc} ({na} on side A)")));
        }
        let mut dims = Vec::with_capacity(lc);
        for _ in 0..lc {
            let dl = r.u64()?;
            if dl == 0 || dl > (r.remaining() as u64) {
                return Err(fmt_err(format!("bad layer width {dl}")));
            }
            dims.push(dl as usize);
        }
        let mut names = Vec::with_capacity(lc);
        for _ in 0..lc {
            let len = r.u64()? as usize;
            let s = r.take(len)?;
            names.push(
                String::from_utf8(s.to_vec()).map_err(|_| fmt_err("layer name is not UTF-8"))?,
            );
        }
        let n = r.u64()?;
        let check_finite = r.flag()?;
        let mut nonfinite = Vec::with_capacity(lc);
        for _ in 0..lc {
            let v = r.u64()?;
            nonfinite.push(if v == u64::MAX { None } else { Some(v) });
        }
        let has_shift = r.flag()?;
        let da = dims[..na].iter().sum::<usize>();
        let db = dims[na..].iter().sum::<usize>();
        let lb = lc - na;
        let cells = [da + db, lc, da * db, da * lb, na * db, na * lb];
        let total = cells.iter().map(|&c| c as u128).sum::<u128>();
        let need = (if has_shift { (da + db) as u128 } else { 0 } + total) * 8;
        if need != r.remaining() as u128 {
            return Err(fmt_err(format!(
                "cross tile payload has {} bytes, expected {need} for widths {dims:?}",
                r.remaining()
            )));
        }
        let shift = if has_shift {
            Some(r.f64s(da + db)?)
        } else {
            None
        };
        let su = r.f64s(cells[0])?;
        let sr = r.f64s(cells[1])?;
        let uu = r.f64s(cells[2])?;
        let ur = r.f64s(cells[3])?;
        let ru = r.f64s(cells[4])?;
        let rr = r.f64s(cells[5])?;
        Ok(CrossAccumulator {
            offsets: offsets_of(&dims),
            dims,
            names,
            na,
            shift,
            uu,
            ur,
            ru,
            rr,
            su,
            sr,
            n,
            check_finite,
            row_base: 0,
            nonfinite,
            compute: Compute::F64,
            u32: Vec::new(),
            u64: Vec::new(),
            r: Vec::new(),
            pack32: Vec::new(),
            pack64: Vec::new(),
        })
    }
}

/// Where the parts of a serialised accumulator (either kind) lie, checked as `from_bytes`
/// checks them, without reading the sums.
struct Layout<'a> {
    /// Magic, version, layer counts, widths and names: equal for two partials of one tile.
    prefix: &'a [u8],
    n: u64,
    check_finite: u8,
    nonfinite: Vec<Option<u64>>,
    shift: Option<&'a [u8]>,
    /// Where the additive f64 sums start, and they themselves.
    payload_at: usize,
    payload: &'a [u8],
}

fn layout(bytes: &[u8]) -> Result<Layout<'_>> {
    let cross = is_cross(bytes);
    let mut r = Reader { b: bytes, pos: 0 };
    let magic = r.take(8)?;
    if magic != MAGIC && magic != CROSS_MAGIC {
        return Err(fmt_err("not a layerscope accumulator (bad magic)"));
    }
    let version = u32::from_le_bytes(r.arr::<4>()?);
    if version != VERSION {
        return Err(fmt_err(format!(
            "unsupported accumulator version {version} (this build reads {VERSION})"
        )));
    }
    let lc = r.u64()? as usize;
    let na = if cross { r.u64()? as usize } else { lc };
    if lc == 0 || lc > r.remaining() / 8 || na == 0 || na > lc || (cross && na == lc) {
        return Err(fmt_err(format!("bad layer counts {lc} ({na} on side A)")));
    }
    let mut dims = Vec::with_capacity(lc);
    for _ in 0..lc {
        let dl = r.u64()?;
        if dl == 0 || dl > (r.remaining() as u64) {
            return Err(fmt_err(format!("bad layer width {dl}")));
        }
        dims.push(dl as usize);
    }
    for _ in 0..lc {
        let len = r.u64()? as usize;
        r.take(len)?;
    }
    let prefix = &bytes[..r.pos];
    let n = r.u64()?;
    let check_finite = u8::from(r.flag()?);
    let mut nonfinite = Vec::with_capacity(lc);
    for _ in 0..lc {
        let v = r.u64()?;
        nonfinite.push(if v == u64::MAX { None } else { Some(v) });
    }
    let has_shift = r.flag()?;
    let d = dims
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
        .ok_or_else(|| fmt_err("widths overflow"))?;
    let count: u128 = if cross {
        let da = dims[..na].iter().sum::<usize>() as u128;
        let db = d as u128 - da;
        let (la, lb) = (na as u128, (lc - na) as u128);
        da + db + la + lb + da * db + da * lb + la * db + la * lb
    } else {
        let dz = (d + lc) as u128;
        dz + dz * (dz + 1) / 2
    };
    let shift_len = if has_shift { d * 8 } else { 0 };
    if (shift_len as u128 + count * 8) != r.remaining() as u128 {
        return Err(fmt_err(format!(
            "accumulator payload has {} bytes, expected {} for widths {dims:?}",
            r.remaining(),
            shift_len as u128 + count * 8
        )));
    }
    if !cross && (n == 0) == has_shift {
        return Err(fmt_err("row count and shift disagree"));
    }
    let shift = if has_shift {
        Some(r.take(shift_len)?)
    } else {
        None
    };
    let payload_at = r.pos;
    Ok(Layout {
        prefix,
        n,
        check_finite,
        nonfinite,
        shift,
        payload_at,
        payload: &bytes[payload_at..],
    })
}

/// The serialised sums of `a` followed by `b`'s rows, when both are partials of one tile
/// under one shift (the same layout, names and finiteness rule): the sums added straight
/// from the bytes, in parallel, without decoding either accumulator (the distributed merge
/// of partials of hundreds of MiB). `None` when they are not such a pair (the caller decodes
/// and merges them: different shifts re-shift exactly); malformed bytes are an
/// [`Error::Format`].
pub fn merge_serialised(a: &[u8], b: &[u8]) -> Result<Option<Vec<u8>>> {
    use rayon::prelude::*;
    let (x, y) = (layout(a)?, layout(b)?);
    if x.prefix != y.prefix || x.check_finite != y.check_finite || x.shift != y.shift {
        return Ok(None);
    }
    let mut out = crate::memory::try_with_capacity(a.len(), "the merged partial sums")?;
    out.extend_from_slice(a);
    let at = x.prefix.len();
    out[at..at + 8].copy_from_slice(&(x.n + y.n).to_le_bytes());
    for (l, (mine, theirs)) in x.nonfinite.iter().zip(&y.nonfinite).enumerate() {
        let v = mine.or(theirs.map(|r| r + x.n)).unwrap_or(u64::MAX);
        let p = at + 9 + 8 * l;
        out[p..p + 8].copy_from_slice(&v.to_le_bytes());
    }
    const CHUNK: usize = 8 << 12;
    out[x.payload_at..]
        .par_chunks_mut(CHUNK)
        .zip(y.payload.par_chunks(CHUNK))
        .for_each(|(o, p)| {
            for (u, v) in o.chunks_exact_mut(8).zip(p.chunks_exact(8)) {
                let s = f64::from_le_bytes(u.try_into().unwrap_or([0; 8]))
                    + f64::from_le_bytes(v.try_into().unwrap_or([0; 8]));
                u.copy_from_slice(&s.to_le_bytes());
            }
        });
    Ok(Some(out))
}

/// Appends `v` as little-endian f64s (one copy of the slice's bytes on little-endian
/// machines: the serialised accumulators are hundreds of MiB).
fn put_f64s(out: &mut Vec<u8>, v: &[f64]) {
    if cfg!(target_endian = "little") {
        // SAFETY: an f64 slice is `8 · len` initialised bytes, aligned for u8; on a
        // little-endian machine they are the little-endian encoding of the values.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 8) };
        out.extend_from_slice(bytes);
    } else {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

fn fmt_err(msg: impl Into<String>) -> Error {
    Error::format("<moment accumulator bytes>", msg)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}
impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, k: usize) -> Result<&'a [u8]> {
        if k > self.remaining() {
            return Err(fmt_err("truncated accumulator bytes"));
        }
        let s = &self.b[self.pos..self.pos + k];
        self.pos += k;
        Ok(s)
    }
    fn arr<const K: usize>(&mut self) -> Result<[u8; K]> {
        let s = self.take(K)?;
        let mut a = [0u8; K];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn flag(&mut self) -> Result<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(fmt_err(format!("bad flag byte {v}"))),
        }
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr::<8>()?))
    }
    fn f64s(&mut self, k: usize) -> Result<Vec<f64>> {
        let s = self.take(k.checked_mul(8).ok_or_else(|| fmt_err("size overflow"))?)?;
        Ok(s.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
}
