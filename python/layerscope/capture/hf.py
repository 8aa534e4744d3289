"""The one Hugging Face text driver, shared by ``layerscope capture`` and the demo: load a
model stored on this machine (offline) and run it over a list of texts in padded batches
under ``torch.inference_mode`` inside :func:`layerscope.capture`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .._progress import Progress
from ..errors import InvalidArgumentError


def load_local(model: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(AutoModel, AutoTokenizer)`` from a local folder, in eval mode, never downloading
    (``HF_HUB_OFFLINE=1`` unless the caller set it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    net = AutoModel.from_pretrained(model, local_files_only=True).eval()
    return net, tok


def capture_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], out: str | os.PathLike[str], *,
    layers: Any, pool: str = "tokens", dtype: str = "float16", batch_size: int = 32,
    max_length: int = 128, max_rows: int | None = None,
    metadata: dict[str, Any] | None = None, overwrite: bool = False, progress: Any = True,
    desc: str = "capture",
) -> Any:
    """Capture ``layers`` of ``model`` over ``texts`` (batches of ``batch_size``, padded and
    truncated to ``max_length`` tokens) into the store at ``out``; stops at ``max_rows``
    rows. Returns the store (None when nothing was captured)."""
    import torch

    from . import capture

    if not texts:
        raise InvalidArgumentError("no texts to capture")
    bs = int(batch_size)
    if bs < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size!r}")
    with (
        torch.inference_mode(),
        capture(model, layers=layers, out=out, pool=pool, dtype=dtype, max_rows=max_rows,
                metadata=metadata, overwrite=overwrite) as cap,
        Progress(progress, desc, unit="text") as prog,
    ):
        for i in range(0, len(texts), bs):
            chunk = list(texts[i:i + bs])
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            model(**enc)
            if prog.cb is not None:
                prog.cb(i + len(chunk), len(texts))
            if max_rows is not None and cap.rows_queued >= max_rows:
                break  # the row cap is reached: the remaining texts are not run
    return cap.store
