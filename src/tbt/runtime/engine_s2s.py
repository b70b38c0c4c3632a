"""Native engine for packed encoder-decoder checkpoints: BART, mBART, Marian.

:class:`Seq2SeqEngine` is the encoder-decoder sibling of :class:`tbt.runtime.engine.Engine`
(``Engine.from_packed_dir`` returns it for these model types). It reads the packed directory
with numpy (the same integrity checks), prepares every packed linear as the decoder-only engine
does, and drives ``csrc/engine_s2s.c``:

* :meth:`Seq2SeqEngine.encode` — ONE C call runs the whole encoder for a batch of sources
  (padded to the longest, with the attention mask), then computes every decoder layer's
  cross-attention K/V (projected and fake-quantized as TBT does) once per source and keeps them;
* :meth:`Seq2SeqEngine.step` — one C call per decoder step: learned/sinusoidal positions,
  embedding scale, LayerNorms (post-LN BART/Marian, pre-LN + final norms mBART), self-attention
  with a KV cache, cross-attention over the stored K/V with the sources' padding mask, the MLP
  (GELU / ReLU / SiLU), the LM head and ``final_logits_bias``;
* :meth:`Seq2SeqEngine.generate` — greedy, sampling and beam search with transformers'
  semantics (``decoder_start_token_id``, ``forced_bos/eos_token_id``, ``min_new_tokens``,
  ``no_repeat_ngram_size``, ``length_penalty``, ``early_stopping``).

No torch is imported. ``docs/engine.md`` describes the exactness against the torch backend.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tbt.runtime.engine import (_AQ, _F, _I32, _I64, _P, EngineError, SamplingConfig, _Checkpoint,
                                _f32, _fuse, _Lin, _lib, _Linear, _linear_src, _ptr,
                                _attention_quantizers, _packed_dir, _packed_embedding,
                                _Profiled, sample_next)
from tbt.runtime.kernels import native
from tbt.runtime.kernels.ref import aligned_empty

__all__ = ["Seq2SeqEngine", "SEQ2SEQ_MODEL_TYPES"]

SEQ2SEQ_MODEL_TYPES = ("bart", "mbart", "marian")
_ACTS = {"gelu": 0, "relu": 1, "silu": 2, "swish": 2}


class _S2SLayer(ctypes.Structure):
    _fields_ = [("ln_sa_w", _P), ("ln_sa_b", _P), ("ln_ca_w", _P), ("ln_ca_b", _P),
                ("ln_ff_w", _P), ("ln_ff_b", _P),
                *[(n, _Lin) for n in ("q", "k", "v", "o", "cq", "ck", "cv", "co", "fc1", "fc2")],
                ("aq", _AQ * 8), ("kc", _P), ("vc", _P), ("kq", _P), ("vq", _P), ("st", _P),
                ("xk", _P), ("xv", _P)]


class _S2SModel(ctypes.Structure):
    _fields_ = [*[(n, _I64) for n in ("enc_layers", "dec_layers", "d", "n_heads", "head_dim",
                                      "ffn_enc", "ffn_dec", "vocab", "max_t", "max_b", "max_s",
                                      "max_src", "n_pos")],
                ("eps", _F), ("attn_scale", _F), ("emb_mul", _F),
                ("pre_ln", _I32), ("act", _I32), ("emb_kind", _I32), ("head_kind", _I32),
                ("emb_f", _P), ("emb_p", _P), ("emb_scale", _P), ("emb_stride", _I64),
                *[(n, _P) for n in ("enc_pos", "dec_pos", "enc_lne_w", "enc_lne_b", "dec_lne_w",
                                    "dec_lne_b", "enc_lnf_w", "enc_lnf_b", "dec_lnf_w",
                                    "dec_lnf_b", "head_w", "head_b")],
                ("head", _Lin), ("enc", _P), ("dec", _P), ("calls", _P), ("prof", _P)]


def _s2s_lib() -> ctypes.CDLL:
    lib = _lib()
    if not hasattr(lib, "tbt_s2s_decode"):
        raise EngineError("tbt's C library was built without the encoder-decoder engine "
                          "(csrc/engine_s2s.c): rebuild it (pip install -e . --no-build-isolation)")
    if not getattr(lib, "_tbt_s2s_declared", False):
        lib.tbt_s2s_scratch_bytes.restype = _I64
        lib.tbt_s2s_scratch_bytes.argtypes = [_P, _I64, _I64, _I64]
        lib.tbt_s2s_encode.restype = ctypes.c_int
        lib.tbt_s2s_encode.argtypes = [_P, _P, _P, _I64, _I64, _I64, _P, _I64]
        lib.tbt_s2s_decode.restype = ctypes.c_int
        lib.tbt_s2s_decode.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64]
        lib.tbt_s2s_reorder.restype = ctypes.c_int
        lib.tbt_s2s_reorder.argtypes = [_P, _P, _I64, _I64, _P, _I64]
        lib._tbt_s2s_declared = True
    return lib


def _log_softmax32(x: np.ndarray) -> np.ndarray:
    """float32 log_softmax in torch's order: x - max - log(sum(exp(x - max)))."""
    m = x.max(axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True, dtype=np.float32))


class Seq2SeqEngine(_Profiled):
    """A packed BART / mBART / Marian model on the native engine (module docstring)."""


    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None,
                 kernel_backend: str | None = None) -> None:
        self._lib = _s2s_lib()
        if threads is not None:
            native.set_num_threads(int(threads))
        directory, cfg = _packed_dir(directory)
        mtype = cfg.get("model_type")
        if mtype not in SEQ2SEQ_MODEL_TYPES:
            raise EngineError(f"model type {mtype!r} is not in the native encoder-decoder engine "
                              f"(it runs {', '.join(SEQ2SEQ_MODEL_TYPES)}); use "
                              f"tbt.export.io.load_packed(dir) for this checkpoint")
        act = cfg.get("activation_function", "gelu")
        if act not in _ACTS:
            raise EngineError(f"activation_function {act!r} is not in the engine (gelu, relu, "
                              f"silu); use tbt.export.io.load_packed")
        h = int(cfg["decoder_attention_heads"])
        if int(cfg["encoder_attention_heads"]) != h:
            raise EngineError("encoder and decoder head counts differ: not in the engine; use "
                              "tbt.export.io.load_packed")
        if mtype == "marian" and (not cfg.get("share_encoder_decoder_embeddings", True) or
                                  int(cfg.get("decoder_vocab_size") or cfg["vocab_size"])
                                  != int(cfg["vocab_size"])):
            raise EngineError("a Marian model with separate source and target vocabularies is "
                              "not in the engine; use tbt.export.io.load_packed")
        ck = _Checkpoint(directory)
        self.config, self.directory, self.model_type = cfg, directory, mtype
        self.is_encoder_decoder = True
        d = int(cfg["d_model"])
        self.d, self.n_heads, self.head_dim = d, h, d // h
        self.enc_layers, self.dec_layers = int(cfg["encoder_layers"]), int(cfg["decoder_layers"])
        self.vocab_size = int(cfg["vocab_size"])
        self._keep: list[Any] = []

        def attn(prefix: str, cross: bool) -> dict[str, _Linear | None]:
            srcs = {n: _linear_src(ck, f"{prefix}.{n}_proj") for n in "qkv"}
            srcs["o"] = _linear_src(ck, f"{prefix}.out_proj")
            if cross:  # q reads the decoder state, k|v the encoder output
                kv = _fuse([srcs["k"], srcs["v"]])
                return {"cq": _Linear(srcs["q"], kernel_backend),
                        "ck": _Linear(kv or srcs["k"], kernel_backend),
                        "cv": None if kv else _Linear(srcs["v"], kernel_backend),
                        "co": _Linear(srcs["o"], kernel_backend)}
            qkv = _fuse([srcs["q"], srcs["k"], srcs["v"]])
            return {"q": _Linear(qkv or srcs["q"], kernel_backend),
                    "k": None if qkv else _Linear(srcs["k"], kernel_backend),
                    "v": None if qkv else _Linear(srcs["v"], kernel_backend),
                    "o": _Linear(srcs["o"], kernel_backend)}

        def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
            return _f32(ck.get(f"{name}.weight").astype(np.float32)), \
                _f32(ck.get(f"{name}.bias").astype(np.float32))

        self._layers: list[tuple[str, dict, dict, list]] = []
        for side, n in (("encoder", self.enc_layers), ("decoder", self.dec_layers)):
            for i in range(n):
                p = f"model.{side}.layers.{i}"
                lins = attn(f"{p}.self_attn", False)
                lins["fc1"] = _Linear(_linear_src(ck, f"{p}.fc1"), kernel_backend)
                lins["fc2"] = _Linear(_linear_src(ck, f"{p}.fc2"), kernel_backend)
                norms = {"sa": norm(f"{p}.self_attn_layer_norm"),
                         "ff": norm(f"{p}.final_layer_norm")}
                aqs = _attention_quantizers(ck, f"{p}.self_attn")
                if side == "decoder":
                    lins.update(attn(f"{p}.encoder_attn", True))
                    norms["ca"] = norm(f"{p}.encoder_attn_layer_norm")
                    aqs = aqs + _attention_quantizers(ck, f"{p}.encoder_attn")
                else:
                    aqs = aqs + [_AQ() for _ in range(4)]
                self._layers.append((side, lins, norms, aqs))

        def opt_norm(name: str):
            return norm(name) if ck.has(f"{name}.weight") else (None, None)

        self._lne = {s: opt_norm(f"model.{s}.layernorm_embedding") for s in ("encoder", "decoder")}
        self._lnf = {s: opt_norm(f"model.{s}.layer_norm") for s in ("encoder", "decoder")}
        self.pre_ln = mtype == "mbart"
        offset = 0 if mtype == "marian" else 2
        pos = {s: _f32(ck.get(f"model.{s}.embed_positions.weight").astype(np.float32)[offset:])
               for s in ("encoder", "decoder")}
        self._pos = pos
        self.max_positions = min(p.shape[0] for p in pos.values())
        self.emb_mul = float(np.float32(np.sqrt(d))) if cfg.get("scale_embedding") else 1.0

        # embeddings: one table for the encoder, the decoder (and a tied head)
        self._emb_f = self._emb_p = self._emb_scale = None
        emb = ck.layers.get("model.decoder.embed_tokens")
        enc_emb = ck.layers.get("model.encoder.embed_tokens")
        if emb is not None:
            if (enc_emb is None or ck.aliases.get(enc_emb["packed"], enc_emb["packed"]) !=
                    ck.aliases.get(emb["packed"], emb["packed"])):
                raise EngineError("the encoder and decoder embeddings differ: not in the engine; "
                                  "use tbt.export.io.load_packed")
            self._emb_kind, self._emb_p, self._emb_scale = _packed_embedding(ck, emb)
        else:
            self._emb_kind = 0
            name = next((n for n in ("model.shared.weight", "model.decoder.embed_tokens.weight")
                         if ck.has(n)), None)
            if name is None:
                raise EngineError(f"no token embedding in {ck.path}")
            self._emb_f = _f32(ck.get(name).astype(np.float32))

        head = ck.lm_head
        self.head_format = head.get("format", "fp")
        hname = head.get("name") or "lm_head"
        self._head_w = None
        self._head: _Linear | None = None
        if self.head_format == "packed":
            self._head = _Linear(_linear_src(ck, hname), kernel_backend)
        elif self.head_format == "int8":
            self._head_w = _f32(ck.get(head["weight"]).astype(np.float32) *
                                ck.get(head["scale"]).astype(np.float32)[:, None])
        elif ck.has(f"{hname}.weight"):
            self._head_w = _f32(ck.get(f"{hname}.weight").astype(np.float32))
        elif self._emb_f is not None and cfg.get("tie_word_embeddings", True):
            self._head_w = self._emb_f
        else:
            raise EngineError(f"no LM head weight ({hname}.weight) in {ck.path}")
        bias = np.zeros(self.vocab_size, np.float32)
        has_bias = False
        if ck.has("final_logits_bias"):
            bias = ck.get("final_logits_bias").astype(np.float32).reshape(-1)
            has_bias = True
        if ck.has(f"{hname}.bias") and self.head_format != "packed":
            raise EngineError("an LM head bias besides final_logits_bias is not in the engine")
        self._head_b = _f32(bias) if has_bias else None

        self.attn_scale = float(np.float32(self.head_dim ** -0.5))
        self.generation_config = self._generation_config()
        self._calls = np.zeros(4, np.int64)
        self._prof: np.ndarray | None = None
        self._model: _S2SModel | None = None
        self._dims = (0, 0, 0, 0)  # max_b, max_t, max_s, max_src
        self._scratch: np.ndarray | None = None
        self._scratch_key = (0, 0, 0)
        self._src: tuple[int, int, int] | None = None  # n_src, S, expand of the encoded batch
        self.position = 0

    @classmethod
    def from_packed_dir(cls, directory: str | os.PathLike, **kw) -> Seq2SeqEngine:
        return cls(directory, **kw)

    def _generation_config(self) -> dict[str, Any]:
        import json

        path = self.directory / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        c = self.config

        def get(key: str, default: Any = None) -> Any:
            v = gen.get(key)
            return c.get(key, default) if v is None else v

        return {k: get(k, dflt) for k, dflt in (
            ("eos_token_id", None), ("bos_token_id", None), ("pad_token_id", None),
            ("decoder_start_token_id", None), ("forced_bos_token_id", None),
            ("forced_eos_token_id", None), ("num_beams", 1), ("length_penalty", 1.0),
            ("early_stopping", False), ("no_repeat_ngram_size", 0), ("min_length", 0))}

    @property
    def call_counts(self) -> dict[str, int]:
        """C calls so far: encoder runs, cross-attention K/V projections (one per decoder layer
        and encode), decoder steps, cache reorders."""
        return dict(zip(("encode", "cross_kv", "step", "reorder"),
                        (int(v) for v in self._calls)))

    # -- buffers ---------------------------------------------------------------------------------
    def _allocate(self, rows: int, length: int, src_len: int, n_src: int) -> None:
        mb, mt, ms, mx = self._dims
        if self._model is not None and rows <= mb and length <= mt and src_len <= ms \
                and n_src <= mx:
            return
        if length > self.max_positions or src_len > self.max_positions:
            raise ValueError(f"{max(length, src_len)} positions exceed the model's maximum "
                             f"({self.max_positions}, max_position_embeddings)")
        mb, mx = max(rows, mb), max(n_src, mx)
        mt = min(self.max_positions, -(-max(length, mt) // 16) * 16)
        ms = max(src_len, ms)
        H, D = self.n_heads, self.head_dim
        layers = (_S2SLayer * (self.enc_layers + self.dec_layers))()
        self._bufs = []
        for i, (side, lins, norms, aqs) in enumerate(self._layers):
            L = layers[i]
            L.ln_sa_w, L.ln_sa_b = (_ptr(a) for a in norms["sa"])
            L.ln_ff_w, L.ln_ff_b = (_ptr(a) for a in norms["ff"])
            if "ca" in norms:
                L.ln_ca_w, L.ln_ca_b = (_ptr(a) for a in norms["ca"])
            for n, lin in lins.items():
                if lin is not None:
                    setattr(L, n, lin.struct)
            for j, q in enumerate(aqs):
                L.aq[j] = q
            if side == "decoder":
                caches = [aligned_empty((mb, H, mt, D), np.float32) for _ in range(4)]
                st = np.zeros(16, np.float64)
                xk = aligned_empty((mx, H, D, ms), np.float32)
                xv = aligned_empty((mx, H, ms, D), np.float32)
                self._bufs.append((caches, st, xk, xv))
                L.kc, L.vc, L.kq, L.vq = (_ptr(c) for c in caches)
                L.st, L.xk, L.xv = _ptr(st), _ptr(xk), _ptr(xv)
        F = {s: int(self.config[f"{s}_ffn_dim"]) for s in ("encoder", "decoder")}
        lne, lnf = self._lne, self._lnf
        m = _S2SModel(enc_layers=self.enc_layers, dec_layers=self.dec_layers, d=self.d,
                      n_heads=H, head_dim=D, ffn_enc=F["encoder"], ffn_dec=F["decoder"],
                      vocab=self.vocab_size, max_t=mt, max_b=mb, max_s=ms, max_src=mx,
                      n_pos=self.max_positions, eps=float(np.float32(1e-5)),
                      attn_scale=self.attn_scale, emb_mul=self.emb_mul, pre_ln=int(self.pre_ln),
                      act=_ACTS[self.config.get("activation_function", "gelu")],
                      emb_kind=self._emb_kind, head_kind=1 if self._head is not None else 0,
                      emb_f=_ptr(self._emb_f), emb_p=_ptr(self._emb_p),
                      emb_scale=_ptr(self._emb_scale),
                      emb_stride=0 if self._emb_p is None else self._emb_p.shape[1],
                      enc_pos=_ptr(self._pos["encoder"]), dec_pos=_ptr(self._pos["decoder"]),
                      enc_lne_w=_ptr(lne["encoder"][0]), enc_lne_b=_ptr(lne["encoder"][1]),
                      dec_lne_w=_ptr(lne["decoder"][0]), dec_lne_b=_ptr(lne["decoder"][1]),
                      enc_lnf_w=_ptr(lnf["encoder"][0]), enc_lnf_b=_ptr(lnf["encoder"][1]),
                      dec_lnf_w=_ptr(lnf["decoder"][0]), dec_lnf_b=_ptr(lnf["decoder"][1]),
                      head_w=_ptr(self._head_w), head_b=_ptr(self._head_b),
                      enc=ctypes.addressof(layers),
                      dec=ctypes.addressof(layers) + self.enc_layers * ctypes.sizeof(_S2SLayer),
                      calls=_ptr(self._calls))
        if self._head is not None:
            m.head = self._head.struct
        m.prof = _ptr(self._prof) if self._prof is not None else None
        self._layers_c, self._model = layers, m
        self._dims = (mb, mt, ms, mx)
        self._src = None
        self.position = 0

    def _scratch_for(self, n_src: int, S: int, rows: int) -> np.ndarray:
        k0 = self._scratch_key
        key = (max(n_src, k0[0]), max(S, k0[1]), max(rows, k0[2]))
        if self._scratch is None or key != k0 or getattr(self, "_scratch_dims", None) != \
                self._dims:
            n = self._lib.tbt_s2s_scratch_bytes(ctypes.byref(self._model), *key)
            if n < 0:
                raise RuntimeError(f"tbt_s2s_scratch_bytes failed ({n})")
            mb, mt, _, _ = self._dims
            n = max(int(n), mb * self.n_heads * mt * self.head_dim * 4)  # the reorder's copy
            self._scratch, self._scratch_key = aligned_empty((n,), np.uint8), key
            self._scratch_dims = self._dims
        return self._scratch

    # -- the two C calls -------------------------------------------------------------------------
    def encode(self, input_ids: np.ndarray | Sequence, attention_mask: np.ndarray | None = None,
               *, expand: int = 1, max_new_tokens: int = 32) -> None:
        """Run the encoder on sources ``(B, S)`` (padding marked 0 in ``attention_mask``) and
        store every decoder layer's cross-attention K/V; ``expand`` decoder rows per source
        (beams); the decoder cache is sized for ``max_new_tokens + 1`` positions."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.size == 0:
            raise ValueError(f"input_ids must be (B, S) with B, S >= 1, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not (mask != 0).any(axis=1).all():
            raise ValueError("every source needs at least one unmasked token")
        B, S = ids.shape
        self._allocate(B * expand, max_new_tokens + 1, S, B)
        tok = np.ascontiguousarray(ids.astype(np.int32))
        self._mask = np.ascontiguousarray((mask != 0).astype(np.int32))
        scratch = self._scratch_for(B, S, B * expand)
        rc = self._lib.tbt_s2s_encode(ctypes.byref(self._model), _ptr(tok), _ptr(self._mask), B,
                                      S, expand, _ptr(scratch), scratch.nbytes)
        if rc != 0:
            raise RuntimeError(f"tbt_s2s_encode failed ({rc}): invalid arguments")
        self._src = (B, S, expand)
        self.position = 0

    def step(self, tokens: np.ndarray | Sequence) -> np.ndarray:
        """One decoder step for the ``B * expand`` rows (one token each) after :meth:`encode`;
        returns the logits ``(rows, vocab)`` float32."""
        if self._src is None:
            raise ValueError("call encode() first")
        n_src, S, expand = self._src
        tok = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1).astype(np.int32))
        if tok.size != n_src * expand:
            raise ValueError(f"{tok.size} tokens for {n_src * expand} decoder rows")
        if self.position >= self._dims[1]:
            raise ValueError("the decoder cache is full: encode again with a larger "
                             "max_new_tokens")
        scratch = self._scratch_for(n_src, S, tok.size)
        logits = np.empty((tok.size, self.vocab_size), np.float32)
        rc = self._lib.tbt_s2s_decode(ctypes.byref(self._model), _ptr(tok), tok.size,
                                      self.position, n_src, S, _ptr(self._mask), _ptr(logits),
                                      _ptr(scratch), scratch.nbytes)
        if rc != 0:
            raise RuntimeError(f"tbt_s2s_decode failed ({rc}): invalid arguments")
        self.position += 1
        return logits

    def reorder(self, rows: np.ndarray) -> None:
        """Row r of the self-attention caches becomes old row ``rows[r]`` (beam search)."""
        idx = np.ascontiguousarray(np.asarray(rows, dtype=np.int32))
        scratch = self._scratch
        rc = self._lib.tbt_s2s_reorder(ctypes.byref(self._model), _ptr(idx), idx.size,
                                       self.position, _ptr(scratch), scratch.nbytes)
        if rc != 0:
            raise RuntimeError(f"tbt_s2s_reorder failed ({rc}): invalid arguments")

    # -- generation ------------------------------------------------------------------------------
    def _options(self, kw: dict[str, Any]) -> dict[str, Any]:
        g = self.generation_config
        out = {}
        for k in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
                  "pad_token_id", "num_beams", "length_penalty", "early_stopping",
                  "no_repeat_ngram_size", "min_length"):
            out[k] = kw.pop(k) if k in kw else g[k]
        eos = kw.pop("eos_token_id", -1)
        if isinstance(eos, int) and eos == -1:
            eos = g["eos_token_id"]
        out["eos"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if out["decoder_start_token_id"] is None:
            out["decoder_start_token_id"] = g["bos_token_id"]
        if out["decoder_start_token_id"] is None:
            raise ValueError("no decoder_start_token_id in the checkpoint's configuration: "
                             "pass decoder_start_token_id=")
        return out

    def _process(self, logits: np.ndarray, seqs: np.ndarray, cur_len: int, max_length: int,
                 min_new: int, o: dict[str, Any]) -> np.ndarray:
        """transformers' logits processors in their order: min_length, min_new_tokens,
        no_repeat_ngram, forced BOS, forced EOS."""
        eos = o["eos"]
        if eos and (cur_len < (o["min_length"] or 0) or cur_len - 1 < min_new):
            logits[:, eos] = -np.inf
        n = o["no_repeat_ngram_size"] or 0
        if n and cur_len + 1 >= n:
            for r in range(seqs.shape[0]):
                s = seqs[r, :cur_len].tolist()
                prefix = tuple(s[cur_len - n + 1:])
                banned = {s[i + n - 1] for i in range(cur_len - n + 1)
                          if tuple(s[i:i + n - 1]) == prefix}
                if banned:
                    logits[r, list(banned)] = -np.inf
        if cur_len == 1 and o["forced_bos_token_id"] is not None:
            logits[:] = -np.inf
            logits[:, o["forced_bos_token_id"]] = 0
        if cur_len == max_length - 1 and o["forced_eos_token_id"] is not None:
            fe = o["forced_eos_token_id"]
            logits[:] = -np.inf
            logits[:, fe if isinstance(fe, int) else list(fe)] = 0
        return logits

    def _request(self, input_ids, max_new_tokens: int, kw: dict) -> tuple[np.ndarray, dict]:
        """The sources as a (B, S) int64 array and the decoding options of one call."""
        o = self._options(kw)
        if kw:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kw))}")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return ids, o

    def generate(self, input_ids: np.ndarray | Sequence, attention_mask: np.ndarray | None = None,
                 max_new_tokens: int = 32, *, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, **kw) -> np.ndarray:
        """Sources ``(B, S)`` → decoder sequences ``(B, 1 + n)`` int64 (the start token first),
        as transformers' ``generate`` returns them: greedy or sampling (``num_beams=1``) or beam
        search (``num_beams > 1``, ``length_penalty``, ``early_stopping``). Defaults come from
        the checkpoint's generation_config.json."""
        ids, o = self._request(input_ids, max_new_tokens, kw)
        nb = int(o["num_beams"] or 1)
        if nb > 1:
            if do_sample:
                raise ValueError("beam sampling is not in the engine: num_beams=1 with "
                                 "do_sample, or beam search without")
            return self._beam_search(ids, attention_mask, max_new_tokens, min_new_tokens, nb, o)
        start = np.full((ids.shape[0], 1), o["decoder_start_token_id"], np.int64)
        new = list(self._stream(ids, attention_mask, max_new_tokens, min_new_tokens,
                                SamplingConfig(do_sample, temperature, top_k, top_p), seed, o))
        return np.concatenate([start, *[t[:, None] for t in new]], axis=1)

    def stream(self, input_ids: np.ndarray | Sequence, attention_mask: np.ndarray | None = None,
               max_new_tokens: int = 32, *, min_new_tokens: int = 0, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, **kw):
        """Yield the next tokens ``(B,)`` one decoder step at a time (greedy or sampling; the
        options of :meth:`generate`, without beams). A finished row is fed ``pad_token_id``
        (as transformers does) and yields it; stops when every row has ended."""
        ids, o = self._request(input_ids, max_new_tokens, kw)
        yield from self._stream(ids, attention_mask, max_new_tokens, min_new_tokens,
                                SamplingConfig(do_sample, temperature, top_k, top_p), seed, o)

    def _stream(self, ids, attention_mask, max_new_tokens, min_new_tokens, cfg, seed, o):
        rng = np.random.default_rng(seed)
        B = ids.shape[0]
        self.encode(ids, attention_mask, expand=1, max_new_tokens=max_new_tokens)
        max_length = 1 + max_new_tokens
        seqs = np.full((B, max_length), o["decoder_start_token_id"], np.int64)
        pad = o["pad_token_id"] if o["pad_token_id"] is not None else (o["eos"] or [0])[0]
        done = np.zeros(B, bool)
        cur = 1
        while cur < max_length:
            logits = self.step(seqs[:, cur - 1])
            logits = self._process(logits, seqs, cur, max_length, min_new_tokens, o)
            nxt = sample_next(logits, cfg, rng).astype(np.int64)
            nxt = np.where(done, pad, nxt)
            seqs[:, cur] = nxt
            cur += 1
            yield nxt
            if o["eos"]:
                done |= np.isin(nxt, o["eos"])
                if done.all():
                    return

    def _beam_search(self, ids: np.ndarray, attention_mask: np.ndarray | None,
                     max_new_tokens: int, min_new: int, nb: int, o: dict[str, Any]) -> np.ndarray:
        """transformers' (v5, vectorised) beam search, step for step: the same B * nb rows go
        through the model every step, so the per-tensor quantizers see what torch's see."""
        B = ids.shape[0]
        eos = o["eos"]
        lp = float(o["length_penalty"] if o["length_penalty"] is not None else 1.0)
        early = o["early_stopping"]
        max_length = 1 + max_new_tokens
        prompt = 1
        self.encode(ids, attention_mask, expand=nb, max_new_tokens=max_new_tokens)
        pad = o["pad_token_id"]
        fill = (pad if pad else eos[0]) if eos else -1
        V = self.vocab_size
        k_keep = max(2, 1 + len(eos)) * nb
        running = np.full((B, nb, max_length), fill, np.int64)
        running[:, :, 0] = o["decoder_start_token_id"]
        seqs = running.copy()
        run_scores = np.zeros((B, nb), np.float32)
        run_scores[:, 1:] = -1e9
        scores = np.full((B, nb), -1e9, np.float32)
        finished = np.zeros((B, nb), bool)
        unsat = np.ones((B, 1), bool)
        run_bidx = np.full((B, nb, max_length - 1), -1, np.int64)
        bidx = run_bidx.copy()
        top_mask = np.arange(k_keep) < nb
        cur = 1
        f32 = np.float32
        while True:
            flat = running[:, :, :cur].reshape(B * nb, cur)
            logits = self.step(flat[:, cur - 1])
            logp = _log_softmax32(logits)
            logp = self._process(logp, flat, cur, max_length, min_new, o)
            acc = (logp.reshape(B, nb, V) + run_scores[:, :, None]).reshape(B, nb * V)
            # torch.topk: the largest, ties by the lower index
            order = np.argsort(-acc, axis=1, kind="stable")[:, :k_keep]
            top_lp = np.take_along_axis(acc, order, axis=1)
            beam = order // V
            tok = order % V
            top_seq = np.take_along_axis(running, beam[:, :, None], axis=1)
            top_seq[:, :, cur] = tok
            top_bidx = np.take_along_axis(run_bidx, beam[:, :, None], axis=1)
            top_bidx[:, :, cur - prompt] = beam + np.arange(B)[:, None] * nb
            hits = np.zeros((B, k_keep), bool)
            if cur + 1 >= max_length:
                hits[:] = True
            if eos:
                hits |= np.isin(tok, eos)
            # the running beams of the next step
            run_lp = (top_lp + hits.astype(f32) * f32(-1.0e9)).astype(f32)
            nxt = np.argsort(-run_lp, axis=1, kind="stable")[:, :nb]
            running = np.take_along_axis(top_seq, nxt[:, :, None], axis=1)
            run_scores = np.take_along_axis(run_lp, nxt, axis=1)
            run_bidx = np.take_along_axis(top_bidx, nxt[:, :, None], axis=1)
            # the finished beams
            just = hits & top_mask[None, :]
            fl = (top_lp / f32((cur + 1 - prompt) ** lp)).astype(f32)
            full = finished.all(axis=1, keepdims=True) & (early is True)
            fl = fl + full.astype(f32) * f32(-1.0e9)
            fl = fl + (~unsat).astype(f32) * f32(-1.0e9)
            fl = (fl + (~just).astype(f32) * f32(-1.0e9)).astype(f32)
            m_seq = np.concatenate([seqs, top_seq], axis=1)
            m_sc = np.concatenate([scores, fl], axis=1)
            m_bi = np.concatenate([bidx, top_bidx], axis=1)
            m_fin = np.concatenate([finished, just], axis=1)
            sel = np.argsort(-m_sc, axis=1, kind="stable")[:, :nb]
            seqs = np.take_along_axis(m_seq, sel[:, :, None], axis=1)
            scores = np.take_along_axis(m_sc, sel, axis=1)
            bidx = np.take_along_axis(m_bi, sel[:, :, None], axis=1)
            finished = np.take_along_axis(m_fin, sel, axis=1)
            self.reorder(run_bidx[:, :, cur - prompt].reshape(-1))
            cur += 1
            # early-stop heuristic
            if early == "never" and lp > 0.0:
                best_len = max_length - prompt
            else:
                best_len = cur - prompt
            best_run = run_scores[:, :1] / f32(best_len ** lp)
            worst = np.where(finished, scores.min(axis=1, keepdims=True), f32(-1.0e9))
            unsat = unsat & (best_run > worst).any(axis=-1, keepdims=True)
            open_beam = not (finished.all() and early is True)
            if not (unsat.any() and open_beam and not hits.all()):
                break
        out_len = prompt + int(((bidx[:, 0, :] + 1) != 0).sum(axis=1).max())
        return seqs[:, 0, :out_len]
