"""Progress reporting, one way for everything: a ``cb(done, total)`` feeding a tqdm bar
(:class:`Progress`, :class:`PassProgress`) and one-line stage messages on stderr
(:func:`stage`), both silent when ``progress`` is False."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def stage(progress: Any, who: str, msg: str) -> None:
    """One line ``layerscope WHO: MSG`` on stderr when ``progress`` is on (a callable
    ``progress`` gets the bars' numbers only, not these lines)."""
    if progress is True:
        print(f"layerscope {who}: {msg}", file=sys.stderr, flush=True)


class Progress:
    """``progress``: True (a tqdm bar on stderr), False/None (silent) or a callable
    ``cb(done, total)``. Use as a context manager; ``.cb`` is what the Rust engines call."""

    def __init__(self, progress: Any, desc: str, unit: str = "row") -> None:
        self.bar: Any = None
        self.cb: Callable[[int, int], None] | None = None
        if callable(progress):
            self.cb = progress
        elif progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self.bar = tqdm(total=0, desc=desc, leave=False, unit=unit,
                            unit_scale=unit == "row")
            self.cb = self._update

    def _update(self, done: int, total: int) -> None:
        bar = self.bar
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class PassProgress(Progress):
    """One bar (or callback) over ``passes`` passes of ``n`` rows each: pass ``p``'s
    ``cb(done, total)`` is reported as ``(p·total + done, passes·total)``."""

    def __init__(self, progress: Any, desc: str, passes: int) -> None:
        super().__init__(progress, desc)
        self.passes = max(int(passes), 1)

    def pass_cb(self, p: int) -> Callable[[int, int], None] | None:
        """The callback of pass ``p`` (0-based); None when silent."""
        inner = self.cb
        if inner is None:
            return None
        passes = self.passes

        def cb(done: int, total: int) -> None:
            inner(p * total + done, passes * total)

        return cb
