"""The ``layerscope`` command line. Each package declares its commands (an
``add_cli(subparsers)`` function beside the API it mirrors); this module only collects them
and turns every expected failure into one ``layerscope: error: ...`` line (exit status 2)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ._text import escape
from .capture.cli import add_cli as _capture
from .demo import add_cli as _demo
from .dumps import add_cli as _convert
from .errors import LayerscopeError
from .measures.cli import add_cli as _measures
from .planner import add_cli as _planner
from .report.cli import add_cli as _report
from .runs import add_cli as _batch
from .store import add_cli as _store

# The packages' commands, in the order they appear in --help.
_COMMANDS = (_store, _capture, _convert, _measures, _planner, _report, _batch, _demo)

# Exit statuses: a usage or input error (argparse's own status), Ctrl-C, a closed pipe.
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PIPE = 2, 130, 141


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None,
    flags) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or "default" in text or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layerscope",
        description="Activation statistics: streamed CKA, subspace alignment, spectra, intrinsic dimension.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def _message(e: BaseException) -> str:
    """One line (or the lines a message is made of) for an expected failure; an OS error
    names its file first, as the shell tools do."""
    if isinstance(e, OSError) and not isinstance(e, LayerscopeError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where else e.strerror
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        rc = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("layerscope: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`layerscope info STORE | head`): stop quietly, and point
        # stdout at /dev/null so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except (LayerscopeError, OSError) as e:
        print(f"layerscope: error: {escape(_message(e), keep_newlines=True)}", file=sys.stderr)
        return EXIT_ERROR
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
