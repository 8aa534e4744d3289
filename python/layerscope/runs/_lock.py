"""One writer per batch folder: an advisory ``flock`` on ``DIR/.layerscope-batch.lock``.

The kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a
lock is never stale; the file keeps who took it last (pid, host, start time, command), which is
what a refused second process is told."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import LockedError

LOCK_NAME = ".layerscope-batch.lock"


class FolderLock:
    """``with FolderLock(folder):`` holds the folder's lock or raises :class:`LockedError`
    naming the process that holds it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise LockedError(
                f"{self.path.parent}: another layerscope batch is writing this folder "
                f"({holder}); wait for it to finish, or stop it, then run again (finished "
                "items are kept)") from None
        except OSError:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data.decode("utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "holder unknown"
    argv = info.get("argv")
    cmd = " ".join(str(a) for a in argv) if isinstance(argv, list) else "?"
    if len(cmd) > 120:
        cmd = cmd[:117] + "..."
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}: {cmd}")
