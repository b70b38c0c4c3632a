"""Hugging Face integration: load and save tbt models through transformers.

``load_pretrained(path)`` is the one call that loads any tbt checkpoint (full precision or
fake-quantized) with its tokenizer; it calls :func:`register` first, which registers the
``"tbt"`` quantization method (:mod:`tbt.quant.hf_quantizer`) with transformers.
"""

from __future__ import annotations

import os
from typing import Any


def register() -> None:
    """Register tbt's quantizer and attention function with transformers (idempotent)."""
    from tbt.models import register as register_models
    from tbt.quant.attention import register_attention
    from tbt.quant.hf_quantizer import register_hf_quantizer

    register_hf_quantizer()
    register_attention()
    register_models()  # tbt's own architectures (the MatMul-free LM) for the Auto classes


def _auto_class(config: Any):
    import transformers

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def load_pretrained(path: str | os.PathLike, device: str | None = None, dtype: Any = None,
                    with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory (or hub name when a hub is reachable).

    Seq2seq configs load with ``AutoModelForSeq2SeqLM``, others with ``AutoModelForCausalLM``.
    ``tokenizer`` is ``None`` when the directory has none (or ``with_tokenizer=False``).
    """
    import transformers

    register()
    path = os.fspath(path)
    if os.path.sep in path or path.startswith("."):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path!r} has no config.json: pass a directory written by save_pretrained / tbt train"
            )
    config = transformers.AutoConfig.from_pretrained(path)
    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    model = _auto_class(config).from_pretrained(path, **kw)
    if device is not None:
        model.to(device)
    tok = None
    if with_tokenizer:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            tok = None
    return model, tok
