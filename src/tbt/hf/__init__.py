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


CODE_FILES = ("config.json", "tokenizer_config.json")  # where transformers looks for auto_map


def refuse_custom_code(path: str | os.PathLike, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` (one line) if the local folder ``path`` asks to run its own Python code.

    A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` points transformers at
    modules shipped in the folder; without ``trust_remote_code`` transformers either asks
    "run the custom code? [y/N]" on stdin or quietly uses its built-in class instead. tbt does
    neither: it refuses the folder before transformers reads it, and passes
    ``trust_remote_code=False`` to every ``from_pretrained``. A hub name (not a directory) is
    left to that flag.
    """
    import json

    d = os.fspath(path)
    if not os.path.isdir(d):
        return
    for name in CODE_FILES:
        f = os.path.join(d, name)
        try:
            with open(f, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader reports it
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if auto_map:
            what = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise error(f"{f} has an auto_map ({what}): it asks to run Python code shipped with "
                        f"the model, which tbt never does; remove the auto_map entry to load "
                        f"it with transformers' built-in classes, if its model_type has them")


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` that never runs the folder's code
    (:func:`refuse_custom_code`, ``trust_remote_code=False``)."""
    import transformers

    refuse_custom_code(path)
    return transformers.AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=False)


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
    Never runs code from the folder: one with an ``auto_map`` is a ``ValueError``
    (:func:`refuse_custom_code`).
    """
    import transformers

    from tbt._paths import is_path_like

    register()
    path = os.fspath(path)
    if is_path_like(path) or os.path.sep in path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        if os.path.isfile(os.path.join(path, "tbt_packed.safetensors")):
            raise ValueError(f"{path!r} is a packed checkpoint (tbt export): load it with "
                             "tbt.export.io.load_packed")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path!r} has no config.json: pass a directory written by save_pretrained / tbt train"
            )
    refuse_custom_code(path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    kw: dict[str, Any] = {"trust_remote_code": False}
    if dtype is not None:
        kw["dtype"] = dtype
    model = _auto_class(config).from_pretrained(path, **kw)
    if device is not None:
        model.to(device)
    tok = None
    if with_tokenizer:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            tok = None
    return model, tok
