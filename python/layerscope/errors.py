"""Typed exceptions of layerscope.

Every error raised by layerscope derives from :class:`LayerscopeError` and also from the
builtin that fits it, so ``except ValueError`` / ``except KeyError`` keep working. The Rust
core maps each of its error kinds to the class of the same name here.
"""

from __future__ import annotations


class LayerscopeError(Exception):
    """Base class of every layerscope error."""


class FormatError(LayerscopeError, ValueError):
    """A shard or manifest is malformed (header, JSON, dtype, offsets, sizes, checksum)."""


class MismatchError(LayerscopeError, ValueError):
    """Two things that must agree do not (manifest vs shard, row ids of two stores, shapes)."""


class MissingLayerError(LayerscopeError, KeyError):
    """A layer name is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(LayerscopeError, FileNotFoundError):
    """A store, shard or file is missing."""


class StoreExistsError(LayerscopeError, FileExistsError):
    """Refusing to overwrite an existing store (pass ``overwrite=True``)."""


class NonFiniteError(LayerscopeError, ValueError):
    """NaN or infinite values where finite numbers are required."""


class InvalidArgumentError(LayerscopeError, ValueError):
    """A parameter is outside its domain."""


class UnknownArgumentError(InvalidArgumentError, TypeError):
    """A keyword the function does not take (a ``TypeError``, as Python's own, naming the
    closest keywords it does take)."""


class MemoryBudgetError(LayerscopeError, MemoryError):
    """The computation would exceed the memory budget; the message lists the options."""


class StoreIOError(LayerscopeError, OSError):
    """An operating-system I/O error while reading or writing a store."""


class CaptureError(LayerscopeError, RuntimeError):
    """A capture could not be set up or run (hooks, patterns, outputs)."""


class Interrupted(LayerscopeError, KeyboardInterrupt):
    """Work was interrupted."""


class MissingDependencyError(LayerscopeError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'layerscope[plot]'`` for tables and figures, ``[torch]`` for capture)."""


class LockedError(LayerscopeError, RuntimeError):
    """Another process holds the lock of a folder this call would write (a running
    ``layerscope batch``); the message names the holder (pid, host, start time, command)."""


class StoreLockedError(LockedError):
    """Another writer (``write_store``, a capture, ``convert``) is writing this store: one
    writer per store, held by an advisory lock (``flock``) on ``.layerscope.lock`` in the
    folder, released by the OS when its process ends. The message names the holder (pid,
    host, start time)."""


__all__ = [
    "LockedError", "StoreLockedError", "LayerscopeError", "FormatError", "MismatchError", "MissingLayerError",
    "StoreNotFoundError", "StoreExistsError", "NonFiniteError", "InvalidArgumentError",
    "UnknownArgumentError",
    "MemoryBudgetError", "StoreIOError", "CaptureError", "Interrupted", "MissingDependencyError",
]


class ClusterError(LayerscopeError, RuntimeError):
    """A distributed run cannot finish: no alive node can run its tasks, or a task was lost
    (its worker or node died) more times than its retries allow."""
