"""Type stubs of the compiled extension ``layerscope._native`` (PyO3)."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

ProgressCallback = Callable[[int, int], Any] | None

# ---- store (rust/python/src/store.rs) ----

# ---- moments (rust/python/src/moments.rs) ----

# ---- alignment (rust/python/src/align.rs) ----

# ---- neighbours (rust/python/src/neighbors.rs) ----
