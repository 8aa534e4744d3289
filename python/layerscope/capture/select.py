"""Which modules and which tensors a capture takes: module names and dotted-path globs
(:func:`resolve_layers`, the rules of :mod:`layerscope._layers`) and the tensor picked from a module's output or input
(:func:`select_tensor`)."""

from __future__ import annotations

from typing import Any

from .._layers import match_layers
from ..errors import CaptureError


def base_module(model: Any) -> Any:
    """The module whose submodules are hooked (``torch.compile`` wraps it in ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def resolve_layers(model: Any, layers: Any) -> list[str]:
    """Names of the selected modules, in the order of ``model.named_modules()``.

    ``layers`` is a module name, a dotted glob pattern (``*`` stays within a path segment,
    ``**`` crosses segments: ``"encoder.layer.*"`` selects the six blocks of MiniLM, not their
    children), a list of those, or a callable ``(name, module) -> bool``. A name or pattern
    that matches nothing raises :class:`CaptureError` listing the closest module names.
    """
    base = base_module(model)
    named = [(n, m) for n, m in base.named_modules() if n != ""]
    names = [n for n, _ in named]
    if callable(layers) and not isinstance(layers, str):
        selected = {n for n, m in named if layers(n, m)}
        if not selected:
            raise CaptureError(f"the layer selector selected no module of {type(base).__name__}")
    else:
        pats = [layers] if isinstance(layers, str) else list(layers)
        if not pats:
            raise CaptureError("no layers given")
        for pat in pats:
            if not isinstance(pat, str):
                raise CaptureError(f"layer patterns must be strings, got {type(pat).__name__}")
        selected = set(match_layers(pats, names, error=CaptureError,
                                    where=f"the modules of {type(base).__name__}"))
    return [n for n in names if n in selected]


def select_tensor(obj: Any, output: Any, name: str, where: str) -> Any:
    """Pick the tensor to capture from a module output (or ``(args, kwargs)`` for inputs)."""
    import torch
    if where == "input":
        args, kwargs = obj
        if output is None:
            for a in args:
                if isinstance(a, torch.Tensor):
                    return a
            for a in kwargs.values():
                if isinstance(a, torch.Tensor):
                    return a
            raise CaptureError(f"layer {name!r}: no tensor among the module's inputs")
        if callable(output):
            t = output(args, kwargs)
        elif isinstance(output, int):
            if output >= len(args):
                raise CaptureError(
                    f"layer {name!r}: input index {output} out of range "
                    f"({len(args)} positional inputs)"
                )
            t = args[output]
        else:
            if output not in kwargs:
                raise CaptureError(
                    f"layer {name!r}: no keyword input {output!r}; keywords: {sorted(kwargs)}"
                )
            t = kwargs[output]
    else:
        if output is None:
            t = obj
            if isinstance(t, (tuple, list)):
                if not t:
                    raise CaptureError(f"layer {name!r}: the module returned an empty sequence")
                t = t[0]
            elif isinstance(t, dict):  # includes transformers ModelOutput
                if "last_hidden_state" in t:
                    t = t["last_hidden_state"]
                elif t:
                    t = next(iter(t.values()))
        elif callable(output):
            t = output(obj)
        elif isinstance(output, int):
            try:
                t = obj[output]
            except (IndexError, KeyError, TypeError) as e:
                raise CaptureError(
                    f"layer {name!r}: cannot take element {output} of a {type(obj).__name__}: {e}"
                ) from None
        else:
            if isinstance(obj, dict) and output in obj:
                t = obj[output]
            elif hasattr(obj, output):
                t = getattr(obj, output)
            else:
                raise CaptureError(
                    f"layer {name!r}: the {type(obj).__name__} output has no key {output!r}"
                )
    if not isinstance(t, torch.Tensor):
        raise CaptureError(
            f"layer {name!r}: the selected {where} is a {type(t).__name__}, not a tensor "
            "(use output= to pick an element: an index, a key or a callable)"
        )
    return t
