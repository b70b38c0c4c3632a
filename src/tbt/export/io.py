"""Save and load packed checkpoints (``save_packed`` / ``load_packed``).

A packed checkpoint is a directory:

* ``config.json`` (and ``generation_config.json`` when the model has one): the Hugging Face
  config, written by ``model.config.save_pretrained``; it rebuilds the architecture.
* ``tbt_packed.safetensors``: every tensor of the converted model's state dict (packed ``uint8``
  codes ``<layer>.packed``, float32 per-row scales ``<layer>.scale``, the activation quantizers'
  α values and flags, biases, LayerNorms, positional embeddings, the FP LM head, ...). A tensor
  shared by several modules (BART's three token embeddings) is stored once; the others are
  listed in ``tbt.aliases``. The metadata (``str → str``) holds:

  - ``tbt.format.*``: the :class:`~tbt.export.format.FormatHeader` (validated on load);
  - ``tbt.quant_config``: the :class:`~tbt.QuantConfig` as JSON;
  - ``tbt.layers``: JSON ``{layer: {"kind": "linear"|"embedding", "packing", "bits",
    "shape": [N, K], "packed": tensor name, "scale": tensor name}}``;
  - ``tbt.aliases``: JSON ``{alias tensor name: stored tensor name}``;
  - ``tbt.model_class``: the transformers class name (``BartForConditionalGeneration``).

``load_packed`` builds the architecture from ``config.json`` with transformers, runs
:func:`~tbt.quant.surgery.quantize_model` with the saved ``QuantConfig``, converts it with
:func:`~tbt.export.convert.convert_model` and loads the tensors (strict). The directory is
written to a temporary sibling first and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tbt.export.convert import PackedEmbedding, PackedLinear, convert_model
from tbt.export.format import FormatError, FormatHeader, Packing

__all__ = ["WEIGHTS_NAME", "save_packed", "load_packed", "read_packed_metadata", "layer_table"]

WEIGHTS_NAME = "tbt_packed.safetensors"


def _quant_config(model: nn.Module):
    from tbt.config import QuantConfig

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        raise ValueError("model has no config.quantization_config: run quantize_model first")
    if hasattr(qc, "to_quant_config"):
        return qc.to_quant_config()
    return QuantConfig.from_dict(dict(qc))


def layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {kind, packing, bits, shape, packed, scale}}`` of a converted model."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (PackedLinear, PackedEmbedding)):
            kind = "linear" if isinstance(mod, PackedLinear) else "embedding"
            n = mod.out_features if kind == "linear" else mod.num_embeddings
            out[name] = {"kind": kind, "packing": mod.packing.value, "bits": mod.bits,
                         "shape": [int(n), int(mod.k)], "packed": f"{name}.packed",
                         "scale": f"{name}.scale"}
    return out


def save_packed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (fake-quantized or already converted) as a packed checkpoint.

    A fake-quantized model is converted on a copy; ``model`` itself is not modified.
    Returns the directory path.
    """
    from safetensors.torch import save_file

    if not any(isinstance(m, (PackedLinear, PackedEmbedding)) for m in model.modules()):
        import copy

        model = convert_model(copy.deepcopy(model))
    qcfg = _quant_config(model)
    layers = layer_table(model)

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype, t.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.cpu().contiguous()
    for info in layers.values():  # point the layer table at the stored copies
        info["packed"] = aliases.get(info["packed"], info["packed"])
        info["scale"] = aliases.get(info["scale"], info["scale"])

    metadata = FormatHeader().to_metadata()
    metadata.update({
        "tbt.quant_config": qcfg.to_json(),
        "tbt.layers": json.dumps(layers, sort_keys=True),
        "tbt.aliases": json.dumps(aliases, sort_keys=True),
        "tbt.model_class": type(model).__name__,
    })

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_packed_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of a packed checkpoint: ``header``, ``quant_config``, ``layers``,
    ``aliases``, ``model_class``, and ``tensors`` (name → (dtype, shape, nbytes)).

    Raises :class:`FormatError` on a bad header or a layer whose tensors do not fit its packing.
    """
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tbt packed checkpoint")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        header = FormatHeader.from_metadata(md)
        tensors = {}
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            dtype = sl.get_dtype()
            tensors[k] = (dtype, shape)
    try:
        layers = json.loads(md["tbt.layers"])
        aliases = json.loads(md.get("tbt.aliases", "{}"))
        quant_config = md["tbt.quant_config"]
    except (KeyError, json.JSONDecodeError) as e:
        raise FormatError(f"packed checkpoint metadata lacks or garbles {e}") from e
    for name, info in layers.items():
        try:
            packing = Packing(info["packing"])
        except ValueError as e:
            raise FormatError(f"layer {name}: unknown packing {info['packing']!r}") from e
        n, k = info["shape"]
        for key, want in ((info["packed"], ("U8", (n, packing.row_bytes(k)))),
                          (info["scale"], (None, (n,)))):
            got = tensors.get(key)
            if got is None:
                raise FormatError(f"layer {name}: tensor {key} missing")
            if got[1] != want[1] or (want[0] is not None and got[0] != want[0]):
                raise FormatError(f"layer {name}: {key} is {got[0]} {list(got[1])}, expected "
                                  f"{want[0] or 'float'} {list(want[1])} for {packing.value}")
    return {"header": header, "quant_config": quant_config, "layers": layers,
            "aliases": aliases, "model_class": md.get("tbt.model_class"),
            "tensors": tensors, "path": path}


def load_packed(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model (eval mode) from a :func:`save_packed` directory."""
    import transformers as tf
    from safetensors.torch import load_file

    from tbt.config import QuantConfig
    from tbt.quant.surgery import quantize_model

    directory = Path(directory)
    meta = read_packed_metadata(directory)
    qcfg = QuantConfig.from_json(meta["quant_config"])
    from tbt.models import register as register_models

    register_models()  # tbt's own architectures (the MatMul-free LM) for AutoConfig
    config = tf.AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quantize_model sets it again
    cls = getattr(tf, meta["model_class"] or "", None)
    if cls is None:
        auto = (tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
                else tf.AutoModelForCausalLM)
        model = auto.from_config(config)
    else:
        model = cls(config)
    quantize_model(model, qcfg)
    convert_model(model)
    state = load_file(str(meta["path"]))
    for alias, stored in meta["aliases"].items():
        state[alias] = state[stored]
    model.load_state_dict(state, strict=True)
    if (directory / "generation_config.json").is_file():
        model.generation_config = tf.GenerationConfig.from_pretrained(directory)
    # modules sharing packed tensors share them again after loading (BART's three embeddings)
    return model.to(device).eval()
