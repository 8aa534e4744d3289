"""A small real English text corpus built at run time from the docstrings of Python's
standard library (every install has it; no network, no files shipped)."""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

from .errors import InvalidArgumentError

__all__ = ["stdlib_corpus", "STDLIB_MODULES"]

#: Pure-Python standard-library modules with prose docstrings, imported in this order.
STDLIB_MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email.message",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookies",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
    "zipimport",
)

_PROSE = re.compile(r"^[A-Z][A-Za-z ,;:'()\-\"/.0-9?!]*[.!?]$")


def _docstrings(modname: str) -> list[object]:
    docs: list[object] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            return docs
        docs.append(mod.__doc__)
        for _, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                docs.append(obj.__doc__)
                for _, meth in sorted(vars(obj).items()):
                    if inspect.isfunction(meth):
                        docs.append(meth.__doc__)
            elif inspect.isfunction(obj):
                docs.append(obj.__doc__)
    return docs


def _paragraphs(doc: str, min_chars: int, max_chars: int):
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        if not text or len(text) < min_chars:
            continue
        if len(text) > max_chars:  # pack whole sentences up to max_chars
            cur = ""
            for sent in re.split(r"(?<=[.!?])\s+", text):
                if cur and len(cur) + 1 + len(sent) > max_chars:
                    if len(cur) >= min_chars:
                        yield cur
                    cur = ""
                cur = f"{cur} {sent}".strip()
            if min_chars <= len(cur) <= max_chars:
                yield cur
        else:
            yield text


def _is_prose(text: str) -> bool:
    if not _PROSE.match(text) or ">>>" in text or "::" in text:
        return False
    words = text.split()
    if len(words) < 5:
        return False
    alpha = sum(c.isalpha() or c == " " for c in text)
    return alpha / len(text) > 0.85 and sum(w.isalpha() for w in words) / len(words) > 0.6


def stdlib_corpus(
    n: int | None = None, min_chars: int = 40, max_chars: int = 300, seed: int | None = 0
) -> list[str]:
    """English paragraphs from standard-library docstrings.

    Paragraphs are whitespace-normalised, kept when they look like prose (start with a capital,
    end with a full stop, mostly letters, no doctest or reST markup), split at sentence ends
    when longer than ``max_chars``, and deduplicated in first-seen order. With ``seed`` not
    None the list is shuffled by ``random.Random(seed)`` (deterministic); ``n`` takes the first
    ``n``. The content depends on the Python version (its docstrings), not on the machine.
    """
    if min_chars < 1 or max_chars < min_chars:
        raise InvalidArgumentError("need 1 <= min_chars <= max_chars")
    seen: set[str] = set()
    out: list[str] = []
    for modname in STDLIB_MODULES:
        for doc in _docstrings(modname):
            if not isinstance(doc, str):
                continue
            for text in _paragraphs(doc, min_chars, max_chars):
                if text not in seen and _is_prose(text):
                    seen.add(text)
                    out.append(text)
    if not out:
        raise InvalidArgumentError("no docstrings found (is Python running with -OO?)")
    if seed is not None:
        random.Random(seed).shuffle(out)
    if n is not None:
        if n < 0:
            raise InvalidArgumentError(f"n must be >= 0, got {n}")
        if n > len(out):
            raise InvalidArgumentError(
                f"the standard-library corpus has {len(out)} texts with these settings, "
                f"{n} requested"
            )
        out = out[:n]
    return out
