//! Memory: the byte budget every engine checks before it starts, and the one fallible
//! allocation helper behind every buffer whose size comes from the input.
//!
//! * [`Budget`]: how many bytes a call may use and where that number came from — the
//!   caller's `max_memory`, the `LAYERSCOPE_MAX_MEMORY` environment variable, or (the
//!   default) [`BUDGET_FRACTION`] of the smallest of `MemAvailable`, the cgroup limit and the
//!   `RLIMIT_AS` headroom ([`Budget::machine`]). Engines compare their exact peak-byte
//!   formulas with it before reading a row ([`Budget::check`]), so a call that cannot finish
//!   fails at once with an [`Error::Memory`] saying what would fit.
//! * [`try_vec`] / [`try_with_capacity`]: allocations by `try_reserve_exact`, so that an
//!   allocation the system refuses (overcommit limits, `RLIMIT_AS`) is an [`Error::Memory`]
//!   naming the buffer — never the process abort of `Vec::with_capacity`. This is the
//!   backstop behind the budget checks.
use crate::{Error, Result};
use std::fmt::Display;

/// The share of the machine's free memory a call may use by default (the rest is left to
/// the interpreter, the page cache of the mapped shards and other processes).
pub const BUDGET_FRACTION: f64 = 0.8;

/// The environment variable that sets the default budget (same forms as `max_memory`).
pub const ENV_VAR: &str = "LAYERSCOPE_MAX_MEMORY";

/// The budget used when the machine cannot be read (no `/proc`, not Linux): 8 GiB, stated
/// as its source.
pub const FALLBACK_BYTES: u64 = 8 << 30;

/// A byte budget and its source, e.g. `"0.8 × MemAvailable (21.3 GiB)"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

impl Budget {
    /// A budget given by the caller (`max_memory=`).
    pub fn argument(bytes: u64) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::invalid(
                "max_memory must be a positive number of bytes, got 0",
            ));
        }
        Ok(Budget {
            bytes,
            source: "max_memory argument".into(),
        })
    }

    /// No limit: for internal calls whose caller has already checked the whole call.
    pub fn unchecked() -> Self {
        Budget {
            bytes: u64::MAX,
            source: "checked by the caller".into(),
        }
    }

    /// The budget in force: `explicit` (bytes, from `max_memory`) if given, else
    /// `LAYERSCOPE_MAX_MEMORY` if set (an unparsable value is an error naming it), else
    /// [`Budget::machine`].
    pub fn resolve(explicit: Option<u64>) -> Result<Self> {
        if let Some(b) = explicit {
            return Budget::argument(b);
        }
        match std::env::var(ENV_VAR) {
            Ok(v) if !v.trim().is_empty() => {
                let bytes = parse_size(&v).map_err(|e| {
                    Error::invalid(format!("environment variable {ENV_VAR}={v:?}: {e}"))
                })?;
                Ok(Budget {
                    bytes,
                    source: format!("{ENV_VAR}={}", v.trim()),
                })
            }
            _ => Ok(Budget::machine()),
        }
    }

    /// [`BUDGET_FRACTION`] of the smallest of: `MemAvailable` (`/proc/meminfo`), the cgroup
    /// memory limit of this process (v2 `memory.max`, v1 `memory.limit_in_bytes`, the
    /// process's cgroup and its ancestors) and the `RLIMIT_AS` headroom (limit − current
    /// virtual size). [`FALLBACK_BYTES`] when none can be read.
    pub fn machine() -> Self {
        let readings = machine_readings();
        match readings.iter().min_by_key(|r| r.1) {
            Some((what, bytes)) => Budget {
                bytes: ((*bytes as f64) * BUDGET_FRACTION) as u64,
                source: format!("{BUDGET_FRACTION} × {what} ({})", fmt_bytes(*bytes as u128)),
            },
            None => Budget {
                bytes: FALLBACK_BYTES,
                source: "fallback (the machine's memory could not be read)".into(),
            },
        }
    }

    /// `Ok` when `need` bytes fit; otherwise an [`Error::Memory`]:
    /// "`what` needs N, above the memory budget of B (source); `advice`; or raise the budget".
    pub fn check(&self, need: u128, what: impl Display, advice: impl Display) -> Result<()> {
        if need <= self.bytes as u128 {
            return Ok(());
        }
        Err(Error::Memory(format!(
            "{what} needs {}, above the memory budget of {} ({}); {advice}; or raise the \
             budget (max_memory=..., --max-memory, or {ENV_VAR}) if the machine has the memory",
            fmt_bytes(need),
            fmt_bytes(self.bytes as u128),
            self.source
        )))
    }

    /// `bytes (source)`, for messages and `layerscope info`.
    pub fn describe(&self) -> String {
        format!("{} ({})", fmt_bytes(self.bytes as u128), self.source)
    }
}

/// The largest `r ≤ 2³²` with `bytes(r) ≤ budget` (`bytes` increasing), 0 if none: what a
/// memory error offers ("at most r rows fit").
pub fn max_rows_for(budget: u64, bytes: impl Fn(u128) -> u128) -> u64 {
    let (mut lo, mut hi) = (0u128, 1u128 << 32);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if bytes(mid) <= budget as u128 {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo as u64
}

/// Bytes in a human unit: `512 B`, `1.5 MiB`, `3.25 GiB`.
pub fn fmt_bytes(b: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

const SIZE_FORMS: &str = "a positive number of bytes, or a size string such as \"512M\", \
    \"4G\", \"1.5GiB\", \"800MB\" (K/M/G/T and KiB/MiB/GiB/TiB: powers of 1024; \
    KB/MB/GB/TB: powers of 1000)";

/// Parse a memory size: a positive integer (bytes) or a number with a unit — `K`, `M`, `G`,
/// `T` and `KiB` … `TiB` are powers of 1024, `KB` … `TB` powers of 1000, `B` bytes; case
/// and spaces are ignored (`"1.5 GiB"`, `"512m"`). Zero, negative, non-finite, unknown
/// units or sizes above `u64::MAX` are an [`Error::InvalidArgument`] listing the forms.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::invalid(format!(
            "cannot read {s:?} as a memory size; expected {SIZE_FORMS}"
        ))
    };
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = if unit.is_empty() || unit.eq_ignore_ascii_case("b") {
        num.parse::<u64>().map_err(|_| bad())? as f64
    } else {
        num.parse::<f64>().map_err(|_| bad())? * mult
    };
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(Error::invalid(format!(
            "memory size {s:?} is out of range; expected {SIZE_FORMS}"
        )));
    }
    Ok(bytes as u64)
}

/// `(what, bytes)` for every limit of this process that could be read.
fn machine_readings() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Some(b) = meminfo_available() {
        out.push(("MemAvailable".to_string(), b));
    }
    if let Some((what, b)) = cgroup_limit() {
        out.push((what, b));
    }
    if let Some(b) = rlimit_as_headroom() {
        out.push(("RLIMIT_AS headroom".to_string(), b));
    }
    out
}

/// A `/proc` style `Key:   123 kB` line's value in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let v: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    v.checked_mul(1024)
}

fn meminfo_available() -> Option<u64> {
    kb_field(&read_small("/proc/meminfo")?, "MemAvailable:")
}

/// Read a small kernel file (bounded: these files are a few KiB).
fn read_small(path: &str) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    f.take(1 << 20).read_to_string(&mut s).ok()?;
    Some(s)
}

/// The tightest cgroup memory limit on this process's cgroup path and its ancestors.
fn cgroup_limit() -> Option<(String, u64)> {
    cgroup_limit_in(
        &read_small("/proc/self/cgroup")?,
        std::path::Path::new("/sys/fs/cgroup"),
    )
}

/// [`cgroup_limit`] for a `/proc/self/cgroup` text and a cgroup mount root: v2 (`0::PATH`)
/// reads `ROOT/PATH/memory.max`, v1 (`N:…memory…:PATH`) `ROOT/memory/PATH/
/// memory.limit_in_bytes`, on PATH and each ancestor; "max" and v1's huge "no limit" values
/// are no limit.
fn cgroup_limit_in(cg: &str, root: &std::path::Path) -> Option<(String, u64)> {
    let mut best: Option<(String, u64)> = None;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (base, file, name) = if id == "0" && ctrl.is_empty() {
            (root.to_path_buf(), "memory.max", "cgroup memory.max")
        } else if ctrl.split(',').any(|c| c == "memory") {
            (
                root.join("memory"),
                "memory.limit_in_bytes",
                "cgroup memory.limit_in_bytes",
            )
        } else {
            continue;
        };
        let mut p = std::path::PathBuf::from(path);
        loop {
            let f = base.join(p.strip_prefix("/").unwrap_or(&p)).join(file);
            let v = read_small(&f.to_string_lossy())
                .and_then(|s| s.trim().parse::<u64>().ok())
                // v1 writes "no limit" as a huge page-rounded number
                .filter(|&v| v < (1u64 << 60));
            if let Some(v) = v {
                if best.as_ref().is_none_or(|b| v < b.1) {
                    best = Some((name.to_string(), v));
                }
            }
            if !p.pop() {
                break;
            }
        }
    }
    best
}

/// `RLIMIT_AS` minus the current virtual size of this process (`VmSize`), if a limit is set.
fn rlimit_as_headroom() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } != 0
            || r.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        let used = read_small("/proc/self/status")
            .and_then(|s| kb_field(&s, "VmSize:"))
            .unwrap_or(0);
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
        let cur = r.rlim_cur as u64;
        Some(cur.saturating_sub(used))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

fn refused(what: &dyn Display, len: usize, elem: usize) -> Error {
    let bytes = len as u128 * elem as u128;
    Error::Memory(format!(
        "could not allocate {what} ({}): the system refused the memory (free memory, the \
         cgroup limit or RLIMIT_AS); lower max_memory or {ENV_VAR} so that the call is \
         planned within what the machine has, or make the input smaller",
        fmt_bytes(bytes)
    ))
}

/// An empty `Vec` with room for exactly `len` elements, or [`Error::Memory`] naming `what`
/// when the allocation is refused (or `len × size_of::<T>()` overflows).
pub fn try_with_capacity<T>(len: usize, what: impl Display) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| refused(&what, len, std::mem::size_of::<T>()))?;
    Ok(v)
}

/// `vec![value; len]`, or [`Error::Memory`] naming `what` when the allocation is refused.
pub fn try_vec<T: Clone>(len: usize, value: T, what: impl Display) -> Result<Vec<T>> {
    let mut v = try_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// A copy of `src`, or [`Error::Memory`] naming `what` when the allocation is refused.
pub fn try_copy<T: Clone>(src: &[T], what: impl Display) -> Result<Vec<T>> {
    let mut v = try_with_capacity(src.len(), what)?;
    v.extend_from_slice(src);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_documented_form() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 1.5 GiB ").unwrap(), 3 << 29);
        assert_eq!(parse_size("800MB").unwrap(), 800_000_000);
        assert_eq!(parse_size("2TB").unwrap(), 2_000_000_000_000);
        assert_eq!(parse_size("10B").unwrap(), 10);
        assert_eq!(parse_size("1K").unwrap(), 1024);
    }

    #[test]
    fn bad_sizes_are_errors_naming_the_forms() {
        for s in [
            "",
            "0",
            "-1",
            "lots",
            "4Q",
            "nan",
            "inf",
            "1e3",
            "G",
            "0.1B",
            "1.2.3G",
            "0.0G",
            "99999999999T",
            "18446744073709551616",
        ] {
            match parse_size(s) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains("512M"), "{s}: {m}"),
                r => panic!("{s:?} gave {r:?}"),
            }
        }
    }

    #[test]
    fn budget_resolution_and_check() {
        assert!(Budget::argument(0).is_err());
        let b = Budget::resolve(Some(1000)).unwrap();
        assert_eq!(b.bytes, 1000);
        assert!(b.check(1000, "x", "y").is_ok());
        match b.check(1001, "the thing", "try less") {
            Err(Error::Memory(m)) => {
                assert!(m.contains("the thing needs 1001 B"), "{m}");
                assert!(m.contains("max_memory argument"), "{m}");
                assert!(m.contains("try less"), "{m}");
            }
            r => panic!("{r:?}"),
        }
        let m = Budget::machine();
        assert!(m.bytes > 0, "{m:?}");
        assert!(!m.source.is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn machine_budget_is_at_most_the_available_memory() {
        let avail = meminfo_available().unwrap();
        let m = Budget::machine();
        assert!(
            m.bytes as f64 <= avail as f64 * BUDGET_FRACTION + 1.0,
            "{m:?}"
        );
    }

    #[test]
    fn cgroup_limits_v1_and_v2_and_ancestors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let put = |rel: &str, v: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        // v2: the job's own limit is "max", its parent's is 3 GiB
        put("a/b/memory.max", "max\n");
        put("a/memory.max", "3221225472\n");
        let r = cgroup_limit_in("0::/a/b\n", root).unwrap();
        assert_eq!(r, ("cgroup memory.max".to_string(), 3 << 30));
        // v1 (hybrid): "no limit" is a huge number; a tighter one below wins
        put("memory/x/memory.limit_in_bytes", "9223372036854771712\n");
        put("memory/x/y/memory.limit_in_bytes", "1073741824\n");
        let r = cgroup_limit_in("4:memory:/x/y\n0::/\n1:cpu:/\n", root).unwrap();
        assert_eq!(r.1, 1 << 30);
        assert!(cgroup_limit_in("4:memory:/x\n", root).is_none());
        assert!(cgroup_limit_in("garbage\n1:cpu:/\n", root).is_none());
    }

    #[test]
    fn refused_allocations_are_errors() {
        match try_vec::<f64>(usize::MAX / 4, 0.0, "a test buffer") {
            Err(Error::Memory(m)) => assert!(m.contains("a test buffer"), "{m}"),
            r => panic!("{:?}", r.map(|v| v.len())),
        }
        assert!(try_with_capacity::<u8>(1 << 62, "huge").is_err());
        assert_eq!(try_vec(3, 1u8, "small").unwrap(), vec![1, 1, 1]);
    }

    #[test]
    fn bytes_format() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(146_234_483_208), "136.19 GiB");
    }
}
