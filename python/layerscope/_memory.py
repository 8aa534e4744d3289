"""The memory budget: how many bytes a call may use, and where that number came from.

Every measure checks its exact peak-byte formula against the budget before it reads a row,
so a call that cannot finish fails at once with a :class:`~layerscope.errors.MemoryBudgetError`
that says what would fit; allocations themselves are fallible (a refused one is the same
error, never a crash). The budget in force is, in order:

1. ``max_memory=`` of the call (``--max-memory`` on the CLI);
2. the environment variable ``LAYERSCOPE_MAX_MEMORY``;
3. the machine's: ``MEMORY_BUDGET_FRACTION`` (0.8) of the smallest of ``MemAvailable``, the
   cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and the
   ``RLIMIT_AS`` headroom.

Sizes are a positive number of bytes or a string: ``"512M"``, ``"4G"``, ``"1.5GiB"``
(``K``/``M``/``G``/``T`` and ``KiB`` … ``TiB`` are powers of 1024), ``"800MB"`` (``KB`` …
``TB``: powers of 1000). The computation and the parser live in the Rust core
(``layerscope_core::memory``); this module only checks Python types.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _native
from .errors import InvalidArgumentError

_FORMS = (
    "a positive number of bytes or a size string such as '512M', '4G', '1.5GiB' or '800MB'"
)


class MemoryBudget(NamedTuple):
    """The budget in force: ``bytes`` and a readable ``source``."""

    bytes: int
    source: str

    def __str__(self) -> str:
        from .store import _human

        return f"{_human(self.bytes)} ({self.source})"


def max_memory_bytes(value: Any, name: str = "max_memory") -> int | None:
    """``value`` (None, an int, a finite float or a size string) as bytes, or None.

    Raises :class:`InvalidArgumentError` naming ``name``, the value and the accepted forms
    for zero, negative, non-finite, boolean, unparsable or unknown-unit values."""
    if value is None:
        return None
    bad = InvalidArgumentError(f"{name}={value!r} is not a memory size; expected {_FORMS}")
    if isinstance(value, (bool, np.bool_)):
        raise bad
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise bad
        n = int(value)
    elif isinstance(value, str):
        try:
            n = int(_native.parse_memory_size(value))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{name}={value!r}: {e}") from None
    else:
        raise bad
    if n < 1 or n >= 2**64:
        raise bad
    return n


def memory_budget(max_memory: Any = None) -> MemoryBudget:
    """The budget a call with this ``max_memory`` would use, and its source (see the
    module docstring for the order: argument, ``LAYERSCOPE_MAX_MEMORY``, the machine)."""
    b, src = _native.memory_budget(max_memory_bytes(max_memory))
    return MemoryBudget(int(b), str(src))


def check_budget(need: int, what: str, advice: str, max_memory: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` ("``what`` needs N, above the budget of B (source);
    ``advice``") when ``need`` bytes exceed the budget in force."""
    _native.check_budget(int(need), what, advice, max_memory)


def _cli_size(text: str) -> int:
    import argparse

    try:
        n = max_memory_bytes(text, "--max-memory")
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert n is not None
    return n


def add_max_memory_arg(parser: Any) -> None:
    """The one ``--max-memory SIZE`` option of every CLI command that computes."""
    parser.add_argument(
        "--max-memory", type=_cli_size, default=None, metavar="SIZE",
        help="memory budget: bytes or a size such as 4G, 512M, 1.5GiB, 800MB (default: "
        "LAYERSCOPE_MAX_MEMORY, else 0.8 x the smallest of the available memory, the cgroup "
        "limit and RLIMIT_AS; 'layerscope info --budget' shows it)",
    )
