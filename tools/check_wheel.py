"""Check a built layerscope wheel before anyone installs it (``make wheel`` runs this).

    python tools/check_wheel.py dist/            # the one wheel in dist/
    python tools/check_wheel.py dist/layerscope-0.1.0-cp39-abi3-manylinux_2_34_x86_64.whl

What is checked (standard library only; each failure is one line, exit status 1):
- the platform tag is manylinux (or musllinux), never the bare ``linux_x86_64`` that PyPI and
  pip on other machines refuse, and the extension asks for no glibc symbol version newer than
  the tag promises;
- the extension module is stripped (no ``.symtab``, no ``.debug_*`` ELF sections);
- the licence file is in ``*.dist-info/licenses/``, the metadata declares ``MIT``, the core
  requirements are numpy and tqdm only (everything else behind an extra), and the
  ``layerscope`` console script points at ``layerscope.cli:main``;
- every file's size and sha256 match ``RECORD``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import sys
import zipfile
from pathlib import Path

CORE_REQUIREMENTS = {"numpy", "tqdm"}


class WheelError(Exception):
    """The wheel fails a check (the message says which)."""


def elf_sections(data: bytes) -> list[str]:
    """The section names of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise WheelError("the extension is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return []

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    table = data[str_off:str_off + str_size]
    names = []
    for i in range(shnum):
        name = header(i)[0]
        names.append(table[name:table.index(b"\0", name)].decode("ascii", "replace"))
    return names


def glibc_needed(data: bytes) -> tuple[int, int]:
    """The newest ``GLIBC_2.x`` symbol version named in the library's strings."""
    found = [(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", data)]
    return max(found, default=(0, 0))


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def check(path: Path) -> list[str]:
    """Every check on the wheel at ``path``; returns the summary lines, raises
    :class:`WheelError` at the first failure."""
    m = re.fullmatch(r"layerscope-([^-]+)-([^-]+)-([^-]+)-(.+)\.whl", path.name)
    if not m:
        raise WheelError(f"{path.name}: not a layerscope wheel file name")
    platform = m.group(4)
    tag = re.fullmatch(r"(manylinux|musllinux)_(\d+)_(\d+)_(\w+)", platform)
    if not tag:
        raise WheelError(f"{path.name}: platform tag {platform!r} is not manylinux/musllinux "
                         "(pip elsewhere and PyPI refuse a bare linux tag)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        info = next((n for n in names
                     if re.fullmatch(r"layerscope-[^/]+\.dist-info/METADATA", n)), None)
        if info is None:
            raise WheelError("no METADATA in the wheel")
        dist = info[:-len("METADATA")]
        meta = z.read(info).decode("utf-8")
        core = {re.split(r"[<>=!~ ;\[]", line.split(":", 1)[1].strip())[0].lower()
                for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
        if core != CORE_REQUIREMENTS:
            raise WheelError(f"core requirements {sorted(core)}, expected "
                             f"{sorted(CORE_REQUIREMENTS)} (the rest belongs behind an extra)")
        if not re.search(r"^License-Expression: MIT$", meta, re.M):
            raise WheelError("METADATA declares no License-Expression: MIT")
        if not any(n.startswith(dist + "licenses/LICENSE") for n in names):
            raise WheelError(f"no licence file under {dist}licenses/")
        entry = z.read(dist + "entry_points.txt").decode("utf-8")
        if not re.search(r"^layerscope\s*=\s*layerscope\.cli:main$", entry, re.M):
            raise WheelError("no console script layerscope = layerscope.cli:main")
        record = {}
        for line in z.read(dist + "RECORD").decode("utf-8").splitlines():
            name, digest, size = line.rsplit(",", 2)
            record[name] = (digest, size)
        for name in names:
            if name.endswith("/") or name == dist + "RECORD":
                continue
            digest, size = record.get(name, ("", ""))
            data = z.read(name)
            if digest != _record_hash(data) or size != str(len(data)):
                raise WheelError(f"{name}: size or sha256 differs from RECORD")
        libs = [n for n in names if n.startswith("layerscope/_native") and n.endswith(".so")]
        if len(libs) != 1:
            raise WheelError(f"expected one extension module, found {libs}")
        lib = z.read(libs[0])
    sections = elf_sections(lib)
    debug = [s for s in sections if s == ".symtab" or s.startswith(".debug")]
    if debug:
        raise WheelError(f"{libs[0]} is not stripped: it has {', '.join(debug)}")
    need = glibc_needed(lib)
    if tag.group(1) == "manylinux" and need > (int(tag.group(2)), int(tag.group(3))):
        raise WheelError(f"{libs[0]} needs GLIBC_{need[0]}.{need[1]}, newer than its tag "
                         f"{platform}")
    return [f"{path.name}: {path.stat().st_size / 1e6:.1f} MB",
            f"  tag {platform}; the extension needs glibc >= {need[0]}.{need[1]}",
            f"  {libs[0]}: {len(lib) / 1e6:.1f} MB, stripped ({len(sections)} sections)",
            f"  licence, metadata, console script and RECORD ({len(record)} files) ok"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    target = Path(argv[0])
    wheels = sorted(target.glob("layerscope-*.whl")) if target.is_dir() else [target]
    if len(wheels) != 1:
        print(f"check_wheel: expected one wheel in {target}, found {len(wheels)}",
              file=sys.stderr)
        return 1
    try:
        lines = check(wheels[0])
    except (WheelError, OSError, KeyError, zipfile.BadZipFile, struct.error, ValueError) as e:
        print(f"check_wheel: {wheels[0].name}: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
