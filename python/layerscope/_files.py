"""Opening a user's file without trusting what it is: only regular files are read — never a
named pipe (whose ``open`` blocks until a writer comes), a socket, a device (``/dev/zero``
reads forever) or a folder. The Rust reader does the same for stores
(``layerscope_core::store::files``)."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from .errors import FormatError


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_regular(path: str | os.PathLike[str], what: str = "the file") -> None:
    """:class:`~layerscope.errors.FormatError` unless ``path`` is a regular file (symlinks
    followed); a missing file raises ``FileNotFoundError`` as ``open`` would."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise FormatError(f"{os.fspath(path)}: {what} is {_kind(mode)}, not a regular file: "
                          "refused")


def open_regular(path: str | os.PathLike[str], what: str = "the file") -> BinaryIO:
    """``open(path, "rb")`` of a regular file only: checked before opening, opened
    non-blocking (a file swapped for a FIFO in between does not block) and checked again on
    the open descriptor."""
    check_regular(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FormatError(f"{os.fspath(path)}: {what} is {_kind(mode)}, not a regular "
                              "file: refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], what: str = "the file",
                 limit: int = 1 << 30) -> bytes:
    """The bytes of the regular file ``path``, refused before reading when larger than
    ``limit``."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FormatError(f"{os.fspath(path)}: {what} of {size} bytes exceeds the "
                              f"{limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"{os.fspath(path)}: {what} grew past {limit} bytes while read")
    return data
