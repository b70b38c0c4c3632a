"""Write a packed decoder-only tbt model as a GGUF file that llama.cpp runs (``export_gguf``).

How it works
------------
The model is converted (:func:`~tbt.export.convert.convert_model`, on a copy) and every weight
is written under llama.cpp's tensor names (``gguf.get_tensor_name_map``) in a GGUF type that
holds tbt's values exactly, up to one rounding: GGUF block scales are float16, tbt's per-row
scales float32 (``docs/gguf.md``).

* A ternary or binary matrix (``W[r, k] = α_r · q[r, k]``, ``q ∈ {−1, 0, 1}``) whose row length
  ``K`` is a multiple of 256 becomes ``TQ2_0`` (default; 2.06 bits per weight) or ``TQ1_0``
  (1.69 bpw): blocks of 256 weights of one row, each with one float16 scale ``d``. A per-row
  scale is constant along the row, so every block of row ``r`` gets ``d = fp16(α_r)`` and the
  codes go in unchanged. The blocks are built by the ``gguf`` package's own quantizer
  (``gguf.quants.quantize``) from ``α_r · q``: its block scale is ``max|block| = α_r`` and its
  codes ``round(w / d) = q``.
* Other row lengths (SmolLM2's hidden size 576 = 2.25 · 256) fall back, as ``llama-quantize``
  does, to a 32-block type that still stores the codes, not a re-quantization of floats:
  ``Q4_0`` (default; 4.5 bpw, ``d·(nibble − 8)`` with nibble ``q + 8``), ``Q8_0`` (8.5 bpw,
  ``d·int8`` with int8 ``q``) or ``F16`` (``fp16(α_r·q) = fp16(α_r)·q``). All three decode
  to the same values as TQ2_0 would: ``fp16(α_r) · q``.
* Per-group scales work the same way where each block lies inside one group (group size a
  multiple of the block size); DLT's offset, the PTQ schemes and other float weights are written
  as their dequantized float weight in F16 (or F32 for 1-D tensors: norms, biases).
* The LM head: TBT's full-precision head is written as ``output.weight`` (F16); a head packed
  with the embedding (trained quantized and tied) is left out, so llama.cpp reuses
  ``token_embd`` as it does for any tied model; an int8 head becomes Q8_0 (``d = fp16(s_r)``).
* q/k projections are permuted row-wise for the ``llama`` architecture (llama.cpp's rotary
  embedding pairs adjacent dimensions, transformers pairs halves); row scales move with rows.
* Tokenizer: from the checkpoint's fast tokenizer (byte-level BPE → ``gpt2``) or copied from
  another GGUF file (``vocab_from``: every ``tokenizer.*`` key; SmolLM2's ``smollm`` pre-tokenizer
  included).

What llama.cpp does not run: tbt's activation quantizers. llama.cpp quantizes the activations
of a TQ2_0/Q4_0 product to its own 8-bit blocks, so a 2-2-8 model is close to what tbt runs and a
model trained with 1- or 2-bit activations is not (the summary says so).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GGUFExportError", "GGUFTensorInfo", "GGUFExportResult", "export_gguf",
           "ARCHS", "TERNARY_TYPES", "FALLBACK_TYPES", "fp16_scale_error"]

logger = logging.getLogger(__name__)

# transformers model_type -> (GGUF architecture, permute q/k rows for llama.cpp's rope)
ARCHS: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                      "qwen2": ("qwen2", False)}
TERNARY_TYPES = ("tq2_0", "tq1_0")
FALLBACK_TYPES = ("q4_0", "q8_0", "f16")
_BLOCK = {"tq2_0": 256, "tq1_0": 256, "q4_0": 32, "q8_0": 32}


class GGUFExportError(ValueError):
    """A model or option that this GGUF exporter cannot write (the message names the fix)."""


@dataclass
class GGUFTensorInfo:
    """One written tensor: its GGUF name and type, where it came from, and why that type."""

    name: str
    source: str
    shape: tuple[int, ...]
    ggml_type: str
    reason: str
    nbytes: int
    scale_rel_err: float | None = None  # max |fp16(α) − α| / |α| over the tensor's scales


@dataclass
class GGUFExportResult:
    path: Path
    arch: str
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A Markdown table of every weight matrix (1-D tensors counted in one line)."""
        rows = ["| tensor | from | shape | type | why | max fp16 scale rel. err |",
                "|---|---|---|---|---|---|"]
        small = [t for t in self.tensors if len(t.shape) == 1]
        for t in self.tensors:
            if len(t.shape) == 1:
                continue
            err = "" if t.scale_rel_err is None else f"{t.scale_rel_err:.2e}"
            rows.append(f"| {t.name} | {t.source} | {'x'.join(map(str, t.shape))} | "
                        f"{t.ggml_type} | {t.reason} | {err} |")
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        total = sum(t.nbytes for t in self.tensors)
        errs = [t.scale_rel_err for t in self.tensors if t.scale_rel_err is not None]
        lines = [f"GGUF {self.path} (architecture {self.arch}): {len(self.tensors)} tensors, "
                 f"{total / 1e6:.1f} MB of tensor data; types: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                 + f"; {len(small)} 1-D tensors (norms, biases) in F32.",
                 "", *rows, ""]
        if errs:
            lines.append(f"Scale rounding: GGUF stores block scales in float16; the largest "
                         f"relative change of a tbt scale is {max(errs):.2e} (float16 has "
                         f"2^-11 = {2.0 ** -11:.2e} relative precision for normal values).")
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "arch": self.arch, "notes": self.notes,
                "tensors": [dict(t.__dict__, shape=list(t.shape)) for t in self.tensors]}


def fp16_scale_error(scale: np.ndarray) -> float:
    """Largest relative change of non-zero float32 scales when stored as float16."""
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    s = s[s != 0]
    if s.size == 0:
        return 0.0
    h = s.astype(np.float16).astype(np.float32)
    return float(np.max(np.abs(h - s) / np.abs(s)))


# ---- block encoders (codes q ∈ {-1, 0, 1} and per-block scales d) ------------------------

def _block_scales(scale: np.ndarray, n: int, k: int, block: int) -> np.ndarray | None:
    """``(N, K // block)`` float32 scale of each block, or None when a block spans two groups
    (or ``K`` is not a multiple of ``block``)."""
    if k % block:
        return None
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 1:
        return np.repeat(s[:, None], k // block, axis=1)
    group = k // s.shape[1]
    if group % block:
        return None
    return np.repeat(s, group // block, axis=1)


def _encode_ternary_gguf(codes: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """TQ2_0 / TQ1_0 bytes ``(N, K/256 · type_size)`` through ``gguf.quants.quantize``.

    The quantizer's block scale is ``max|block|``: for ``α·q`` with any non-zero code that is
    ``α`` (a block of zeros gets ``d = 0``: the same values), and ``round(α·q / α) = q``."""
    import gguf

    w = codes.astype(np.float32) * np.repeat(d, 256, axis=1)
    gtype = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return gguf.quants.quantize(w, gtype)


def _encode_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 blocks of 32: float16 ``d``, then 16 bytes whose low nibble is weight ``j`` and high
    nibble weight ``j + 16``, each stored as ``q + 8`` (value ``d · (nibble − 8)``)."""
    n, k = codes.shape
    nib = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // 32, 2, 16)
    qs = nib[:, :, 0, :] | (nib[:, :, 1, :] << 4)
    dh = d.astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    return np.concatenate([dh, qs], axis=2).reshape(n, -1)


def _encode_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 blocks of 32: float16 ``d``, then 32 int8 values (``value = d · x``)."""
    n, k = codes.shape
    x = codes.astype(np.int8).view(np.uint8).reshape(n, k // 32, 32)
    dh = d.astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    return np.concatenate([dh, x], axis=2).reshape(n, -1)


def _encode_codes(codes: np.ndarray, scale: np.ndarray, qtype: str) -> np.ndarray | None:
    """Bytes of ``α · q`` in ``qtype`` (F16 as a float16 array), or None when the scale layout
    does not fit the type's blocks."""
    n, k = codes.shape
    if qtype == "f16":
        s = np.asarray(scale, dtype=np.float32)
        full = (np.repeat(s, k // s.shape[1], axis=1) if s.ndim == 2 else s[:, None])
        return (codes.astype(np.float32) * full).astype(np.float16)
    d = _block_scales(scale, n, k, _BLOCK[qtype])
    if d is None:
        return None
    if qtype in TERNARY_TYPES:
        return _encode_ternary_gguf(codes, d, qtype)
    return _encode_q4_0(codes, d) if qtype == "q4_0" else _encode_q8_0(codes, d)


# ---- model walk --------------------------------------------------------------------------

def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from transformers' rotate-half order to llama.cpp's
    interleaved pairs: within each head, row ``i`` of the first half and row ``i`` of the
    second half become rows ``2i`` and ``2i + 1``."""
    n = w.shape[0]
    rest = w.shape[1:]
    return (w.reshape(n_head, 2, n // n_head // 2, *rest).swapaxes(1, 2).reshape(n, *rest))


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rtype = params.get("rope_type", "default")
    if rtype not in ("default", None):
        raise GGUFExportError(f"rope_type={rtype!r} is not written by tbt's GGUF exporter "
                              f"(default rope only)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _write_hparams(w, cfg, arch: str) -> None:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(int(head_dim))
    w.add_vocab_size(int(cfg.vocab_size))
    if head_dim * n_head != cfg.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))


def _write_vocab_from(w, path: str, n_vocab: int) -> None:
    import gguf

    from tbt.hf.gguf import resolve_gguf

    d, f = resolve_gguf(path if path.startswith("gguf:") or path.endswith(".gguf")
                        else f"gguf:{path}")
    reader = gguf.GGUFReader(os.path.join(d, f))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFExportError(f"--vocab-from {path}: the file has no tokenizer.ggml.tokens")
    if len(tokens.data) != n_vocab:
        raise GGUFExportError(f"--vocab-from {path}: {len(tokens.data)} tokens, but the model's "
                              f"vocab_size is {n_vocab}")
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, fld.contents(), vtype, sub)


def _write_vocab_hf(w, tok, n_vocab: int, pre: str) -> None:
    """A byte-level BPE fast tokenizer as llama.cpp's ``gpt2`` vocabulary."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the tokenizer is not a fast (tokenizers) tokenizer: pass "
                              "--vocab-from FILE.gguf to copy a vocabulary")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} "
                              f"(byte_fallback={model.get('byte_fallback')}) is not byte-level "
                              f"BPE: pass --vocab-from FILE.gguf to copy a vocabulary")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model's "
                              f"vocab_size is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = int(gguf.TokenType.NORMAL if a is None else gguf.TokenType.CONTROL
                       if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        i = getattr(tok, attr, None)
        if isinstance(i, int) and 0 <= i < n_vocab:
            add(i)
    w.add_add_bos_token(False)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _codes_of(mod) -> tuple[np.ndarray, np.ndarray]:
    from tbt.inference.packed import unpack_codes

    codes = unpack_codes(mod.packed, mod.packing, mod.k).numpy().astype(np.int8)
    return codes, mod.scale.detach().float().cpu().numpy()


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, *,
                ternary_type: str = "tq2_0", fallback: str = "q4_0",
                vocab_from: str | None = None, tokenizer_pre: str = "default",
                name: str | None = None) -> GGUFExportResult:
    """Write ``model`` (a fake-quantized or converted decoder-only model) as a GGUF file.

    Args:
        model: a Llama/Mistral/Qwen2 causal LM, quantized by tbt (``quantize_model``) or
            already converted (``convert_model`` / ``load_packed``).
        path: the ``.gguf`` file to write (written to a temporary sibling, then renamed).
        tokenizer: the model's fast tokenizer (byte-level BPE), unless ``vocab_from``.
        ternary_type: ``"tq2_0"`` or ``"tq1_0"`` for ternary/binary matrices whose rows are a
            multiple of 256 long.
        fallback: ``"q4_0"``, ``"q8_0"`` or ``"f16"`` for the other ternary/binary matrices.
        vocab_from: copy every ``tokenizer.*`` key from this GGUF file (``gguf:smollm2`` works).
        tokenizer_pre: llama.cpp's pre-tokenizer name for a tokenizer taken from ``tokenizer``
            (``"default"``; ``"smollm"`` for SmolLM2's).
        name: ``general.name`` (default: the config's ``name_or_path``).

    Raises:
        GGUFExportError: an architecture, option or layer the exporter does not write.
    """
    import gguf

    from tbt.export.convert import convert_model
    from tbt.inference.packed import PackedEmbedding, PackedLinear
    from tbt.export.lm_head import Int8Linear
    from tbt.export.ptq_layers import SchemeLinear

    if ternary_type not in TERNARY_TYPES:
        raise GGUFExportError(f"ternary type {ternary_type!r}; choose one of {TERNARY_TYPES}")
    if fallback not in FALLBACK_TYPES:
        raise GGUFExportError(f"fallback type {fallback!r}; choose one of {FALLBACK_TYPES}")
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ARCHS or getattr(cfg, "is_encoder_decoder", False):
        raise GGUFExportError(f"model_type={mtype!r}: the GGUF export writes decoder-only "
                              f"{sorted(ARCHS)} models; use the packed format (--format packed) "
                              f"for the others")
    if tokenizer is None and vocab_from is None:
        raise GGUFExportError("llama.cpp needs a vocabulary: the checkpoint has no tokenizer; "
                              "pass --vocab-from FILE.gguf (e.g. gguf:smollm2)")
    arch, permute = ARCHS[mtype]
    converted = any(isinstance(m, (PackedLinear, PackedEmbedding, SchemeLinear, Int8Linear))
                    for m in model.modules())
    if not converted and any(getattr(getattr(m, "weight_spec", None), "bits", None) in (1, 2)
                             for m in model.modules()):
        model = convert_model(copy.deepcopy(model))  # else a float model: every matrix F16
    model.eval()
    n_layers = int(cfg.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)

    result = GGUFExportResult(path=Path(path), arch=arch)
    qcfg = _quant_config(cfg)
    act_bits = None if qcfg is None else qcfg.act_bits
    if act_bits is not None and act_bits < 8:
        result.notes.append(f"Activations: this model was trained with {act_bits}-bit "
                            f"activations; llama.cpp quantizes activations to its own 8-bit "
                            f"blocks, so its outputs are not tbt's.")
    elif act_bits is not None:
        result.notes.append("Activations: tbt's 8-bit activation quantizer is not in the file; "
                            "llama.cpp quantizes activations to its own 8-bit blocks (Q8_K/Q8_0), "
                            "so outputs agree with tbt's runtime to that rounding, not bit for "
                            "bit.")

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or str(getattr(cfg, "name_or_path", "") or "tbt model"))
        _write_hparams(w, cfg, arch)
        ftype = (gguf.LlamaFileType.MOSTLY_TQ2_0 if ternary_type == "tq2_0"
                 else gguf.LlamaFileType.MOSTLY_TQ1_0)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if qcfg is not None:
            w.add_string("tbt.quant_config", qcfg.to_json())
        if vocab_from is not None:
            _write_vocab_from(w, vocab_from, int(cfg.vocab_size))
        else:
            _write_vocab_hf(w, tokenizer, int(cfg.vocab_size), tokenizer_pre)

        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        tied_head = head is not None and _head_is_embedding(head, embed)
        for mname, mod in model.named_modules():
            if mname == head_name and tied_head:
                result.notes.append(f"{mname}: tied to the token embedding: not written "
                                    f"(llama.cpp uses token_embd.weight)")
                continue
            _write_module(w, tmap, mname, mod, result, permute, n_head, n_kv, ternary_type,
                          fallback, PackedLinear, PackedEmbedding, Int8Linear)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fallbacks = [t for t in result.tensors if t.reason.startswith("fallback")]
    if fallbacks:
        result.notes.append(f"{len(fallbacks)} ternary/binary matrices fell back to "
                            f"{fallback.upper()} because their row length is not a multiple of "
                            f"256 ({ternary_type.upper()}'s block); their values are the same "
                            f"fp16(scale)·code.")
    return result


def _quant_config(cfg):
    """The model's tbt ``QuantConfig`` (None for a model that tbt did not quantize)."""
    from tbt.config import QuantConfig

    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    if hasattr(qc, "to_quant_config"):
        return qc.to_quant_config()
    return QuantConfig.from_dict(dict(qc))


def _head_is_embedding(head, embed) -> bool:
    """The head computes with the embedding's own tensors (a tied FP matrix, or the packed
    codes and scales that ``convert_model`` shares between a quantized head and embedding)."""
    for attr in ("weight", "packed"):
        a, b = getattr(head, attr, None), getattr(embed, attr, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is b:
            return True
    return False


def _write_module(w, tmap, mname, mod, result, permute, n_head, n_kv, ternary_type, fallback,
                  PackedLinear, PackedEmbedding, Int8Linear) -> None:
    import gguf

    own = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
    packed = isinstance(mod, (PackedLinear, PackedEmbedding))
    if not packed and not isinstance(mod, Int8Linear) and "weight" not in own \
            and not hasattr(mod, "dequantized_weight"):
        return
    gname = tmap.get_name(f"{mname}.weight", try_suffixes=(".weight", ".bias"))
    if gname is None:
        if "weight" in own or packed or hasattr(mod, "dequantized_weight"):
            raise GGUFExportError(f"{mname} ({type(mod).__name__}) has no llama.cpp tensor name "
                                  f"for this architecture")
        return
    is_q = gname.endswith("attn_q.weight")
    is_k = gname.endswith("attn_k.weight")
    heads = n_head if is_q else n_kv

    def rows(a: np.ndarray) -> np.ndarray:
        return _permute_qk(a, heads) if permute and (is_q or is_k) else a

    def add(arr: np.ndarray, qtype: str, reason: str, shape, err=None) -> None:
        raw = None if qtype in ("f16", "f32") else getattr(gguf.GGMLQuantizationType,
                                                           qtype.upper())
        arr = np.ascontiguousarray(arr)
        w.add_tensor(gname, arr, raw_dtype=raw)
        result.tensors.append(GGUFTensorInfo(gname, mname, tuple(int(s) for s in shape),
                                             qtype.upper(), reason, int(arr.nbytes), err))

    if packed and mod.offset is None:
        codes, scale = _codes_of(mod)
        codes, scale = rows(codes), rows(scale)
        n, k = codes.shape
        kind = "ternary" if mod.bits == 2 else "binary"
        err = fp16_scale_error(scale)
        data = _encode_codes(codes, scale, ternary_type)
        if data is not None:
            add(data, ternary_type, f"{kind} codes, row length {k} = {k // 256}x256", (n, k), err)
        else:
            why = (f"row length {k} is not a multiple of 256" if k % 256 else
                   "per-group scales smaller than 256")
            data = _encode_codes(codes, scale, fallback)
            qtype = fallback
            if data is None:  # groups smaller than 32: full float16
                data, qtype = _encode_codes(codes, scale, "f16"), "f16"
                why += " or 32"
            add(data, qtype, f"fallback: {kind} codes, {why}", (n, k), err)
    elif isinstance(mod, Int8Linear) and mod.in_features % 32 == 0:
        x = rows(mod.weight_int8.detach().cpu().numpy())
        s = rows(mod.scale.detach().float().cpu().numpy())
        d = np.repeat(s[:, None], x.shape[1] // 32, axis=1)
        add(_encode_q8_0(x, d), "q8_0", "int8 LM head: int8 codes, d = fp16(row scale)",
            x.shape, fp16_scale_error(s))
    else:
        spec = getattr(mod, "weight_spec", None)
        if hasattr(mod, "dequantized_weight"):
            wt = mod.dequantized_weight()
            why = ("fallback: ternary codes with an offset (DLT), no GGUF type holds "
                   "scale·code + offset: dequantized" if packed
                   else f"dequantized {type(mod).__name__} (no exact GGUF type)")
        elif spec is not None and hasattr(mod, "quantized_weight"):
            wt = mod.quantized_weight()
            why = f"{spec.bits}-bit fake-quantized weight (no packed form): dequantized"
        else:
            wt, why = own["weight"], "full-precision weight"
        arr = rows(wt.detach().float().cpu().numpy())
        if arr.ndim == 1:
            add(arr.astype(np.float32), "f32", "1-D (norm)", arr.shape)
        else:
            add(arr.astype(np.float16), "f16", why, arr.shape)
    bias = mod.effective_bias() if hasattr(mod, "effective_bias") else own.get("bias")
    if bias is not None and gname.endswith(".weight"):
        gbias = gname[:-len(".weight")] + ".bias"
        b = rows(bias.detach().float().cpu().numpy())
        w.add_tensor(gbias, np.ascontiguousarray(b.astype(np.float32)))
        result.tensors.append(GGUFTensorInfo(gbias, mname, b.shape, "F32", "bias", b.nbytes))
