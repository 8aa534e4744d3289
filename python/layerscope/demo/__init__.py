"""``layerscope demo``: capture all-MiniLM-L6-v2 and a random control on the bundled corpus,
then write the report comparing them."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from .._commands import command
from .._progress import stage
from .._validate import SEED, Bool, Int, cli_type, validated
from ..report import report


@validated(texts=Int(1), max_length=Int(2), max_rows=Int(1), quick=Bool(), seed=SEED,
           sample=Int(1), bootstrap=Int(0), progress=Bool())
def demo(out: str | os.PathLike[str] = "layerscope-demo", *, texts: int = 400,
         max_length: int = 64, max_rows: int = 20000, quick: bool = False, seed: int = 0,
         sample: int = 2048, bootstrap: int = 20, progress: bool = True) -> Path:
    """Capture all-MiniLM-L6-v2 (real weights, CPU) and a control — the same architecture with
    seeded random weights — on the bundled text corpus (docstrings of Python's standard
    library), token rows of the embedding output and the six encoder layers stored as float16
    (at most ``max_rows`` rows), then write the report comparing the two. ``quick`` shrinks
    everything for tests. Returns the path of ``report.html``.
    """
    from .._optional import require
    from ..capture.hf import capture_texts
    from ..corpus import stdlib_corpus
    from ..models import load_minilm, minilm_random

    require("matplotlib", "the demo's report")  # before minutes of capture, not after
    if quick:
        texts, max_length, max_rows = min(texts, 24), min(max_length, 32), min(max_rows, 600)
        sample, bootstrap = min(sample, 300), min(bootstrap, 5)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(stdlib_corpus(texts))
    model, tokenizer = load_minilm()
    control = minilm_random(seed)
    stores = {}
    for tag, label, m in (("minilm", "MiniLM-L6 (trained)", model),
                          ("control", f"MiniLM-L6 (random init, seed {seed})", control)):
        meta = {"label": label, "model": "sentence-transformers/all-MiniLM-L6-v2"
                if tag == "minilm" else f"all-MiniLM-L6-v2 architecture, random weights "
                f"(seed {seed})", "corpus": f"{len(corpus)} Python stdlib docstrings",
                "max_length": max_length}
        stores[tag] = capture_texts(
            m, tokenizer, corpus, out / "stores" / tag, layers=["embeddings", "encoder.layer.*"],
            pool="tokens", dtype="float16", batch_size=16, max_length=max_length,
            max_rows=max_rows, metadata=meta, overwrite=True, progress=progress,
            desc=f"capture {tag}")
    t_capture = time.perf_counter() - t0
    path = report(stores["minilm"], stores["control"], out, sample=sample, bootstrap=bootstrap,
                  seed=seed, progress=progress, title="layerscope demo: MiniLM vs random control",
                  labels=("MiniLM", "random control"))
    stage(progress, "demo", f"capture {t_capture:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return path


def _cmd_demo(args: argparse.Namespace) -> int:
    """capture MiniLM and a random control, write the report

    Capture all-MiniLM-L6-v2 (real weights, CPU) and the same architecture with seeded random
    weights on the bundled text corpus, then write the report comparing them."""
    path = demo(args.out, texts=args.texts, quick=args.quick, progress=not args.quiet)
    print(f"report: {path.resolve()}")
    return 0


def add_cli(sub: Any) -> None:
    d = command(sub, "demo", _cmd_demo)
    d.add_argument("--out", default="layerscope-demo", help="output folder")
    d.add_argument("--texts", type=cli_type(Int(1)), default=400,
                   help="number of texts from the corpus")
    d.add_argument("--quick", action="store_true", help="tiny run (tests)")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress output")
