"""The one Hugging Face text driver, shared by ``layerscope capture`` and the demo: load a
model stored on this machine (offline) and run it over a list of texts in padded batches
under ``torch.inference_mode`` inside :func:`layerscope.capture`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .._optional import require
from .._progress import Progress
from ..errors import CaptureError, InvalidArgumentError

# The name ``--model`` accepts for the all-MiniLM-L6-v2 weights bundled by the ``torch`` extra.
BUNDLED = "minilm"
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def model_folder(model: str | os.PathLike[str]) -> str:
    """The folder of a model stored on this machine: ``model`` itself when it is a folder
    with a ``config.json``, the bundled all-MiniLM-L6-v2 for ``"minilm"``; otherwise a
    :class:`CaptureError` saying what is wrong (checked before anything heavy is imported)."""
    path = os.fspath(model)
    if path == BUNDLED and not os.path.exists(path):
        from ..models import minilm_path

        return minilm_path()
    if not os.path.exists(path):
        raise CaptureError(
            f"model {path!r} is not a folder on this machine; layerscope runs models offline "
            "and never downloads one (a hub name such as 'bert-base-uncased' needs "
            "save_pretrained(FOLDER) on a machine with network first). Give the folder of a "
            f"saved model, or {BUNDLED!r} for the bundled all-MiniLM-L6-v2")
    if not os.path.isdir(path):
        raise CaptureError(f"model {path!r} is a file, not a model folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CaptureError(
            f"{path!r} has no config.json: not a Hugging Face model folder (write one with "
            "model.save_pretrained(FOLDER) and tokenizer.save_pretrained(FOLDER))")
    return path


def load_local(model: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(AutoModel, AutoTokenizer)`` from a local folder (see :func:`model_folder`), in eval
    mode, never downloading (``HF_HUB_OFFLINE=1`` unless the caller set it)."""
    path = model_folder(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    require("torch", "running a model")
    transformers = require("transformers", "loading a Hugging Face model")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CaptureError(f"{path!r}: no usable tokenizer ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); save one there with "
                           "tokenizer.save_pretrained(FOLDER)") from e
    try:
        net = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CaptureError(f"{path!r}: the model does not load ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return net, tok


def capture_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], out: str | os.PathLike[str], *,
    layers: Any, pool: str = "tokens", dtype: str = "float16", batch_size: int = 32,
    max_length: int = 128, max_rows: int | None = None,
    metadata: dict[str, Any] | None = None, overwrite: bool = False, progress: Any = True,
    desc: str = "capture", shard_bytes: int | None = None,
) -> Any:
    """Capture ``layers`` of ``model`` over ``texts`` (batches of ``batch_size``, padded and
    truncated to ``max_length`` tokens) into the store at ``out`` (shards of ``shard_bytes``;
    None: the capture's default); stops at ``max_rows`` rows. Returns the store (None when
    nothing was captured)."""
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
                metadata=metadata, overwrite=overwrite, shard_bytes=shard_bytes) as cap,
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
