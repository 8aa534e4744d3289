"""The wheel check behind ``make wheel`` (tools/check_wheel.py) refuses what PyPI users would
trip on: a bare ``linux`` tag, a glibc newer than the tag, an unstripped library, a missing
licence, a heavy core requirement, a file that does not match RECORD."""

from __future__ import annotations

import base64
import hashlib
import struct
import sys
import zipfile
from pathlib import Path

import layerscope
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_wheel  # noqa: E402

LIB = next(Path(layerscope.__file__).parent.glob("_native*.so"))
GOOD = "layerscope-0.1.0-cp39-abi3-manylinux_2_34_x86_64.whl"
DIST = "layerscope-0.1.0.dist-info/"


def _elf(sections: list[str]) -> bytes:
    """A minimal 64-bit little-endian ELF with the named sections (headers only)."""
    names = b"\0" + b"".join(s.encode() + b"\0" for s in [*sections, ".shstrtab"])
    shoff = 64 + len(names) + (-len(names)) % 8
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x28, shoff)
    all_sections = ["", *sections, ".shstrtab"]
    struct.pack_into("<HHH", head, 0x3A, 64, len(all_sections), len(all_sections) - 1)
    table = bytearray()
    for s in all_sections:
        h = bytearray(64)
        struct.pack_into("<I", h, 0, names.index(s.encode() + b"\0") if s else 0)
        if s == ".shstrtab":
            struct.pack_into("<QQ", h, 0x18, 64, len(names))
        table += h
    return bytes(head) + names + b"\0" * ((-len(names)) % 8) + bytes(table)


def _wheel(tmp: Path, name: str = GOOD, *, lib: bytes | None = None, licence: bool = True,
           requires: tuple[str, ...] = ("numpy>=1.24", "tqdm>=4.60"),
           tamper: bool = False) -> Path:
    meta = "Metadata-Version: 2.4\nName: layerscope\nVersion: 0.1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + \
        "Requires-Dist: pandas>=2.0 ; extra == 'plot'\nLicense-Expression: MIT\n"
    files = {"layerscope/__init__.py": b"",
             "layerscope/_native.abi3.so": LIB.read_bytes() if lib is None else lib,
             DIST + "METADATA": meta.encode(),
             DIST + "entry_points.txt": b"[console_scripts]\nlayerscope=layerscope.cli:main\n"}
    if licence:
        files[DIST + "licenses/LICENSE"] = b"MIT License\n"
    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()}"
        f",{len(d)}\n" for n, d in files.items()) + f"{DIST}RECORD,,\n"
    if tamper:
        files["layerscope/__init__.py"] = b"import os\n"
    path = tmp / name
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(DIST + "RECORD", record)
    return path


def test_a_good_wheel_passes(tmp_path: Path) -> None:
    lines = check_wheel.check(_wheel(tmp_path))
    assert "stripped" in lines[2] and "manylinux_2_34" in lines[1]


@pytest.mark.parametrize("case, message", [
    ({"name": GOOD.replace("manylinux_2_34", "linux")}, "is not manylinux"),
    ({"name": GOOD.replace("2_34", "2_17")}, "newer than its tag"),
    ({"licence": False}, "no licence file"),
    ({"requires": ("numpy>=1.24", "tqdm>=4.60", "torch>=2.1")}, "core requirements"),
    ({"tamper": True}, "differs from RECORD"),
    ({"lib": _elf([".text", ".symtab", ".debug_info"])}, "not stripped: it has .symtab, .debug_info"),
    ({"lib": b"MZ not an elf"}, "not a 64-bit little-endian ELF"),
])
def test_a_bad_wheel_is_refused(tmp_path: Path, case: dict, message: str) -> None:
    with pytest.raises(check_wheel.WheelError, match=message.replace(".", r"\.")):
        check_wheel.check(_wheel(tmp_path, **case))


def test_the_sections_of_a_real_library_are_read() -> None:
    sections = check_wheel.elf_sections(LIB.read_bytes())
    assert ".text" in sections and ".dynsym" in sections
    assert check_wheel.elf_sections(_elf([".text", ".symtab"]))[1:3] == [".text", ".symtab"]


def test_the_project_ships_its_licence() -> None:
    root = Path(__file__).resolve().parents[1]
    assert "MIT License" in (root / "LICENSE").read_text()
    assert 'license-files = ["LICENSE"]' in (root / "pyproject.toml").read_text()
