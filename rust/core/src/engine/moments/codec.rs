//! The byte serialisation of a [`MomentAccumulator`] (versioned, little-endian, the upper
//! triangle of `S` only) and of a [`CrossAccumulator`] (its sums in full); every inconsistency in bytes read back is an [`Error::Format`]
//! (the accumulator travels between processes and machines: Ray, checkpoints).
use super::accumulator::MomentAccumulator;
use super::cross::CrossAccumulator;
use super::state::{offsets_of, Compute, PassState, Scratch};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"LSMOMACC";

/// 2: the per-layer scale exponents follow the shift (a moment accumulator).
const VERSION: u32 = 2;

impl MomentAccumulator {
    /// Versioned little-endian serialisation (upper triangle of `S` only).
    /// A refused allocation of the blob is an [`Error::Memory`].
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let dz = self.dz();
        let mut out = Header {
            magic: MAGIC,
            na: None,
            st: &self.st,
            exps: Some(&self.scale_exps()),
        }
        .write(dz * (dz + 1) / 2 + dz, "the serialised moment accumulator")?;
        debug_assert_eq!(self.sums.len(), dz);
        put_f64s(&mut out, &self.sums);
        for j in 0..dz {
            put_f64s(&mut out, &self.s[j * dz..j * dz + j + 1]);
        }
        Ok(out)
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let l = layout(bytes)?;
        if l.cross {
            return Err(fmt_err("a cross tile, not a moment accumulator"));
        }
        let d: usize = l.dims.iter().sum();
        let dz = d + l.dims.len();
        let (sums, tri) = l.payload.split_at(dz * 8);
        let mut s = crate::linalg::hinted_vec(dz * dz, "the deserialised moment accumulator")?;
        let mut at = 0;
        for j in 0..dz {
            get_f64s(&tri[at..at + (j + 1) * 8], &mut s[j * dz..j * dz + j + 1]);
            at += (j + 1) * 8;
        }
        let exps = match l.exps {
            Some(b) => {
                let e: Vec<i32> = b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .map(|v| i32::try_from(v).unwrap_or(i32::MAX))
                    .collect();
                if e.iter().any(|v| v.abs() > 1000) {
                    return Err(fmt_err("a scale exponent outside ±1000"));
                }
                Some(e)
            }
            None => None,
        };
        Ok(MomentAccumulator {
            st: l.state(),
            exps,
            sums: f64s(sums),
            s,
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
        let mut out = Header {
            magic: CROSS_MAGIC,
            na: Some(self.na),
            st: &self.st,
            exps: None,
        }
        .write(sums, "the serialised cross tile")?;
        for part in [&self.su, &self.sr, &self.uu, &self.ur, &self.ru, &self.rr] {
            put_f64s(&mut out, part);
        }
        Ok(out)
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); any inconsistency is an [`Error::Format`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let l = layout(bytes)?;
        if !l.cross {
            return Err(fmt_err("a moment accumulator, not a cross tile"));
        }
        let (lc, na) = (l.dims.len(), l.na);
        let da = l.dims[..na].iter().sum::<usize>();
        let db = l.dims[na..].iter().sum::<usize>();
        let lb = lc - na;
        let mut rest = l.payload;
        let mut next = |count: usize| {
            let (head, tail) = rest.split_at(count * 8);
            rest = tail;
            f64s(head)
        };
        let (su, sr) = (next(da + db), next(lc));
        let (uu, ur, ru, rr) = (next(da * db), next(da * lb), next(na * db), next(na * lb));
        Ok(CrossAccumulator {
            st: l.state(),
            na,
            uu,
            ur,
            ru,
            rr,
            su,
            sr,
            fac: Vec::new(),
        })
    }
}

/// What both kinds of accumulator write before their sums (read back by [`layout`]).
struct Header<'a> {
    magic: &'a [u8; 8],
    /// Layers on side A: cross tiles only.
    na: Option<usize>,
    /// The layers, names, row count, first non-finite rows and shift.
    st: &'a PassState,
    /// A moment accumulator's scale exponents (written after the shift, when there is one).
    exps: Option<&'a [i32]>,
}

impl Header<'_> {
    /// The header in a buffer with room for `sums` more f64s (a refused allocation is an
    /// [`Error::Memory`] naming `what`).
    fn write(&self, sums: usize, what: &str) -> Result<Vec<u8>> {
        let st = self.st;
        let shift = st.shift.as_deref();
        let names: usize = st.names.iter().map(|n| n.len() + 8).sum();
        let mut out = crate::memory::try_with_capacity(
            64 + names + st.dims.len() * 24 + (shift.map_or(0, <[f64]>::len) + sums) * 8,
            what,
        )?;
        out.extend_from_slice(self.magic);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(st.dims.len() as u64).to_le_bytes());
        if let Some(na) = self.na {
            out.extend_from_slice(&(na as u64).to_le_bytes());
        }
        for &dl in &st.dims {
            out.extend_from_slice(&(dl as u64).to_le_bytes());
        }
        for name in &st.names {
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&st.n.to_le_bytes());
        out.push(st.check_finite as u8);
        for nf in &st.nonfinite {
            out.extend_from_slice(&nf.unwrap_or(u64::MAX).to_le_bytes());
        }
        out.push(shift.is_some() as u8);
        if let Some(sh) = shift {
            put_f64s(&mut out, sh);
            if let Some(exps) = self.exps {
                for &e in exps {
                    out.extend_from_slice(&i64::from(e).to_le_bytes());
                }
            }
        }
        Ok(out)
    }
}

/// A serialised accumulator (either kind) read up to its sums: the layout, names, row count,
/// first non-finite rows and shift, with every length checked against the bytes given
/// before anything large is allocated.
struct Layout<'a> {
    cross: bool,
    dims: Vec<usize>,
    /// Layers on side A (a cross tile), else all of them.
    na: usize,
    names: Vec<String>,
    /// Magic, version, layer counts, widths and names: equal for two partials of one tile.
    prefix: &'a [u8],
    n: u64,
    check_finite: bool,
    nonfinite: Vec<Option<u64>>,
    /// The shift's bytes (and, for a moment accumulator, its scale exponents after them:
    /// two partials merge straight only when both agree).
    shift: Option<&'a [u8]>,
    /// The scale exponents' bytes (a moment accumulator with a shift).
    exps: Option<&'a [u8]>,
    /// Where the additive f64 sums start, and they themselves (exactly as many bytes as the
    /// layout needs).
    payload_at: usize,
    payload: &'a [u8],
}

impl Layout<'_> {
    /// The pass state the bytes describe (f64 products, row base 0, no buffers yet).
    fn state(&self) -> PassState {
        PassState {
            offsets: offsets_of(&self.dims),
            dims: self.dims.clone(),
            names: self.names.clone(),
            shift: self.shift.map(f64s),
            n: self.n,
            check_finite: self.check_finite,
            row_base: 0,
            nonfinite: self.nonfinite.clone(),
            compute: Compute::F64,
            scratch: Scratch::default(),
        }
    }
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
    let mut names = Vec::with_capacity(lc);
    for _ in 0..lc {
        let len = r.u64()? as usize;
        let s = r.take(len)?;
        names.push(String::from_utf8(s.to_vec()).map_err(|_| fmt_err("layer name is not UTF-8"))?);
    }
    let prefix = &bytes[..r.pos];
    let n = r.u64()?;
    let check_finite = r.flag()?;
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
    let exps_len = if has_shift && !cross {
        lc as u128 * 8
    } else {
        0
    };
    let shift_len = if has_shift { d as u128 * 8 } else { 0 } + exps_len;
    if shift_len + count * 8 != r.remaining() as u128 {
        return Err(fmt_err(format!(
            "accumulator payload has {} bytes, expected {} for widths {dims:?}",
            r.remaining(),
            shift_len + count * 8
        )));
    }
    if !cross && (n == 0) == has_shift {
        return Err(fmt_err("row count and shift disagree"));
    }
    let shift = if has_shift {
        Some(r.take(d * 8 + exps_len as usize)?)
    } else {
        None
    };
    let exps = shift.filter(|_| exps_len > 0).map(|s| &s[d * 8..]);
    let shift = shift.map(|s| &s[..d * 8]);
    let payload_at = r.pos;
    Ok(Layout {
        cross,
        dims,
        na,
        names,
        prefix,
        n,
        check_finite,
        nonfinite,
        shift,
        exps,
        payload_at,
        payload: &bytes[payload_at..],
    })
}

/// Little-endian f64s (`b.len()` a multiple of 8, checked by the caller's layout).
fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// As [`f64s`], into `out` (`out.len() * 8 == b.len()`).
fn get_f64s(b: &[u8], out: &mut [f64]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(8)) {
        *o = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
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
    if x.cross != y.cross
        || x.prefix != y.prefix
        || x.check_finite != y.check_finite
        || x.shift != y.shift
        || x.exps != y.exps
    {
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
}
