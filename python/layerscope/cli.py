"""The ``layerscope`` command line. Each subcommand lives beside the API it mirrors; this
module only collects them (``add_cli(subparsers)`` functions)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order they appear in --help.
_COMMAND_MODULES = [
    "layerscope.store",
    "layerscope.capture",
    "layerscope.cka",
    "layerscope.alignment",
    "layerscope.idim",
    "layerscope.planner",
    "layerscope.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerscope",
        description="Activation statistics: streamed CKA, subspace alignment, spectra, intrinsic dimension.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:  # an optional module whose dependency is missing
            if e.name and e.name.startswith("layerscope"):
                continue
            raise
        add = getattr(mod, "add_cli", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import LayerscopeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except LayerscopeError as e:
        print(f"layerscope: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("layerscope: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
