"""Native generation engine: a packed decoder-only checkpoint decoded in C, one call per token.

How it works
------------
:meth:`Engine.from_packed_dir` reads a :func:`tbt.export.io.save_packed` directory with numpy
(safetensors' numpy reader, ``config.json``), prepares every packed linear layer for the
kernels exactly as the per-layer runtime does (:class:`~tbt.runtime.linear.PackedLinearNP`,
whose ``tbt_plan`` the C code reuses), and fills the C structs of ``csrc/tbt_engine.h``. Then
:meth:`Engine.forward` runs *every* layer of one step in one C call (``tbt_dec_forward``,
``csrc/engine.c``): the token embedding, RMSNorm, the q/k/v projections (one GEMM when the
three share an activation quantizer, as the 8-bit settings do; likewise gate/up), RoPE, the
KV cache, attention with TBT's Q/K/V/probability quantizers (one set of statistics per
tensor, the cache re-quantized as a whole, as ``tbt.quant.attention`` does), the SiLU MLP, the
final norm and the LM head (packed, or float). Only the loop over tokens and the sampling of
the next token stay in Python (:meth:`Engine.generate`).

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` (SmolLM2 is a
Llama; BART, mBART and Marian: :mod:`tbt.runtime.engine_s2s`, which ``from_packed_dir``
picks) with default RoPE, SiLU, 1/2-bit packed linears whose activation quantizer has a kernel
(every E-W-A setting with 8-, 2- or 1-bit activations: ``2-2-8``, ``1-1-8``, ``2-2-2``,
``1-1-1``), attention quantizers ``minmax``/``elastic`` (or none), LM heads ``packed``, ``fp``
and ``int8`` (the int8 head runs as its dequantized float matrix: the values of
``load_packed(..., backend="torch")``). Batches are prompts of equal length, or of different
lengths left-padded with an attention mask (as transformers' ``generate`` pads them).

The tokens equal the torch backend's (``load_packed``) up to float32 rounding in the
reductions; ``docs/engine.md`` gives the details. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tbt.export.format import FormatError, FormatHeader, Packing
from tbt.export.integrity import (check_layer_values, read_digests, verify_array, verify_files,
                                  verify_header, warn_unverified)
from tbt.runtime.kernels import native
from tbt.runtime.kernels.ref import ALPHA_EPS, aligned_empty
from tbt.runtime.linear import WEIGHTS_NAME, ActSpec, PackedLinearNP

__all__ = ["Engine", "EngineError", "SUPPORTED_MODEL_TYPES", "SamplingConfig"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ABI = 2
_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class EngineError(ValueError):
    """A checkpoint the engine cannot run (the message says why and what to use instead)."""


# ---- ctypes mirrors of csrc/tbt_engine.h ------------------------------------------------------

class _AQ(ctypes.Structure):
    _fields_ = [("kind", _I32), ("bits", _I32), ("is_signed", _I32), ("center", _I32),
                ("shift_min", _I32), ("use_sign", _I32), ("qn", _I32), ("qp", _I32),
                ("clip", _F), ("alpha_c", _F)]


class _Lin(ctypes.Structure):
    _fields_ = [("plan", _P), ("b1_rows", _P), ("b1_stride", _I64), ("zero_d", _F),
                ("needs_mean", _I32)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _P), ("ln2", _P), *[(n, _Lin) for n in
                                            ("q", "k", "v", "o", "gate", "up", "down")],
                ("aq_q", _AQ), ("aq_k", _AQ), ("aq_v", _AQ), ("aq_p", _AQ),
                ("kc", _P), ("vc", _P), ("kq", _P), ("vq", _P), ("st", _P)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _I64), ("d", _I64), ("n_heads", _I64), ("n_kv", _I64),
                ("head_dim", _I64), ("inter", _I64), ("vocab", _I64), ("max_t", _I64),
                ("max_b", _I64), ("eps", _F), ("attn_scale", _F), ("emb_kind", _I32),
                ("head_kind", _I32), ("emb_f", _P), ("emb_p", _P), ("emb_scale", _P),
                ("emb_stride", _I64), ("norm_w", _P), ("head_w", _P), ("head_b", _P),
                ("head", _Lin), ("rope_cos", _P), ("rope_sin", _P), ("rope_len", _I64),
                ("layers", _P), ("prof", _P)]


def _lib() -> ctypes.CDLL:
    lib = native.load_library()
    if lib is None:
        raise EngineError(f"the native engine needs tbt's C library: "
                          f"{native.unavailable_reason()}")
    if not hasattr(lib, "tbt_dec_forward"):
        raise EngineError("tbt's C library was built without the engine (csrc/engine.c): "
                          "rebuild it (pip install -e . --no-build-isolation)")
    if not getattr(lib, "_tbt_engine_declared", False):
        lib.tbt_engine_abi.restype, lib.tbt_engine_abi.argtypes = ctypes.c_int, []
        lib.tbt_dec_scratch_bytes.restype = _I64
        lib.tbt_dec_scratch_bytes.argtypes = [_P, _I64, _I64]
        lib.tbt_kv_mode.restype, lib.tbt_kv_mode.argtypes = ctypes.c_int, [_P]
        lib.tbt_dec_forward.restype = ctypes.c_int
        lib.tbt_dec_forward.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _I64]
        lib.tbt_dec_forward_padded.restype = ctypes.c_int
        lib.tbt_dec_forward_padded.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64]
        lib._tbt_engine_declared = True
    if lib.tbt_engine_abi() != _ABI:
        raise EngineError(f"engine ABI {lib.tbt_engine_abi()} != {_ABI}: rebuild tbt's C library")
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.__array_interface__["data"][0]


def _f32(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, np.float32)
    out[...] = a
    return out


# ---- the checkpoint ---------------------------------------------------------------------------

class _Checkpoint:
    """The tensors and tables of a packed directory (numpy, lazily read)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import SafetensorError, safe_open

        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a tbt packed checkpoint (write one "
                                    f"with tbt export or tbt.export.io.save_packed)")
        try:
            self._f = safe_open(str(path), framework="numpy")
            md = self._f.metadata() or {}
            FormatHeader.from_metadata(md)
            index = {}
            for k in self._f.keys():
                sl = self._f.get_slice(k)
                index[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        except SafetensorError as e:
            raise FormatError(f"{path} is not a readable safetensors file ({e}): truncated or "
                              f"corrupted") from e
        # the checks of load_packed (docs/format.md §8): header, signed files, tensor bytes
        verify_header(md, index, path)
        self._digests, files = read_digests(md, index, path)
        if self._digests is None:
            warn_unverified(path)
        verify_files(directory, files)
        self._verified: set[str] = set()
        self.layers: dict[str, Any] = json.loads(md.get("tbt.layers", "{}"))
        self.aliases: dict[str, str] = json.loads(md.get("tbt.aliases", "{}"))
        self.lm_head: dict[str, Any] = json.loads(md.get("tbt.lm_head", '{"format": "fp"}'))
        self.quant: dict[str, Any] = json.loads(md.get("tbt.quant_config", "{}"))
        self.model_class = md.get("tbt.model_class")
        self.keys = set(index)
        self.path = path
        # scales finite and >= 0, activation steps finite (what load_packed checks)
        check_layer_values(self.layers, self.lm_head,
                           lambda t: self.get(t) if self.has(t) else None, path)

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.keys

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` (through the alias table), its sha256 verified on first read."""
        from safetensors import SafetensorError

        name = self.aliases.get(name, name)
        try:
            a = self._f.get_tensor(name)
        except SafetensorError as e:
            raise FormatError(f"{self.path}: tensor {name} cannot be read ({e}): truncated or "
                              f"corrupted") from e
        if name not in self._verified:
            verify_array(name, a, self._digests, self.path)
            self._verified.add(name)
        return a

    def scalar(self, name: str) -> float:
        return float(self.get(name))


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a packed checkpoint keeps the model's "
                                f"config.json next to {WEIGHTS_NAME}")
    return json.loads(path.read_text())


def _packed_dir(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The folder of a packed checkpoint and its config.json (a clear error when it is not one)."""
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS_NAME} not found: not a tbt packed "
                                f"checkpoint (write one with tbt export or save_packed)")
    return directory, _read_config(directory)


def _packed_embedding(ck: _Checkpoint, emb: dict) -> tuple[int, np.ndarray, np.ndarray]:
    """A packed token embedding for the C side: (TBT_EMB_T2 or TBT_EMB_B1, rows, scales)."""
    if emb.get("kind") != "embedding" or "group_size" in emb or "offset" in emb:
        raise EngineError("per-group or offset embeddings are not in the engine; use "
                          "load_packed")
    packing = Packing(emb["packing"])
    if packing not in (Packing.TERNARY_2BIT, Packing.BINARY_1BIT):
        raise EngineError(f"embedding packing {packing.value} is not in the engine")
    kind = 1 if packing == Packing.TERNARY_2BIT else 2
    return (kind, np.ascontiguousarray(ck.get(emb["packed"])),
            _f32(ck.get(emb["scale"]).astype(np.float32)))


def _matches(name: str, patterns: Sequence[str]) -> bool:  # tbt.quant.surgery._matches
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p)
               for p in patterns)


def _act_spec(ck: _Checkpoint, name: str, info: dict) -> ActSpec | None:
    act = info.get("act", "missing")
    if act == "missing":
        raise EngineError(f"layer {name}: the checkpoint records no activation quantizer "
                          f"(written by an older tbt): export it again")
    if act is None:
        return None
    act = dict(act)
    if "alpha_tensor" in act:
        act["alpha"] = ck.scalar(act.pop("alpha_tensor"))
    if "kind" in act and act["kind"] not in ("minmax", "elastic"):
        raise EngineError(f"layer {name}: activation quantizer {act['kind']!r} has no kernel; "
                          f"run this checkpoint with tbt.export.io.load_packed")
    return ActSpec.from_dict(act)


@dataclass
class _LinSrc:
    """One packed linear as stored: normative codes, scale, bias, quantizer."""

    name: str
    packed: np.ndarray
    k: int
    scale: np.ndarray
    bias: np.ndarray | None
    packing: Packing
    act: ActSpec


def _linear_src(ck: _Checkpoint, name: str) -> _LinSrc:
    info = ck.layers.get(name)
    if info is None or info.get("kind") != "linear":
        raise EngineError(f"{name} is not a packed 1/2-bit linear layer of {ck.path}: the "
                          f"engine runs checkpoints whose every linear is packed; use "
                          f"tbt.export.io.load_packed for this one")
    if "scheme" in info:
        raise EngineError(f"layer {name} is a packed PTQ layer ({info['scheme']}, float "
                          f"activations): no integer kernel; use tbt.export.io.load_packed")
    if "group_size" in info or "offset" in info:
        raise EngineError(f"layer {name}: per-group scales or a weight offset (DLT) have no "
                          f"kernel format; use tbt.export.io.load_packed")
    packing = Packing(info["packing"])
    if packing not in (Packing.TERNARY_2BIT, Packing.BINARY_1BIT):
        raise EngineError(f"layer {name}: packing {packing.value} has no kernel layout here; "
                          f"export with the 2-bit ternary packing")
    spec = _act_spec(ck, name, info)
    if spec is None:
        raise EngineError(f"layer {name} has float activations (no activation quantizer): no "
                          f"integer kernel; use tbt.export.io.load_packed")
    n, k = (int(v) for v in info["shape"])
    bias = ck.get(f"{name}.bias").astype(np.float32) if ck.has(f"{name}.bias") else None
    return _LinSrc(name, ck.get(info["packed"]), k, ck.get(info["scale"]).astype(np.float32),
                   bias, packing, spec)


def _fuse(srcs: list[_LinSrc]) -> _LinSrc | None:
    """One linear for several that read the same input with the same quantizer (q|k|v)."""
    a = srcs[0]
    if any(s.act != a.act or s.packing != a.packing or s.k != a.k for s in srcs[1:]):
        return None
    bias = None
    if any(s.bias is not None for s in srcs):
        bias = np.concatenate([s.bias if s.bias is not None else
                               np.zeros(s.scale.shape[0], np.float32) for s in srcs])
    return _LinSrc("|".join(s.name for s in srcs), np.concatenate([s.packed for s in srcs]),
                   a.k, np.concatenate([s.scale for s in srcs]), bias, a.packing, a.act)


class _Linear:
    """A prepared layer and its C struct (keeps every buffer the plan points to alive)."""

    def __init__(self, src: _LinSrc, backend: str | None) -> None:
        self.rt = PackedLinearNP(src.packed, src.k, src.scale, src.bias, src.packing, src.act,
                                 backend)
        fused = self.rt.fused
        if fused is None:
            raise EngineError(f"layer {src.name}: the native engine needs the C kernels, "
                              f"not the {self.rt.kernel.backend!r} backend")
        fused._attach_lanes(native.lanes_min_m(fused.kernel.name))  # the lanes layout
        self.fused = fused
        self.n = fused.n
        self.b1 = None
        if fused.act_kind == "binary":  # signed binary: undo the +1 of exact zeros in C
            self.b1 = np.ascontiguousarray(src.packed)
        self.struct = _Lin(fused._plan_p, _ptr(self.b1), 0 if self.b1 is None else
                           self.b1.shape[1], float(np.float32(fused.act_param)),
                           int(self.rt.act.needs_mean))


def _attention_quantizers(ck: _Checkpoint, attn: str) -> list[_AQ]:
    """The Q, K, V, probability quantizers of one attention module (``tbt_attn``)."""
    q = ck.quant
    bits = q.get("bits", "fp-fp-fp").split("-")[2]
    if bits == "fp" or not q.get("quantize_attention", True) or \
            _matches(attn, q.get("skip_modules", ())):
        return [_AQ() for _ in range(4)]
    bits = int(bits)
    method = q.get("act_method", "auto")
    if method == "auto":
        method = "minmax" if bits == 8 else "elastic"
    out = []
    for site, signed in (("query", True), ("key", True), ("value", True), ("probs", False)):
        if method == "minmax":
            out.append(_AQ(kind=1, bits=bits, is_signed=int(signed),
                           clip=float(np.float32(q.get("act_clip", 2.5)))))
        elif method == "elastic":
            variant = q.get("variant", "paper")
            if bits <= 2:
                qn, qp = (-1, 1) if signed else (0, bits)
            else:
                qn, qp = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed
                          else (0, 2 ** bits - 1))
            alpha = ck.scalar(f"{attn}.tbt_attn.{site}.alpha")
            out.append(_AQ(kind=2, bits=bits, is_signed=int(signed),
                           center=int(variant == "paper" and signed),
                           shift_min=int(variant == "released" and not signed and bits >= 2),
                           use_sign=int(signed and bits == 1), qn=qn, qp=qp,
                           alpha_c=float(max(np.float32(alpha), ALPHA_EPS))))
        else:
            raise EngineError(f"attention activation quantizer {method!r} is not in the "
                              f"engine (minmax, elastic); use tbt.export.io.load_packed")
    return out


def _rope_tables(config: dict, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``(length, head_dim/2)`` of the default RoPE (transformers' formulas: float32
    inverse frequencies and angles; cos/sin correctly rounded from float64)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise EngineError(f"RoPE type {rope_type!r} is not in the engine (default RoPE only); "
                          f"use tbt.export.io.load_packed")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise EngineError("partial rotary embeddings are not in the engine; use load_packed")
    base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(
        np.float32)
    ang = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]  # float32 products
    return (_f32(np.cos(ang.astype(np.float64)).astype(np.float32)),
            _f32(np.sin(ang.astype(np.float64)).astype(np.float32)))


# ---- sampling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingConfig:
    """Greedy (``do_sample=False``) or sampling with temperature, top-k and top-p, applied in
    that order (as transformers' logits warpers)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _softmax64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Next tokens ``(B,)`` from logits ``(B, V)``."""
    if not cfg.do_sample:
        return logits.argmax(axis=-1)
    x = logits.astype(np.float32) / np.float32(cfg.temperature)
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if cfg.top_p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")  # ascending, as transformers' TopP
        p = _softmax64(np.take_along_axis(x, order, axis=-1))
        drop = np.cumsum(p, axis=-1) <= 1.0 - cfg.top_p
        drop[:, -1] = False  # keep at least the best token
        x = x.copy()
        np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, -1)),
                          axis=-1)
    p = _softmax64(x)
    u = rng.random(p.shape[0])
    c = np.cumsum(p, axis=-1)
    return np.minimum((c < u[:, None] * c[:, -1:]).sum(axis=-1), p.shape[-1] - 1)


# ---- the engine -------------------------------------------------------------------------------

class _Profiled:
    """The opt-in step profile of both engines: the C side adds wall and calling-thread CPU
    seconds per part into ``self._prof`` through ``self._model.prof``."""

    PROFILE_PARTS = ("linear", "attention", "other", "head")
    _prof: np.ndarray | None = None
    _model: Any = None

    def profile(self, on: bool = True) -> None:
        """Start (zeroed) or stop timing the parts of each C call (:meth:`profile_result`)."""
        self._prof = np.zeros(2 * len(self.PROFILE_PARTS), np.float64) if on else None
        if self._model is not None:
            self._model.prof = _ptr(self._prof) if on else None

    def profile_result(self) -> dict[str, tuple[float, float]]:
        """``{part: (wall seconds, calling-thread CPU seconds)}`` since :meth:`profile`."""
        if self._prof is None:
            return {}
        return {p: (float(self._prof[2 * i]), float(self._prof[2 * i + 1]))
                for i, p in enumerate(self.PROFILE_PARTS)}


class Engine(_Profiled):
    """A packed decoder-only model, every layer of a step in one C call (module docstring).

    Build it with :meth:`from_packed_dir`. :meth:`forward` runs new tokens through the model
    (filling the KV cache) and returns the last position's logits; :meth:`generate` /
    :meth:`stream` decode greedily or by sampling.
    """

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None,
                 kernel_backend: str | None = None) -> None:
        self._lib = _lib()
        if threads is not None:
            native.set_num_threads(int(threads))
        directory, cfg = _packed_dir(directory)
        mtype = cfg.get("model_type")
        if mtype in ("bart", "mbart", "marian"):
            raise EngineError(f"model type {mtype!r} runs on the encoder-decoder engine: "
                              f"Engine.from_packed_dir(dir) returns it (Seq2SeqEngine)")
        if mtype not in SUPPORTED_MODEL_TYPES or cfg.get("is_encoder_decoder"):
            raise EngineError(f"model type {mtype!r} is not in the native engine (it runs "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}); use "
                              f"tbt.export.io.load_packed(dir) for this checkpoint")
        if cfg.get("hidden_act", "silu") != "silu":
            raise EngineError(f"hidden_act {cfg.get('hidden_act')!r}: the engine's MLP is SiLU")
        ck = _Checkpoint(directory)
        self.config, self.directory = cfg, directory
        d, nl = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        h = int(cfg["num_attention_heads"])
        nkv = int(cfg.get("num_key_value_heads") or h)
        hd = int(cfg.get("head_dim") or d // h)
        self.vocab_size = int(cfg["vocab_size"])
        self.max_positions = int(cfg.get("max_position_embeddings", 2048))
        if mtype in ("mistral", "qwen2") and cfg.get("sliding_window") and (
                mtype == "mistral" or cfg.get("use_sliding_window")):
            self.max_positions = min(self.max_positions, int(cfg["sliding_window"]))
        self.n_layers, self.d, self.n_heads, self.n_kv, self.head_dim = nl, d, h, nkv, hd
        self._keep: list[Any] = []

        lins: list[dict[str, _Linear | None]] = []
        inter = int(cfg["intermediate_size"])
        for i in range(nl):
            p = f"model.layers.{i}"
            srcs = {n: _linear_src(ck, f"{p}.self_attn.{n}_proj") for n in "qkvo"}
            srcs.update({n: _linear_src(ck, f"{p}.mlp.{n}_proj") for n in ("gate", "up", "down")})
            qkv = _fuse([srcs["q"], srcs["k"], srcs["v"]])
            gu = _fuse([srcs["gate"], srcs["up"]])
            row: dict[str, _Linear | None] = {
                "q": _Linear(qkv or srcs["q"], kernel_backend),
                "k": None if qkv else _Linear(srcs["k"], kernel_backend),
                "v": None if qkv else _Linear(srcs["v"], kernel_backend),
                "o": _Linear(srcs["o"], kernel_backend),
                "gate": _Linear(gu or srcs["gate"], kernel_backend),
                "up": None if gu else _Linear(srcs["up"], kernel_backend),
                "down": _Linear(srcs["down"], kernel_backend)}
            lins.append(row)
        self._lins = lins
        self.fused_qkv = lins[0]["k"] is None
        self.fused_gate_up = lins[0]["up"] is None

        self._norms = [(_f32(ck.get(f"model.layers.{i}.input_layernorm.weight")),
                        _f32(ck.get(f"model.layers.{i}.post_attention_layernorm.weight")))
                       for i in range(nl)]
        self._aqs = [_attention_quantizers(ck, f"model.layers.{i}.self_attn") for i in range(nl)]
        self._norm = _f32(ck.get("model.norm.weight"))
        self._eps = float(np.float32(cfg.get("rms_norm_eps", 1e-6)))

        emb = ck.layers.get("model.embed_tokens")
        self._emb_f = self._emb_p = self._emb_scale = None
        if emb is not None:
            self._emb_kind, self._emb_p, self._emb_scale = _packed_embedding(ck, emb)
        else:
            self._emb_kind = 0
            self._emb_f = _f32(ck.get("model.embed_tokens.weight").astype(np.float32))

        head = ck.lm_head
        self.head_format = head.get("format", "fp")
        name = head.get("name") or "lm_head"
        self._head_w = self._head_b = None
        self._head: _Linear | None = None
        if self.head_format == "packed":
            self._head = _Linear(_linear_src(ck, name), kernel_backend)
        elif self.head_format == "int8":  # dequantized: the float path's values
            w = ck.get(head["weight"]).astype(np.float32) * ck.get(head["scale"]).astype(
                np.float32)[:, None]
            self._head_w = _f32(w)
        elif ck.has(f"{name}.weight"):
            self._head_w = _f32(ck.get(f"{name}.weight").astype(np.float32))
        elif self._emb_f is not None and cfg.get("tie_word_embeddings", True):
            self._head_w = self._emb_f
        else:
            raise EngineError(f"no LM head weight ({name}.weight) in {ck.path}")
        if ck.has(f"{name}.bias") and self.head_format != "packed":
            self._head_b = _f32(ck.get(f"{name}.bias").astype(np.float32))
        self.inter = inter
        self.attn_scale = float(np.float32(hd ** -0.5))
        self.generation_config = self._generation_config()
        self._max_b = self._max_t = 0
        self._prof: np.ndarray | None = None
        self._model: _Model | None = None
        self._scratch: np.ndarray | None = None
        self._scratch_key = (0, 0, 0)
        self.position = 0  # tokens in the cache (every sequence of the batch)
        self.batch = 0
        self._pad: np.ndarray | None = None  # left padding of each sequence (int64 (B,))

    @classmethod
    def from_packed_dir(cls, directory: str | os.PathLike, **kw) -> Engine:
        """The engine for a :func:`~tbt.export.io.save_packed` directory (see :class:`Engine`).

        BART, mBART and Marian directories give the encoder-decoder engine,
        :class:`tbt.runtime.engine_s2s.Seq2SeqEngine`.

        Raises:
            EngineError: a model family or layer the engine does not run (the message names
                the alternative, ``tbt.export.io.load_packed``).
        """
        path = Path(directory) / "config.json"
        if cls is Engine and path.is_file():
            from tbt.runtime.engine_s2s import SEQ2SEQ_MODEL_TYPES, Seq2SeqEngine

            if json.loads(path.read_text()).get("model_type") in SEQ2SEQ_MODEL_TYPES:
                return Seq2SeqEngine(directory, **kw)  # type: ignore[return-value]
        return cls(directory, **kw)

    def _generation_config(self) -> dict[str, Any]:
        path = self.directory / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        eos = gen.get("eos_token_id", self.config.get("eos_token_id"))
        pad = gen.get("pad_token_id", self.config.get("pad_token_id"))
        return {"eos_token_id": eos, "bos_token_id": gen.get("bos_token_id",
                                                             self.config.get("bos_token_id")),
                "pad_token_id": pad}

    # -- buffers ---------------------------------------------------------------------------------
    def _allocate(self, batch: int, length: int) -> None:
        """KV caches for ``batch`` sequences of ``length`` positions (grown, never shrunk;
        rounded up to 16 positions)."""
        if batch <= self._max_b and length <= self._max_t and self._model is not None:
            return
        if length > self.max_positions:
            raise ValueError(f"{length} positions exceed the model's maximum "
                             f"({self.max_positions}, max_position_embeddings)")
        max_b = max(batch, self._max_b)
        max_t = min(self.max_positions, -(-max(length, self._max_t) // 16) * 16)
        shape = (max_b, self.n_kv, max_t, self.head_dim)
        self._caches = self._kv_buffers(shape)
        self._stats = [np.zeros(16, np.float64) for _ in range(self.n_layers)]
        self._rope = _rope_tables(self.config, self.head_dim, max_t)
        layers = (_Layer * self.n_layers)()
        for i, row in enumerate(self._lins):
            L = layers[i]
            L.ln1, L.ln2 = _ptr(self._norms[i][0]), _ptr(self._norms[i][1])
            for n, lin in row.items():
                if lin is not None:
                    setattr(L, n, lin.struct)
            L.aq_q, L.aq_k, L.aq_v, L.aq_p = self._aqs[i]
            kc, vc, kq, vq = self._caches[i]
            L.kc, L.vc, L.kq, L.vq, L.st = (_ptr(kc), _ptr(vc), _ptr(kq), _ptr(vq),
                                            _ptr(self._stats[i]))
            L.kc, L.vc = L.kc or None, L.vc or None
        m = _Model(n_layers=self.n_layers, d=self.d, n_heads=self.n_heads, n_kv=self.n_kv,
                   head_dim=self.head_dim, inter=self.inter, vocab=self.vocab_size,
                   max_t=max_t, max_b=max_b, eps=self._eps, attn_scale=self.attn_scale,
                   emb_kind=self._emb_kind, head_kind=1 if self._head is not None else 0,
                   emb_f=_ptr(self._emb_f), emb_p=_ptr(self._emb_p),
                   emb_scale=_ptr(self._emb_scale),
                   emb_stride=0 if self._emb_p is None else self._emb_p.shape[1],
                   norm_w=_ptr(self._norm), head_w=_ptr(self._head_w), head_b=_ptr(self._head_b),
                   rope_cos=_ptr(self._rope[0]), rope_sin=_ptr(self._rope[1]), rope_len=max_t,
                   layers=ctypes.addressof(layers))
        if self._head is not None:
            m.head = self._head.struct
        m.prof = _ptr(self._prof) if self._prof is not None else None
        self._layers_c, self._model = layers, m
        self._max_b, self._max_t = max_b, max_t
        self.position = 0

    def _kv_buffers(self, shape: tuple[int, ...]) -> list[list[np.ndarray | None]]:
        """Per layer [raw K, raw V, quantized K, quantized V], as the quantizer needs them
        (``tbt_kv_mode``, csrc/tbt_engine.h): no raw cache where the parameters are fixed; one
        quantized scratch pair shared by every layer where the whole cache is re-quantized
        each step (the paper's centred quantizer). Min/max keeps both, but writes raw rows only
        until its clipped range saturates: the pages of later positions are never touched."""
        shared: list[np.ndarray] = []
        out = []
        for i in range(self.n_layers):
            mode = self._lib.tbt_kv_mode(ctypes.byref(self._aqs[i][1]))
            if mode != self._lib.tbt_kv_mode(ctypes.byref(self._aqs[i][2])):
                mode = 1  # K and V differ (not written by tbt): every buffer, none shared
            raw = [None, None] if mode == 0 else [aligned_empty(shape, np.float32)
                                                  for _ in range(2)]
            if mode == 2:
                if not shared:
                    shared = [aligned_empty(shape, np.float32) for _ in range(2)]
                out.append(raw + shared)
            else:
                out.append(raw + [aligned_empty(shape, np.float32) for _ in range(2)])
        return out

    def _scratch_for(self, batch: int, t: int) -> np.ndarray:
        k0 = self._scratch_key
        if self._scratch is None or batch > k0[0] or t > k0[1] or self._max_t != k0[2]:
            key = (max(batch, k0[0]), max(t, k0[1]), self._max_t)  # the probs grow with max_t
            n = self._lib.tbt_dec_scratch_bytes(ctypes.byref(self._model), key[0], key[1])
            if n < 0:
                raise RuntimeError(f"tbt_dec_scratch_bytes failed ({n})")
            self._scratch, self._scratch_key = aligned_empty((int(n),), np.uint8), key
        return self._scratch

    def reset(self) -> None:
        """Forget the cached sequences (the next :meth:`forward` starts at position 0)."""
        self.position = 0

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, tokens: np.ndarray | Sequence, *, reserve: int = 0,
                pad: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Run new tokens ``(B, T)`` (or ``(T,)``) after the cached ones; returns the logits of
        the last position, float32 ``(B, vocab)``. ``reserve``: cache positions to allocate
        beyond these (so decoding does not re-allocate). A new batch size restarts the cache.
        ``pad`` (first call of a sequence only): the number of left-padding tokens of each row
        (masked as keys, position ids counted from the first real token, as transformers'
        generate does with an attention mask); it holds for the following calls.
        """
        tok = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).astype(np.int32))
        if tok.ndim == 1:
            tok = tok[None, :]
        if tok.ndim != 2 or tok.size == 0:
            raise ValueError(f"tokens must be (B, T) with B, T >= 1, got shape {tok.shape}")
        if tok.min() < 0 or tok.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got "
                             f"[{tok.min()}, {tok.max()}]")
        b, t = tok.shape
        if b != self.batch:
            self.position = 0
        pos0 = self.position
        if pad is not None:
            if pos0:
                raise ValueError("pad= is given with the first tokens of a sequence (position 0)")
            pad_a = np.ascontiguousarray(np.asarray(pad, dtype=np.int64).reshape(-1))
            if pad_a.shape != (b,) or pad_a.min() < 0 or pad_a.max() >= t:
                raise ValueError(f"pad must hold {b} counts in [0, {t}): every row needs a real "
                                 f"token")
            self._pad = pad_a if pad_a.any() else None
        elif pos0 == 0:
            self._pad = None
        need = pos0 + t + int(reserve)
        if self._model is None or b > self._max_b or need > self._max_t:
            if pos0:
                raise ValueError("the KV cache is full: call reset() or allocate more with "
                                 "forward(..., reserve=N) at the first call")
            self._allocate(b, need)
        scratch = self._scratch_for(b, t)
        logits = np.empty((b, self.vocab_size), dtype=np.float32)
        rc = self._lib.tbt_dec_forward_padded(ctypes.byref(self._model), _ptr(tok), b, t, pos0,
                                              _ptr(self._pad), _ptr(logits), _ptr(scratch),
                                              scratch.nbytes)
        if rc != 0:
            raise RuntimeError(f"tbt_dec_forward failed ({rc}): invalid arguments")
        self.position, self.batch = pos0 + t, b
        return logits

    # -- generation ------------------------------------------------------------------------------
    def stream(self, prompt: np.ndarray | Sequence, max_new_tokens: int = 32, *,
               min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               eos_token_id: int | Sequence[int] | None = -1,
               logits_hook: Callable[[np.ndarray], None] | None = None,
               attention_mask: np.ndarray | Sequence | None = None,
               pad_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield the next tokens ``(B,)`` one step at a time (prompt ``(B, T)`` or ``(T,)``, or
        a list of prompts of different lengths, left-padded: :meth:`pad_prompts`).

        Stops after ``max_new_tokens`` or when every sequence has produced an end-of-sequence
        token (``eos_token_id``; default the checkpoint's; None: never); a finished sequence
        repeats its end token. Before ``min_new_tokens`` the end tokens are suppressed.
        ``attention_mask`` ``(B, T)``: 0 for the left padding of a padded prompt (transformers'
        convention, ``padding_side="left"``).
        """
        cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
        prompt, pad = self.pad_prompts(prompt, attention_mask, pad_token_id)
        if max_new_tokens < 1:
            return
        if isinstance(eos_token_id, int) and eos_token_id == -1:
            eos_token_id = self.generation_config["eos_token_id"]
        eos = ([] if eos_token_id is None else
               [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        rng = np.random.default_rng(seed)
        self.reset()
        logits = self.forward(prompt, reserve=max_new_tokens, pad=pad)
        done = np.zeros(prompt.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            if i < min_new_tokens and eos:
                logits[:, eos] = -np.inf
            if logits_hook is not None:
                logits_hook(logits)
            nxt = sample_next(logits, cfg, rng).astype(np.int64)
            if eos:
                nxt = np.where(done, eos[0], nxt)
                done |= np.isin(nxt, eos)
            yield nxt
            if done.all() or i + 1 == max_new_tokens:
                return
            logits = self.forward(nxt[:, None])

    def pad_prompts(self, prompt: np.ndarray | Sequence,
                    attention_mask: np.ndarray | Sequence | None = None,
                    pad_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(B, T)`` int64 token ids and the left padding of each row (None: none).

        ``prompt``: ``(B, T)`` / ``(T,)`` ids, with ``attention_mask`` (1 = token, 0 = left
        padding; a 0 after a 1 is refused: the engine pads on the left only), or a list of
        prompts of different lengths, left-padded here with ``pad_token_id`` (default: the
        checkpoint's pad token, else its first end token, else 0)."""
        if isinstance(prompt, (list, tuple)) and prompt and np.ndim(prompt[0]) == 1 and \
                len({len(p) for p in prompt}) > 1:
            if attention_mask is not None:
                raise ValueError("give either prompts of different lengths or a padded batch "
                                 "with attention_mask, not both")
            if min(len(p) for p in prompt) < 1:
                raise ValueError("every prompt needs at least one token")
            if pad_token_id is None:
                g = self.generation_config
                eos = g["eos_token_id"]
                pad_token_id = g["pad_token_id"] if g["pad_token_id"] is not None else (
                    eos[0] if isinstance(eos, list) and eos else eos if eos is not None else 0)
            t = max(len(p) for p in prompt)
            ids = np.full((len(prompt), t), int(pad_token_id), dtype=np.int64)
            attention_mask = np.zeros((len(prompt), t), dtype=np.int64)
            for i, p in enumerate(prompt):
                ids[i, t - len(p):] = p
                attention_mask[i, t - len(p):] = 1
            prompt = ids
        prompt = np.asarray(prompt, dtype=np.int64)
        if prompt.ndim == 1:
            prompt = prompt[None, :]
        if attention_mask is None:
            return prompt, None
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != prompt.shape:
            raise ValueError(f"attention_mask {mask.shape} must match the prompt {prompt.shape}")
        pad = np.argmax(mask, axis=1)  # the first real token of each row
        if not mask.any(axis=1).all() or \
                (mask != (np.arange(mask.shape[1])[None, :] >= pad[:, None])).any():
            raise ValueError("attention_mask must be left padding (0 ... 0 1 ... 1, at least "
                             "one 1 per row): the engine pads on the left only")
        return prompt, (pad.astype(np.int64) if pad.any() else None)

    def generate(self, prompt: np.ndarray | Sequence, max_new_tokens: int = 32,
                 **kw) -> np.ndarray:
        """Prompt ``(B, T)`` (or ``(T,)``, or a list of prompts of different lengths) →
        ``(B, T + new)`` int64 token ids, left-padded like transformers' output (see
        :meth:`stream` for the options, :meth:`pad_prompts` for the padding)."""
        ragged = isinstance(prompt, (list, tuple)) and len(prompt) > 0
        one = np.ndim(prompt[0]) == 0 if ragged else np.ndim(prompt) == 1
        p2, pad = self.pad_prompts(prompt, kw.pop("attention_mask", None),
                                   kw.pop("pad_token_id", None))
        mask = None if pad is None else np.arange(p2.shape[1])[None, :] >= pad[:, None]
        new = list(self.stream(p2, max_new_tokens, attention_mask=mask, **kw))
        out = np.concatenate([p2, np.stack(new, axis=1)], axis=1) if new else p2.copy()
        return out[0] if one else out
