"""How a package declares a ``layerscope`` command: :func:`command` makes the subcommand whose
help is the docstring of the function it runs, the one place a command is described."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any


def command(sub: Any, name: str, run: Callable[[argparse.Namespace], int],
            **kwargs: Any) -> argparse.ArgumentParser:
    """The subcommand ``name`` of the ``layerscope`` parser (``sub``: its subparsers), which
    runs ``run(args)``. The first paragraph of ``run``'s docstring is its line in
    ``layerscope --help``; the rest is what ``layerscope NAME --help`` says of it (the first
    paragraph again where there is no more). ``kwargs`` go to ``add_parser``."""
    doc = inspect.cleandoc(run.__doc__ or "")
    head, _, rest = doc.partition("\n\n")
    short = " ".join(head.split())
    p = sub.add_parser(name, help=short, description=" ".join(rest.split()) or short,
                       **kwargs)
    p.set_defaults(func=run)
    return p  # type: ignore[no-any-return]
