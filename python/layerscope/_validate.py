"""Every argument of a public function checked once, at the door.

In the spirit of scikit-learn's ``validate_params``: a public function declares what each of
its parameters may be, and :func:`validated` checks and normalises them before the body
runs; nothing below it checks them again. A value outside what is allowed raises
:class:`~layerscope.errors.InvalidArgumentError` (a ``LayerscopeError`` and a ``ValueError``)
naming the function, the parameter, the value and what is allowed::

    @validated(seed=Int(0, 2**64 - 1), sample=(None, Int(1)), kernel=OneOf("linear", "rbf"))
    def cka(source, *, seed=0, sample=None, kernel="linear"): ...

Numbers: numpy scalars are accepted wherever Python numbers are (``np.float32(1.0)``,
``np.int64(5)``), and come out as ``int``/``float``; ``bool`` is never a number (``sample=True``
is refused, not taken as 1). Rules combine as a tuple (the first that accepts wins; ``None``
in the tuple accepts ``None``).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any, TypedDict, TypeVar

from ._defaults import BACKENDS
from .errors import InvalidArgumentError, UnknownArgumentError

F = TypeVar("F", bound=Callable[..., Any])


class _Refused(Exception):
    """A rule does not accept a value (internal: becomes InvalidArgumentError)."""


class Rule(ABC):
    """What one parameter may be: ``text`` says it in words; calling the rule returns the
    normalised value or raises :class:`_Refused`."""

    text = "?"

    @abstractmethod
    def __call__(self, value: Any) -> Any: ...


def _bound(lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


class Int(Rule):
    """An integer (Python or numpy, not bool) in ``[lo, hi]``; returns ``int``."""

    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.text = " ".join(x for x in ("an integer", _bound(lo, hi)) if x)

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise _Refused
        v = int(value)
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise _Refused
        return v


class Float(Rule):
    """A finite real number (Python or numpy, not bool) within the bounds; returns ``float``."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.text = " ".join(x for x in ("a finite number", _bound(lo, hi, lo_open, hi_open))
                             if x)

    def __call__(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise _Refused
        v = float(value)
        if not math.isfinite(v):
            raise _Refused
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise _Refused
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise _Refused
        return v


class OneOf(Rule):
    """One of the given strings."""

    def __init__(self, *values: str) -> None:
        self.values = values
        self.text = "one of " + ", ".join(repr(v) for v in values)

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise _Refused
        return value


class Bool(Rule):
    """``True`` or ``False`` (numpy bools too)."""

    text = "True or False"

    def __call__(self, value: Any) -> bool:
        if value is True or value is False or type(value).__name__ == "bool_":
            return bool(value)
        raise _Refused


class Progress(Rule):
    """A progress setting: ``True`` (a bar), ``False``, or a callable ``cb(done, total)``."""

    text = "True, False or a callable cb(done, total)"

    def __call__(self, value: Any) -> Any:
        if callable(value):
            return value
        return Bool()(value)


class Via(Rule):
    """Whatever the parser ``parse`` accepts (it raises InvalidArgumentError otherwise), as
    it returns it: e.g. a memory size or a dtype name with its aliases."""

    def __init__(self, parse: Callable[[Any], Any], text: str) -> None:
        self.parse, self.text = parse, text

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            raise _Refused
        try:
            return self.parse(value)
        except InvalidArgumentError:
            raise _Refused from None


def _size(value: Any) -> int:
    from ._memory import max_memory_bytes

    return int(max_memory_bytes(value))  # type: ignore[arg-type]


def _dtype(value: Any) -> str:
    from ._defaults import dtype_name

    return dtype_name(value)


#: A memory budget: bytes or a size string; returns bytes.
SIZE = Via(_size, "a number of bytes >= 1 or a size such as '4G' or '512MiB'")
#: A store dtype: float16, bfloat16, float32, float64, their aliases (bf16, half, ...), a
#: numpy or torch dtype; returns the canonical name.
DTYPE = Via(_dtype, "a store dtype: float16, bfloat16, float32 or float64 (or bf16, f16, "
                    "half, f32, float, f64, double, a numpy or torch dtype)")


class Text(Rule):
    """A string."""

    text = "a string"

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _Refused
        return value


class Texts(Rule):
    """A tuple or list of exactly ``n`` strings; returns a tuple."""

    def __init__(self, n: int) -> None:
        self.n, self.text = n, f"{n} strings"

    def __call__(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, (tuple, list)) or len(value) != self.n:
            raise _Refused
        return tuple(Text()(v) for v in value)


class Strings(Rule):
    """A string or an iterable of strings (a layer name or glob, or a list of them); returns
    a list."""

    def __init__(self, what: str = "a name", *, options: Sequence[str] | None = None) -> None:
        self.options = tuple(options) if options is not None else None
        each = f"one of {', '.join(repr(o) for o in self.options)}" if self.options else what
        self.text = f"{each} or a list of them"

    def __call__(self, value: Any) -> list[str]:
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
            raise _Refused
        else:
            items = list(value)
        if not items or not all(isinstance(x, str) for x in items):
            raise _Refused
        if self.options is not None and any(x not in self.options for x in items):
            raise _Refused
        return items


class Ints(Rule):
    """A non-empty sequence of integers each accepted by ``each``; returns a list."""

    def __init__(self, each: Int) -> None:
        self.each = each
        self.text = f"a list of {each.text.replace('an integer', 'integers')}"

    def __call__(self, value: Any) -> list[int]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise _Refused
        out = [self.each(v) for v in value]
        if not out:
            raise _Refused
        return out


class Device(Rule):
    """``"auto"``, a device name or a ``torch.device`` (checked in full, against what torch sees
    here, by :func:`layerscope._device.devices.resolve_device`)."""

    text = ("'auto', a torch device name ('cpu', 'cuda', 'cuda:1'), a torch.device, or "
            "several devices sharing the tiles (a list, or 'cuda:0,cuda:1')")

    def __call__(self, value: Any) -> Any:
        if self._one(value):
            return value
        if isinstance(value, (list, tuple)) and value and all(self._one(v) for v in value):
            return value
        raise _Refused

    @staticmethod
    def _one(value: Any) -> bool:
        return isinstance(value, str) or (type(value).__module__.startswith("torch")
                                          and type(value).__name__ == "device")


#: The rules every measure shares.
SEED = Int(0, 2**64 - 1)
LAYERS = (None, Strings("a layer name or glob"))
MAX_MEMORY = (None, SIZE)
PROGRESS = Progress()
BACKEND = OneOf(*BACKENDS)
RAY_ADDRESS = (None, Text())
DEVICE = (None, Device())


def cli_type(rule: Rule, parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse ``type=``: the option's text read with ``parse`` and checked by ``rule``
    (``--seed -1`` is argparse's one-line usage error, before any work starts)."""
    def convert(text: str) -> Any:
        try:
            return rule(parse(text))
        except (ValueError, _Refused):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule.text}") from None

    convert.__name__ = rule.text  # argparse names the type by it in some messages
    return convert


def _text(rules: tuple[Any, ...]) -> str:
    words = ["None" if r is None else r.text for r in rules]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check(where: str, name: str, value: Any, rules: Any) -> Any:
    """``value`` normalised by the first of ``rules`` (a rule, ``None``, or a tuple of them)
    that accepts it; :class:`InvalidArgumentError` naming ``where``, ``name``, the value and
    what is allowed when none does."""
    rules = rules if isinstance(rules, tuple) else (rules,)
    for rule in rules:
        if rule is None:
            if value is None:
                return None
            continue
        try:
            return rule(value)
        except _Refused:
            continue
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InvalidArgumentError(
        f"{where}: {name}={shown} ({type(value).__name__}) is not allowed; {name} must be "
        f"{_text(rules)}")


class Group:
    """The runtime half of a ``TypedDict`` of keyword options that several public functions
    share (``**run: Unpack[RunOptions]``): each option's rules and default, the annotation
    taken from the ``TypedDict`` (its one definition for type checkers). :func:`validated`
    shows the options as keyword-only parameters of the public signature, checks the given
    ones and passes every one, defaults filled in, to the function's ``**`` parameter."""

    def __init__(self, typed: type, *, relate: Callable[[dict[str, Any]], None] | None = None,
                 **options: tuple[Any, Any]) -> None:
        names = list(typed.__annotations__)
        if sorted(names) != sorted(options):
            raise TypeError(f"Group({typed.__name__}): options {sorted(options)} are not its "
                            f"keys {sorted(names)}")
        self.typed, self.relate = typed, relate
        self.options = dict(options)  # in the order of the public signature

    def extend(self, typed: type, **options: tuple[Any, Any]) -> Group:
        """The group of ``typed`` (a ``TypedDict`` deriving from this one's) with the rules
        and defaults of its own keys ``options`` (first in the signature)."""
        return Group(typed, relate=self.relate, **{**options, **self.options})

    def parameters(self) -> list[inspect.Parameter]:
        """The options as keyword-only parameters, in the order given."""
        out = []
        for name, (_, default) in self.options.items():
            ann = self.typed.__annotations__[name]
            ann = getattr(ann, "__forward_arg__", ann)
            out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                         annotation=ann))
        return out


class Placement(TypedDict, total=False):
    """Where and within what a measure runs: never what it computes (the numbers are the same
    whatever these are, to the rounding of the engine).

    * ``max_memory``: the memory budget, bytes or a size such as ``"4G"`` (default
      ``LAYERSCOPE_MAX_MEMORY``, else 0.8 × the machine's available memory; see
      :func:`layerscope.memory_budget`), checked against the plan before any row is read;
      with ``backend="ray"`` each node's budget.
    * ``backend``: ``"local"`` or ``"ray"`` (the work cut into tasks on a Ray cluster;
      ``meta["tasks"]`` records what ran).
    * ``ray_address``: the cluster to join when no Ray session is running (else the running
      one; else a local cluster is started).
    * ``device``: None (the Rust CPU engine), ``"auto"`` (CUDA when torch sees one, else
      Rust) or a torch device (``"cuda"``, ``"cuda:1"``, several sharing the tiles, or
      ``"cpu"``: the torch engine on the CPU): the products on that device under the same
      rules (:mod:`layerscope._device`), ``meta["device"]``.
    """

    max_memory: int | str | None
    backend: str
    ray_address: str | None
    device: Any


class RunOptions(Placement, total=False):
    """:class:`Placement` and ``progress``: ``True`` (a bar), ``False``, or a callable
    ``cb(done, total)``."""

    progress: Any


def check_backend(backend: str, ray_address: str | None) -> None:
    """``ray_address`` only with ``backend="ray"``."""
    if ray_address is not None and backend != "ray":
        raise InvalidArgumentError("ray_address needs backend='ray'")


def _ray_address(values: dict[str, Any]) -> None:
    check_backend(values["backend"], values["ray_address"])


#: The runtime rules and defaults of :class:`RunOptions` and :class:`Placement`.
RUN = Group(RunOptions, relate=_ray_address, progress=(PROGRESS, True),
            max_memory=(MAX_MEMORY, None), backend=(BACKEND, "local"),
            ray_address=(RAY_ADDRESS, None), device=(DEVICE, None))
PLACEMENT = Group(Placement, relate=_ray_address,
                  **{k: v for k, v in RUN.options.items() if k != "progress"})


def _unknown(where: str, names: list[str], takes: list[str]) -> UnknownArgumentError:
    hints = [f"{n!r} (closest: {', '.join(difflib.get_close_matches(n, takes, n=3)) or 'none'})"
             for n in names]
    return UnknownArgumentError(
        f"{where}: unknown keyword(s) {', '.join(hints)}; it takes {', '.join(takes)}")


def validated(_where: str | None = None, *, options: Group | None = None,
              **spec: Any) -> Callable[[F], F]:
    """Decorate a public function: before its body runs, every parameter named in ``spec``
    is checked (and normalised) by its rules, see :func:`check`; errors name the function as
    ``_where`` (default ``layerscope.<name>``). ``options``: the :class:`Group` of the
    function's ``**`` parameter, shown in the public signature (``__signature__``: what
    ``help()`` and ``inspect`` show) as keyword-only parameters, each checked by its rules and
    passed with its default when not given. A keyword the function does not take is an
    :class:`UnknownArgumentError` (a ``TypeError``) naming the closest it does take."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        defaults: dict[str, Any] = {}
        rules = dict(spec)
        if options is not None:
            if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
                raise TypeError(f"validated(options=...): {fn.__name__} has no ** parameter")
            params = params[:-1] + options.parameters()
            defaults = {n: d for n, (_, d) in options.options.items()}
            rules.update({n: r for n, (r, _) in options.options.items()})
        public = sig.replace(parameters=params)
        unknown = set(spec) - set(public.parameters)
        if unknown:  # a typo in a spec must fail at import, not pass silently
            raise TypeError(f"validated({sorted(unknown)}): not parameters of {fn.__name__}")
        where = _where or f"layerscope.{fn.__name__}"
        takes = [n for n, p in public.parameters.items()
                 if p.kind is not inspect.Parameter.VAR_KEYWORD]
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if not open_ended:
                bad = [k for k in kwargs if k not in public.parameters]
                if bad:
                    raise _unknown(where, bad, takes)
            bound = public.bind(*args, **kwargs)
            for name, rule in rules.items():
                if name in bound.arguments:
                    bound.arguments[name] = check(where, name, bound.arguments[name], rule)
            for name, default in defaults.items():
                bound.arguments.setdefault(name, default)
            if options is not None and options.relate is not None:
                options.relate(bound.arguments)
            return fn(*bound.args, **bound.kwargs)

        inner.__signature__ = public  # type: ignore[attr-defined]
        inner.__layerscope_rules__ = (where, rules)  # type: ignore[attr-defined]
        return inner  # type: ignore[return-value]

    return wrap


def check_options(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (keyword arguments meant for the :func:`validated` function ``fn``, to be
    passed later) checked and normalised by ``fn``'s own rules now, so that a caller that
    runs ``fn`` many times (``layerscope.batch``) refuses a bad value before any work."""
    where, spec = getattr(fn, "__layerscope_rules__", (fn.__name__, {}))
    return {name: check(where, name, v, spec[name]) if name in spec else v
            for name, v in options.items()}
