"""Which torch devices a call runs on, what it may use of them, and how their failures read."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .. import _native
from .._optional import require
from ..errors import InvalidArgumentError

#: The ``device=`` values besides a torch device: ``None`` (the Rust CPU engine) and ``"auto"``.
AUTO = "auto"

def torch_module() -> Any:
    return require("torch", "device= (the torch engine)")


class Devices(tuple):  # type: ignore[type-arg]
    """Several torch devices of one type that share a pass's tiles (``device=["cuda:0",
    "cuda:1"]``, ``"cuda:0,cuda:1"``, or ``"cuda"`` with several GPUs visible). ``type`` is
    theirs; everything that runs on one device (the neighbour products, the Gram route, a
    single-pass accumulator) runs on the first."""

    @property
    def type(self) -> str:
        return str(self[0].type)

    @property
    def index(self) -> None:
        return None

    def __str__(self) -> str:
        return ",".join(str(d) for d in self)


def _one_device(torch: Any, device: Any) -> Any:
    if not isinstance(device, (str, torch.device)):
        raise InvalidArgumentError(
            f"device must be None, 'auto', a device name ('cpu', 'cuda', 'cuda:1'), a "
            f"torch.device or a list of them, got {device!r}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError) as e:
        raise InvalidArgumentError(f"device {device!r} is not a torch device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r}: torch sees no CUDA device here; use device=None (the "
                "Rust CPU engine) or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type not in ("cpu",):
        raise InvalidArgumentError(
            f"device {device!r}: the torch engine runs on 'cpu' or 'cuda' devices")
    return dev


def resolve_device(device: Any) -> Any:
    """``None`` → None (the Rust engine); ``"auto"`` → ``cuda`` when torch sees a CUDA device,
    else None; a string or ``torch.device`` → that device; several (a list or tuple, or names
    joined by commas) → :class:`Devices`. ``InvalidArgumentError`` when one is not a device
    torch knows, is not available here, or they are of different types."""
    if device is None:
        return None
    if isinstance(device, str) and device == AUTO:
        try:
            import torch
        except ImportError:
            return None
        return torch.device("cuda") if torch.cuda.is_available() else None
    torch = torch_module()
    if isinstance(device, str) and "," in device:
        device = [d for d in device.split(",") if d.strip()]
    if isinstance(device, (list, tuple)):
        if not device:
            raise InvalidArgumentError("device: an empty list of devices")
        devs = [_one_device(torch, d) for d in device]
        if len({d.type for d in devs}) > 1:
            raise InvalidArgumentError(
                f"device {device!r}: the devices sharing a pass must be of one type")
        return devs[0] if len(devs) == 1 else Devices(devs)
    return _one_device(torch, device)


def primary(dev: Any) -> Any:
    """The device that runs what is not shared (the first of :class:`Devices`)."""
    return dev[0] if isinstance(dev, Devices) else dev


def tile_devices(dev: Any) -> list[Any]:
    """The devices that share a tiled pass: every one of :class:`Devices`; every visible GPU
    for ``"cuda"`` without an index; else ``dev`` alone."""
    if isinstance(dev, Devices):
        return list(dev)
    if dev.type == "cuda" and dev.index is None:
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [torch.device("cuda", i) for i in range(count)]
    return [dev]


def check_compute(compute: str, dev: Any) -> None:
    """``"tf32"`` only on a CUDA device."""
    if compute == "tf32" and (dev is None or dev.type != "cuda"):
        raise InvalidArgumentError(
            "compute='tf32' (TF32 tensor-core products, an approximation) needs a CUDA "
            "device (device='cuda')")


@contextlib.contextmanager
def precision(torch: Any, compute: str) -> Iterator[None]:
    """TF32 off for the duration (on only for ``compute="tf32"``); the user's settings back
    afterwards. Torch ≥ 2.9 (``fp32_precision``): only that API is used (torch refuses reads
    after the legacy and new APIs are mixed); older torch: ``allow_tf32`` and the float32
    matmul precision."""
    tf32 = compute == "tf32"
    mm, dnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(mm, "fp32_precision") and hasattr(dnn, "fp32_precision"):
        saved = (mm.fp32_precision, dnn.fp32_precision)
        mm.fp32_precision = dnn.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision, dnn.fp32_precision = saved
        return
    old = (mm.allow_tf32, dnn.allow_tf32, torch.get_float32_matmul_precision())
    mm.allow_tf32 = dnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        mm.allow_tf32, dnn.allow_tf32 = old[:2]
        torch.set_float32_matmul_precision(old[2])


def describe(dev: Any) -> str:
    """The device in words (its name for CUDA)."""
    if isinstance(dev, Devices):
        return ", ".join(describe(d) for d in dev)
    if dev.type == "cuda":
        import torch

        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)

@contextlib.contextmanager
def oom_as_budget_error(torch: Any, dev: Any, budget: int, source: str) -> Iterator[None]:
    """A device allocation failure (torch's ``OutOfMemoryError``) inside the block raised as
    the :class:`MemoryBudgetError` it is, saying what to lower."""
    cls = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None)
    try:
        yield
    except Exception as e:
        if cls is None or not isinstance(e, cls):
            raise
        from ..errors import MemoryBudgetError
        from ..store import _human as human

        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MemoryBudgetError(
            f"the device {describe(dev)} ran out of memory within the plan's budget of "
            f"{human(budget)} ({source}): other work holds device memory; set "
            f"{DEVICE_MEMORY_ENV} (or max_memory=) lower and the planner cuts smaller tiles "
            f"({first})") from None

def device_meta(dev: Any, compute: str) -> dict[str, Any]:
    """What ``meta`` records of a device run."""
    meta: dict[str, Any] = {"device": describe(dev), "engine_products": "torch"}
    if compute == "tf32":
        meta["approximation"] = TF32_APPROXIMATION
    return meta


#: What ``meta["approximation"]`` says of ``compute="tf32"``.
TF32_APPROXIMATION = ("compute='tf32': the block products in TF32 (10-bit mantissas, about "
                      "1e-3 relative per product), accumulated in f64")


# ------------------------------------------------------------ statistics while capturing


#: The environment variable that sets the torch engine's device budget (a size: "20G").
DEVICE_MEMORY_ENV = "LAYERSCOPE_MAX_DEVICE_MEMORY"


def device_budget(dev: Any, max_memory: Any = None) -> tuple[int, str]:
    """Bytes the torch engine may hold on ``dev``: ``max_memory`` when given; else
    ``LAYERSCOPE_MAX_DEVICE_MEMORY`` when set; else on a CUDA device 0.8 × its free memory
    now, on the CPU the host budget (:func:`layerscope.memory_budget`). Several devices: the
    smallest of theirs (every one runs tiles of the same plan)."""
    import os

    from .._memory import max_memory_bytes, memory_budget

    given = max_memory_bytes(max_memory)
    if given is not None:
        return given, "max_memory argument"
    env = os.environ.get(DEVICE_MEMORY_ENV)
    if env:
        try:
            return int(_native.parse_memory_size(env)), DEVICE_MEMORY_ENV
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{DEVICE_MEMORY_ENV}={env!r}: {e}") from None
    if isinstance(dev, Devices):
        return min((device_budget(d) for d in dev), key=lambda b: b[0])
    if dev.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.8 * free), f"0.8 × the free memory of {dev}"
    b = memory_budget(None)
    return int(b.bytes), b.source
