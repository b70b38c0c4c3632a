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
    "shape": [N, K], "packed": tensor name, "scale": tensor name}}``, plus ``"group_size"``
    when the scale is per group (``(N, K/g)``) and ``"offset"`` (a tensor name, DLT's shift
    shaped like the scale) when the weight is ``α·code + γ``;
  - ``tbt.aliases``: JSON ``{alias tensor name: stored tensor name}``;
  - ``tbt.model_class``: the transformers class name (``BartForConditionalGeneration``);
  - ``tbt.lm_head``: JSON ``{"name", "format": "fp"|"int8"|"packed"}`` (+ ``"shape"``,
    ``"weight"``, ``"scale"`` tensor names for int8; :mod:`tbt.export.lm_head`). ``"packed"``:
    the head was quantized in training (``QuantConfig.skip_modules`` without it) and is a
    packed linear entry of ``tbt.layers``; tied to the token embedding, it shares its codes.
  - ``tbt.tensor_sha256``, ``tbt.file_sha256``, ``tbt.checksum``: sha256 of every stored
    tensor's bytes, of ``config.json``/``generation_config.json``, and of the header
    (:mod:`tbt.export.integrity`; ``docs/format.md`` §8).

Each linear entry of ``tbt.layers`` also records its activation quantizer under ``"act"``
(:class:`~tbt.runtime.linear.ActSpec` fields; the learned α as the tensor name
``"alpha_tensor"``; ``null`` for float activations), so the torch-free runtime can run a layer
without rebuilding the model.

``load_packed`` builds the architecture from ``config.json`` with transformers (without
initialising its weights), runs :func:`~tbt.quant.surgery.quantize_model` with the saved
``QuantConfig``, turns it into empty packed modules (``convert_model(skeleton=True)``), loads
the tensors (strict) and picks the backend (:func:`~tbt.inference.packed.set_backend`), after
checking every checksum and the scales' values; it never runs code from the directory (an
``auto_map`` is refused, ``tbt.model_class`` must name a transformers model class). The
directory is written to a temporary sibling first and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tbt.export.convert import convert_model
from tbt.export.format import WEIGHTS_NAME, FormatError, FormatHeader, Packing, weights_path
from tbt.export.integrity import (
    CHECKSUM_KEY,
    FILE_DIGESTS_KEY,
    TENSOR_DIGESTS_KEY,
    array_digest,
    check_layer_values,
    file_digests,
    header_checksum,
    read_digests,
    verify_array,
    verify_files,
    verify_header,
    warn_unverified,
)
from tbt.export.lm_head import LM_HEAD_FORMATS, Int8Linear, output_embedding_name
from tbt.inference.packed import PackedEmbedding, PackedLinear, act_spec_of, set_backend

__all__ = ["WEIGHTS_NAME", "save_packed", "load_packed", "read_packed_metadata", "layer_table"]

logger = logging.getLogger(__name__)


def _quant_config(model: nn.Module):
    from tbt.config import QuantConfig
    from tbt.export.ptq_layers import SchemeLinear

    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None and any(isinstance(m, SchemeLinear) for m in model.modules()):
        # packed PTQ layers only: nothing for quantize_model to rebuild (docs/format.md §9)
        return QuantConfig(bits="fp-fp-fp", quantize_attention=False)
    if qc is None:
        raise ValueError("model has no config.quantization_config: run quantize_model first")
    if hasattr(qc, "to_quant_config"):
        return qc.to_quant_config()
    return QuantConfig.from_dict(dict(qc))


def _act_entry(name: str, mod: PackedLinear) -> dict[str, Any] | None:
    try:
        spec = act_spec_of(mod.act_quant)
    except KeyError:  # a quantizer the runtime does not know: recorded by class name
        return {"kind": type(mod.act_quant).__name__}
    if spec is None:
        return None
    entry = spec.to_dict()
    if entry.pop("alpha", None) is not None:
        entry["alpha_tensor"] = f"{name}.act_quant.alpha"
    return entry


def layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {kind, packing, bits, shape, packed, scale[, act]}}`` of a converted model."""
    from tbt.export.ptq_layers import SchemeLinear

    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SchemeLinear):  # a packed PTQ layer (docs/format.md §9)
            out[name] = mod.layer_entry(name)
        elif isinstance(mod, (PackedLinear, PackedEmbedding)):
            kind = "linear" if isinstance(mod, PackedLinear) else "embedding"
            n = mod.out_features if kind == "linear" else mod.num_embeddings
            out[name] = {"kind": kind, "packing": mod.packing.value, "bits": mod.bits,
                         "shape": [int(n), int(mod.k)], "packed": f"{name}.packed",
                         "scale": f"{name}.scale"}
            if mod.scale.dim() == 2:  # per-group scales (N, K/g): tbt.quant.granularity
                out[name]["group_size"] = int(mod.k) // int(mod.scale.shape[1])
            if mod.offset is not None:  # DLT's shift, same shape as the scale
                out[name]["offset"] = f"{name}.offset"
            if kind == "linear":
                out[name]["act"] = _act_entry(name, mod)
    return out


def _lm_head_entry(model: nn.Module) -> dict[str, Any]:
    name = output_embedding_name(model)
    head = model.get_submodule(name) if name else None
    if isinstance(head, Int8Linear):
        return {"name": name, "format": "int8", "shape": [head.out_features, head.in_features],
                "weight": f"{name}.weight_int8", "scale": f"{name}.scale"}
    if isinstance(head, PackedLinear):  # quantized in training: an entry of tbt.layers
        return {"name": name, "format": "packed"}
    return {"name": name, "format": "fp"}


def _quantize_lm_head(model: nn.Module) -> None:
    name = output_embedding_name(model)
    head = model.get_submodule(name) if name else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"lm_head='int8' needs an nn.Linear output projection; "
                         f"{type(model).__name__} has {type(head).__name__}")
    model.set_submodule(name, Int8Linear.from_float(head))


LM_HEAD_READ_FORMATS = (*LM_HEAD_FORMATS, "packed")  # "packed": a layer of tbt.layers
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16",
              torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def _checksum(metadata: dict[str, str], index: dict[str, tuple[str, tuple]]) -> str:
    """The header checksum (:func:`tbt.export.integrity.header_checksum`)."""
    return header_checksum(metadata, index)


def _tensor_bytes(t: torch.Tensor):
    """A tensor's bytes as safetensors stores them (C order), as a uint8 numpy view."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def save_packed(model: nn.Module, directory: str | os.PathLike, lm_head: str = "fp", *,
                overwrite: bool = False) -> Path:
    """Write ``model`` (fake-quantized or already converted) as a packed checkpoint.

    A fake-quantized model is converted on a copy; ``model`` itself is not modified.
    ``lm_head``: ``"fp"`` stores the output projection as the model has it: in full precision
    (TBT; tied to the latent embedding matrix), or packed when training quantized it (a
    ``QuantConfig`` whose ``skip_modules`` leaves out ``lm_head``; tied, it shares the token
    embedding's codes and costs no bytes). ``"int8"`` stores an FP head per-row symmetric int8
    + float32 scale (:mod:`tbt.export.lm_head`). Returns the directory path.

    The checkpoint is written into a temporary sibling and renamed into place. ``directory``
    must be new or empty: a non-empty folder is replaced only with ``overwrite=True``, and a
    file in its place is never touched (``FileExistsError``, before any work).
    """
    import copy

    from safetensors.torch import save_file

    if lm_head not in LM_HEAD_FORMATS:
        raise ValueError(f"lm_head={lm_head!r}; choose one of {list(LM_HEAD_FORMATS)}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file: save the packed checkpoint to a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty: choose a new or empty folder, or pass "
                              f"overwrite=True to replace its content")
    from tbt.export.ptq_layers import SchemeLinear

    converted = any(isinstance(m, (PackedLinear, PackedEmbedding, SchemeLinear))
                    for m in model.modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not converted:
        model = convert_model(copy.deepcopy(model))
    elif lm_head == "int8" and not isinstance(head, Int8Linear):
        model = copy.deepcopy(model)
    if lm_head == "int8" and not isinstance(model.get_output_embeddings(), Int8Linear):
        if isinstance(model.get_output_embeddings(), PackedLinear):
            raise ValueError("lm_head='int8': this model's LM head is already quantized (it was "
                             "trained with the quantized head); save it with lm_head='fp'")
        _quantize_lm_head(model)
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
        if "scheme" in info:
            info["tensors"] = {r: aliases.get(t, t) for r, t in info["tensors"].items()}
            continue
        info["packed"] = aliases.get(info["packed"], info["packed"])
        info["scale"] = aliases.get(info["scale"], info["scale"])
        if "offset" in info:
            info["offset"] = aliases.get(info["offset"], info["offset"])
        act = info.get("act") or {}
        if "alpha_tensor" in act:
            act["alpha_tensor"] = aliases.get(act["alpha_tensor"], act["alpha_tensor"])

    metadata = FormatHeader().to_metadata()
    metadata.update({
        "tbt.quant_config": qcfg.to_json(),
        "tbt.layers": json.dumps(layers, sort_keys=True),
        "tbt.aliases": json.dumps(aliases, sort_keys=True),
        "tbt.model_class": type(model).__name__,
        "tbt.lm_head": json.dumps(_lm_head_entry(model), sort_keys=True),
        TENSOR_DIGESTS_KEY: json.dumps({k: array_digest(_tensor_bytes(t))
                                        for k, t in tensors.items()}, sort_keys=True),
    })

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)  # first: the weights file records their sha256
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        metadata[FILE_DIGESTS_KEY] = json.dumps(file_digests(tmp), sort_keys=True)
        metadata[CHECKSUM_KEY] = _checksum(
            metadata, {k: (_ST_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()})
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        old = None
        if target.is_dir() and any(target.iterdir()):  # overwrite=True (checked above)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)  # onto the empty temp folder: one rename
        try:
            os.replace(tmp, target)  # onto a missing or empty folder
        except OSError:
            if old is not None:  # put the old checkpoint back
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_packed_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Parsed metadata of a packed checkpoint: ``header``, ``quant_config``, ``layers``,
    ``aliases``, ``model_class``, ``lm_head``, ``tensors`` (name → (dtype, shape)), ``path``,
    ``tensor_digests`` and ``file_digests`` (the sha256 maps of :mod:`tbt.export.integrity`;
    ``None`` in a file written before them).

    Raises :class:`FormatError` on a bad header, a header checksum that does not match, or a
    layer whose tensors do not fit its packing. Reads the header only: tensor bytes and
    ``config.json`` are verified by :func:`load_packed`.
    """
    from safetensors import safe_open

    path = weights_path(directory)
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            header = FormatHeader.from_metadata(md)
            tensors = {}
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except SafetensorError as e:
        raise FormatError(f"{path} is not a readable safetensors file ({e}): truncated or "
                          f"corrupted") from e
    verify_header(md, tensors, path)
    tensor_digests, signed_files = read_digests(md, tensors, path)
    try:
        layers = json.loads(md["tbt.layers"])
        aliases = json.loads(md.get("tbt.aliases", "{}"))
        lm_head = json.loads(md.get("tbt.lm_head", '{"format": "fp"}'))
        quant_config = md["tbt.quant_config"]
        if not isinstance(layers, dict) or not isinstance(aliases, dict) \
                or not isinstance(lm_head, dict):
            raise TypeError("tbt.layers, tbt.aliases and tbt.lm_head must be JSON objects")
        for name, info in layers.items():
            _check_layer(name, info, tensors)
        _check_lm_head(lm_head, tensors)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"packed checkpoint metadata lacks or garbles {e!r}") from e
    return {"header": header, "quant_config": quant_config, "layers": layers,
            "aliases": aliases, "model_class": md.get("tbt.model_class"), "lm_head": lm_head,
            "tensors": tensors, "path": path, "tensor_digests": tensor_digests,
            "file_digests": signed_files}


def _check_tensor(what: str, key: str, tensors: dict, dtype: str | None, shape: tuple) -> None:
    got = tensors.get(key)
    if got is None:
        raise FormatError(f"{what}: tensor {key} missing")
    if got[1] != shape or (dtype is not None and got[0] != dtype):
        raise FormatError(f"{what}: {key} is {got[0]} {list(got[1])}, expected "
                          f"{dtype or 'float'} {list(shape)}")


def _check_layer(name: str, info: dict, tensors: dict) -> None:
    if "scheme" in info:  # a packed PTQ layer: the scheme's own tensor list (docs/format.md §9)
        from tbt.export.ptq_layers import check_scheme_layer

        return check_scheme_layer(name, info, tensors, _check_tensor)
    try:
        packing = Packing(info["packing"])
    except ValueError as e:
        raise FormatError(f"layer {name}: unknown packing {info['packing']!r}") from e
    n, k = (int(v) for v in info["shape"])
    if n < 1 or k < 1:
        raise FormatError(f"layer {name}: shape {info['shape']} must be positive")
    _check_tensor(f"layer {name} ({packing.value})", info["packed"], tensors, "U8",
                  (n, packing.row_bytes(k)))
    group = info.get("group_size")
    if group is not None and (not isinstance(group, int) or group < 1 or k % group):
        raise FormatError(f"layer {name}: group_size {group!r} does not divide in_features={k}")
    scale_shape = (n,) if group is None else (n, k // group)
    _check_tensor(f"layer {name}", info["scale"], tensors, None, scale_shape)
    if "offset" in info:
        _check_tensor(f"layer {name}", info["offset"], tensors, None, scale_shape)


def _check_lm_head(entry: dict, tensors: dict) -> None:
    fmt = entry.get("format")
    if fmt not in LM_HEAD_READ_FORMATS:
        raise FormatError(f"tbt.lm_head format {fmt!r} is unknown; this tbt reads "
                          f"{list(LM_HEAD_READ_FORMATS)}")
    if fmt == "int8":
        n, k = (int(v) for v in entry["shape"])
        _check_tensor("int8 lm_head", entry["weight"], tensors, "I8", (n, k))
        _check_tensor("int8 lm_head", entry["scale"], tensors, "F32", (n,))


def _model_class(tf, name: str | None, config):
    """The transformers class ``tbt.model_class`` names, or None (then the Auto class of the
    config builds the model: tbt's own architectures). Only a concrete model class whose
    config class fits ``config.json`` is accepted: the name comes from the file."""
    if not name:
        return None
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise FormatError(f"tbt.model_class={name!r} is not a class name")
    cls = getattr(tf, name, None)
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)) \
            or cls is tf.PreTrainedModel:
        raise FormatError(f"tbt.model_class={name!r} is not a transformers model class "
                          f"(a PreTrainedModel such as BartForConditionalGeneration): a "
                          f"corrupted or crafted file, export it again")
    want = getattr(cls, "config_class", None)
    if isinstance(want, type) and not isinstance(config, want):
        raise FormatError(f"tbt.model_class={name!r} takes a {want.__name__}, but config.json "
                          f"is a {type(config).__name__}: export it again")
    return cls


def _build_skeleton(config, model_class: str | None, qcfg, lm_head: dict,
                    layers: dict | None = None, tensors: dict | None = None) -> nn.Module:
    """The converted architecture with empty packed buffers; weights never initialised.

    Scheme layers of ``layers`` (packed PTQ, ``docs/format.md`` §9) replace their linear with
    an empty :class:`~tbt.export.ptq_layers.SchemeLinear`; a file with only those (its
    ``QuantConfig`` quantizes nothing) skips ``quantize_model``."""
    import transformers as tf
    from transformers.initialization import no_init_weights

    from tbt.export.ptq_layers import SchemeLinear
    from tbt.quant.surgery import quantize_model

    cls = _model_class(tf, model_class, config)
    with no_init_weights():  # untouched pages cost no RSS; load_state_dict fills what is kept
        if cls is None:
            auto = (tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
                    else tf.AutoModelForCausalLM)
            model = auto.from_config(config)
        else:
            model = cls(config)
    if qcfg.weight_bits is not None or qcfg.embed_bits is not None or qcfg.act_bits is not None:
        quantize_model(model, qcfg)
        convert_model(model, skeleton=True)
    for name, info in (layers or {}).items():
        if "scheme" in info:
            old = model.get_submodule(name)
            dtype = old.weight.dtype if isinstance(getattr(old, "weight", None),
                                                   torch.Tensor) else torch.float32
            model.set_submodule(name, SchemeLinear.skeleton(
                info, f"{name}.bias" in (tensors or {}), dtype))
    if lm_head.get("format") == "int8":
        name = lm_head.get("name") or output_embedding_name(model)
        old = model.get_submodule(name)
        n, k = lm_head["shape"]
        model.set_submodule(name, Int8Linear(k, n, getattr(old, "bias", None) is not None,
                                               old.weight.dtype))
    return model


def load_packed(directory: str | os.PathLike, device: str | torch.device = "cpu",
                backend: str = "auto", kernel_backend: str | None = None,
                engine: str | None = None):
    """Rebuild a converted model (eval mode) from a :func:`save_packed` directory.

    ``engine="native"`` returns instead the native generation engine
    (:class:`tbt.runtime.engine.Engine`: every layer of a decoding step in one C call, no
    torch; decoder-only Llama/Qwen2/Mistral and encoder-decoder BART/mBART/Marian checkpoints,
    ``docs/engine.md``).

    Args:
        directory: a :func:`save_packed` directory.
        device: where to put the model.
        backend: ``"auto"`` (the integer kernels when the native library loads, else torch),
            ``"native"`` (kernels for every layer whose format pair has one) or ``"torch"``
            (dequantized float weights: logits equal the fake-quantized model's bit for bit).
            See :func:`~tbt.inference.packed.set_backend`; layers without a kernel stay on torch
            with a logged reason.
        kernel_backend: the kernel implementation for ``"native"`` (``tbt.runtime.kernels``:
            ``ref``, ``native``, ``scalar``, ``avx2``, ``avx512``; default auto).
        engine: ``None``/``"torch"`` (the transformers model) or ``"native"`` (the engine).

    Verifies the checksums (``docs/format.md`` §8): the header, then ``config.json`` and
    ``generation_config.json``, then every tensor's bytes, then the scales' values
    (:mod:`tbt.export.integrity`). A file written before tensor checksums loads with a logged
    warning. Never runs code from the directory: a ``config.json`` or ``tokenizer_config.json``
    with an ``auto_map`` is refused, and transformers gets ``trust_remote_code=False``.

    Raises:
        FormatError: a bad header, a truncated or corrupted file, a checksum or value that does
            not match, a custom-code folder, or tensors that do not fit the layer table.
    """
    import transformers as tf
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tbt.config import QuantConfig

    if engine not in (None, "torch", "native"):
        raise ValueError(f"engine={engine!r}; choose 'torch' (the transformers model) or "
                         f"'native' (tbt.runtime.engine.Engine)")
    if engine == "native":
        from tbt.runtime.engine import Engine

        return Engine.from_packed_dir(directory, kernel_backend=kernel_backend)
    from tbt.hf import refuse_custom_code

    directory = Path(directory)
    meta = read_packed_metadata(directory)
    path = meta["path"]
    refuse_custom_code(directory, FormatError)  # before transformers reads config.json
    if meta["tensor_digests"] is None:
        warn_unverified(path)
    verify_files(directory, meta["file_digests"])
    qcfg = QuantConfig.from_json(meta["quant_config"])
    from tbt.models import register as register_models

    register_models()  # tbt's own architectures (the MatMul-free LM) for AutoConfig
    try:
        config = tf.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{directory / 'config.json'} is not a readable transformers config "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quantize_model sets it again
    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise FormatError(f"{path}: cannot read the tensors ({e}): truncated or "
                          f"corrupted file") from e
    if meta["tensor_digests"] is not None:
        for name, t in state.items():
            verify_array(name, _tensor_bytes(t), meta["tensor_digests"], path)

    def as_numpy(name: str):
        t = state.get(name)
        if t is None:
            return None
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    check_layer_values(meta["layers"], meta["lm_head"], as_numpy, path)
    model = _build_skeleton(config, meta["model_class"], qcfg, meta["lm_head"], meta["layers"],
                            meta["tensors"])
    for alias, stored in meta["aliases"].items():
        state[alias] = state[stored]  # one tensor object: the modules share it again
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise FormatError(f"{path} does not fit the architecture of config.json: "
                          f"{e}") from e
    if (directory / "generation_config.json").is_file():
        model.generation_config = tf.GenerationConfig.from_pretrained(directory)
    model = model.to(device).eval()
    set_backend(model, backend if torch.device(device).type == "cpu" else "torch",
                kernel_backend)
    if torch.get_num_threads() > 1 and any(getattr(m, "backend", None) == "native"
                                           for m in model.modules()):
        logger.info("tbt: the packed layers run on tbt's own thread pool (TBT_NUM_THREADS); "
                    "for decoding, torch.set_num_threads(1) is usually faster, as torch is "
                    "left only small ops (docs/kernels.md)")
    from tbt.export.adapters import attach_adapters  # EoRA adapters saved next to the weights

    attach_adapters(model, directory)
    return model
