"""The one torch ↔ numpy adapter: every array a user hands to layerscope (numpy, torch on
any device, ml_dtypes bfloat16) goes through here, without importing torch unless the value
is a tensor."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .errors import InvalidArgumentError


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _host(name: str, x: Any) -> Any:
    """A dense, detached CPU tensor; tensors without values are refused by name."""
    if x.is_meta:
        raise InvalidArgumentError(
            f"{name}: a tensor on the 'meta' device has a shape but no values")
    if x.layout is not __import__("torch").strided:
        raise InvalidArgumentError(
            f"{name}: a {x.layout} tensor; pass a dense one (tensor.to_dense())")
    return x.detach().cpu()


def to_numpy(x: Any, name: str = "array") -> np.ndarray:
    """A numpy array of the values (a view where possible); a bfloat16 tensor becomes
    float32, which holds every bfloat16 value exactly."""
    if isinstance(x, np.ndarray):
        return x
    if is_tensor(x):
        import torch

        t = _host(name, x)
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return np.asarray(x)


class Bits(NamedTuple):
    """The 16-bit patterns (``uint16``) of float16 or bfloat16 values, as files store them:
    :func:`to_store_array` passes them on untouched, so they are stored bit-exactly without
    torch or ml_dtypes (:func:`layerscope.convert` reads BF16 tensors this way)."""

    bits: np.ndarray
    kind: str


def to_store_array(name: str, x: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous 2-D array as a store takes it, plus its kind: float16 and bfloat16 (torch
    or ml_dtypes) as their uint16 bit patterns, so they are stored bit-exactly; integers as
    float64."""
    if isinstance(x, Bits):
        if x.kind not in ("float16", "bfloat16") or x.bits.dtype != np.uint16:
            raise InvalidArgumentError(f"{name}: Bits holds uint16 float16/bfloat16 patterns")
        a, kind = x.bits, x.kind
    elif is_tensor(x):
        import torch

        t = _host(name, x).contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            kind = "bfloat16" if t.dtype == torch.bfloat16 else "float16"
            a = t.view(torch.int16).numpy().view(np.uint16)
        elif t.dtype in (torch.float32, torch.float64):
            a = t.numpy()
            kind = a.dtype.name
        elif t.is_floating_point() or t.is_complex():
            raise InvalidArgumentError(f"{name}: unsupported torch dtype {t.dtype}")
        else:
            a, kind = t.numpy().astype(np.float64), "float64"
    else:
        a = np.asarray(x)
        if a.dtype.kind == "f" and not a.dtype.isnative:  # big-endian input
            a = a.astype(a.dtype.newbyteorder("="))
        if a.dtype == np.float16:
            a, kind = a.view(np.uint16), "float16"
        elif a.dtype.name == "bfloat16":  # ml_dtypes
            a, kind = a.view(np.uint16), "bfloat16"
        elif a.dtype in (np.float32, np.float64):
            kind = a.dtype.name
        elif a.dtype.kind in "iub":
            a, kind = a.astype(np.float64), "float64"
        else:
            raise InvalidArgumentError(f"{name}: unsupported dtype {a.dtype}")
    if a.ndim != 2:
        raise InvalidArgumentError(
            f"{name}: expected a 2-D array [rows, dim], got shape {tuple(a.shape)}")
    return np.ascontiguousarray(a), kind
