"""Every default and fixed table of the Python layer, once. Numbers the Rust core also uses
come from the core (``_native``), so the two cannot disagree."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError

#: Rows per minibatch of ``estimator="minibatch"`` (the core's
#: ``measures::cka::minibatch::DEFAULT_BATCH_SIZE``).
BATCH_SIZE: int = _native.DEFAULT_BATCH_SIZE
#: Kept directions of subspace alignment (the core's ``measures::align::DEFAULT_K``).
ALIGN_K: int = _native.DEFAULT_ALIGN_K
#: Rows of the seeded sample of RBF CKA when ``sample`` is not given (all rows up to it).
SAMPLE_CAP = 4096
#: The CCA ridge: ``eps · tr(C_ii) / d_i`` added when ``n <= d_i`` or ``C_ii`` is singular.
RIDGE = 1e-4

#: Where the moment passes run (``backend=``): this process, or a Ray cluster.
BACKENDS = ("local", "ray")

#: What a store holds, and bytes per value.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
STORE_DTYPES = tuple(ITEMSIZE)
#: What a capture may store (float64 activations are not a thing models produce).
CAPTURE_DTYPES = ("float16", "bfloat16", "float32")
_ALIASES = {"f16": "float16", "half": "float16", "bf16": "bfloat16", "f32": "float32",
            "float": "float32", "f64": "float64", "double": "float64",
            **{name: name for name in ITEMSIZE}}


def dtype_name(dtype: Any) -> str:
    """The store dtype named by a string (``"bf16"``, ``"float32"``, …), a numpy dtype or a
    torch dtype; :class:`InvalidArgumentError` for anything else."""
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        name = str(dtype).lower()
        if name.startswith("torch."):
            name = name[len("torch."):]
        else:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                pass
    try:
        return _ALIASES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unsupported dtype {dtype!r}; expected one of {', '.join(STORE_DTYPES)}"
        ) from None
