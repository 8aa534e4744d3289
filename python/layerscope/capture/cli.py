"""``layerscope capture``: a local Hugging Face model over texts, into a store."""

from __future__ import annotations

import argparse
from typing import Any

from .._commands import command
from .._validate import Int, cli_type
from ..errors import InvalidArgumentError
from .hf import BUNDLED, BUNDLED_NAME
from .hooks import DTYPES, refuse_existing
from .pooling import POOLS_SEQ

#: The capture command's shard size (MiB): small, so that a full disk or a kill loses at most
#: one small shard of rows (the Python API's default is 256 MiB: fewer, larger files).
CLI_SHARD_MB = 16


def _cli_capture(args: argparse.Namespace) -> int:
    """capture activations of a local Hugging Face model

    Run a locally stored Hugging Face model (AutoModel + AutoTokenizer, offline) over texts
    and store the chosen layers."""
    from .hf import capture_texts, load_local, model_folder

    # everything that can be checked is checked before the model loads (seconds to minutes)
    refuse_existing(args.out, args.overwrite)
    model_folder(args.model)
    if args.texts:
        with open(args.texts, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    elif args.stdlib_corpus:
        from ..corpus import stdlib_corpus

        texts = stdlib_corpus(args.stdlib_corpus)
    else:
        raise InvalidArgumentError("give --texts FILE or --stdlib-corpus N")
    if not texts:
        raise InvalidArgumentError("no texts to capture")
    model, tok = load_local(args.model)
    st = capture_texts(
        model, tok, texts, args.out, layers=args.layers, pool=args.pool, dtype=args.dtype,
        batch_size=args.batch_size, max_length=args.max_length, max_rows=args.max_rows,
        overwrite=args.overwrite, shard_bytes=int(args.shard_mb) << 20,
        metadata={"model": BUNDLED_NAME if args.model == BUNDLED else args.model,
                  "texts": args.texts or f"stdlib_corpus({args.stdlib_corpus})",
                  "max_length": args.max_length, "batch_size": int(args.batch_size)})
    if st is None:
        print("nothing captured")
        return 1
    print(f"wrote {st.num_rows} rows x {len(st.layers)} layers to {args.out}")
    return 0


def add_cli(sub: Any) -> None:
    p = command(sub, "capture", _cli_capture)
    p.add_argument("--model", required=True,
                   help="folder of a saved Hugging Face model (AutoModel + AutoTokenizer), or "
                   f"{BUNDLED!r} for the bundled all-MiniLM-L6-v2")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="text file, one text per line")
    src.add_argument(
        "--stdlib-corpus",
        type=int,
        metavar="N",
        help="use N texts built from the Python standard library's docstrings",
    )
    p.add_argument(
        "--layers",
        action="append",
        required=True,
        metavar="PATTERN",
        help="module name or dotted glob (repeatable), e.g. 'encoder.layer.*'",
    )
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--pool", default="tokens", choices=POOLS_SEQ,
                   help="rows per text: every token (padding left out), one pooled row (mean, last, first token), or none (every position, padding included)")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="stored dtype")
    p.add_argument("--batch-size", type=cli_type(Int(1)), default=32, help="texts per forward")
    p.add_argument("--max-length", type=cli_type(Int(1)), default=128,
                   help="tokens per text (longer texts are truncated)")
    p.add_argument("--max-rows", type=cli_type(Int(1)), default=None,
                   help="stop after this many rows (default: all texts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--shard-mb", type=cli_type(Int(1)), default=CLI_SHARD_MB, metavar="MB",
                   help=f"shard size in MiB (default {CLI_SHARD_MB}: a full disk or a kill "
                   "loses at most the rows of one shard)")
