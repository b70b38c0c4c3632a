"""The packed inference modules: a converted model's 1/2-bit layers, in torch.

How it works
------------
A :class:`PackedLinear` holds what the packed file stores for one linear layer: the integer
codes packed along ``in_features`` (``uint8`` buffer ``packed``, the format's ``ternary_2bit``
or ``binary_1bit`` packing, ``ceil(K/4)`` or ``ceil(K/8)`` bytes per row), one float32 scale
per row (``scale``), the FP bias, and the trained activation-quantizer module (``act_quant``).
:class:`PackedEmbedding` holds an embedding the same way (``embed_scale`` kept).
:func:`tbt.export.convert.convert_model` builds them from a fake-quantized model;
``tbt.export.io.load_packed`` builds them from a file.

Each module runs on one of two backends (:func:`set_backend`):

* ``torch``: the forward unpacks the codes once, dequantizes them exactly as the fake quantizer
  does (``dequantize(codes, scale, dtype)``) and caches the float weight in a non-persistent
  attribute (cleared on ``load_state_dict`` and ``.to()``). In eval mode a converted model's
  logits equal the fake-quantized model's bit for bit (float32), except on an exact-zero latent
  weight of the ``tbt``/``released`` binary quantizer, which the format stores as ``+α``
  (``docs/format.md`` §4).
* ``native``: the layer is one :class:`tbt.runtime.linear.PackedLinearNP`, the torch-free
  runtime's packed linear, built once from the buffers: the input is quantized exactly as the
  trained quantizer does (its :class:`~tbt.runtime.linear.ActSpec`, from the quantizer's
  ``runtime_spec()``), the kernel computes the exact integer accumulator on the packed codes and
  applies the activation scale/offset, the row scale α and the bias in float32 (one C call on
  the native kernels when the quantizer has a C twin, else the numpy quantizer then the
  kernel). Only the float rescale differs from the torch path (rounding order), so logits
  agree to float32 rounding, not bit for bit. Layers with no kernel (float activations, a
  quantizer without an ``ActSpec``, per-group scales) stay on the torch path and the reason is
  logged. :class:`PackedEmbedding` then looks up and dequantizes only the gathered rows instead
  of caching the whole float matrix (same values).

There is no other way to run a packed layer: the per-layer runtime, this torch module and the
native engine (``tbt.runtime.engine``) all go through ``PackedLinearNP``'s plan.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbt.export.format import Packing
from tbt.export.pack import pack, unpack
from tbt.inference.cached import CachedModule, float_linear
from tbt.quant.weight import dequantize
from tbt.runtime.linear import ActSpec, PackedLinearNP, kernel_unavailable_reason

__all__ = ["PackedLinear", "PackedEmbedding", "packing_for_bits", "pack_codes", "unpack_codes",
           "act_spec_of", "set_backend", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "torch")  # module backends; "auto": native if the C library loads


def act_spec_of(act_quant: nn.Module | None) -> ActSpec | None:
    """The runtime description of a trained activation quantizer (None for float inputs).

    Raises:
        KeyError: a quantizer class without its own ``runtime_spec()``.
    """
    if act_quant is None:
        return None
    # defined on the class itself: a subclass of ElasticQuantizer (BiT's shift, LSQ) computes
    # something else and has no runtime kernel unless it says so
    fn = type(act_quant).__dict__.get("runtime_spec")
    if fn is None:
        raise KeyError(f"no ActSpec for activation quantizer {type(act_quant).__name__}; "
                       f"give the class a runtime_spec() method")
    return fn(act_quant)


def packing_for_bits(bits: int) -> Packing:
    if bits == 2:
        return Packing.TERNARY_2BIT
    if bits == 1:
        return Packing.BINARY_1BIT
    raise ValueError(f"no packing for {bits}-bit weights (1 or 2 only)")


def pack_codes(codes: Tensor, packing: Packing) -> Tensor:
    """int8 codes ``(N, K)`` -> uint8 ``(N, row_bytes)`` (the normative numpy packer)."""
    return torch.from_numpy(np.ascontiguousarray(pack(codes.cpu().numpy(), packing)))


def unpack_codes(packed: Tensor, packing: Packing, k: int) -> Tensor:
    """uint8 ``(N, row_bytes)`` -> int8 codes ``(N, K)`` on ``packed``'s device."""
    q = unpack(packed.detach().cpu().numpy(), packing, k)
    return torch.from_numpy(np.ascontiguousarray(q)).to(packed.device)


def _row_scale(t: Tensor) -> Tensor:
    """A stored scale/offset as a 2-D ``(N, 1|G)`` tensor for :func:`dequantize`."""
    t = t.to(torch.float32)
    return t[:, None] if t.dim() == 1 else t


class _PackedBase(CachedModule):
    """Shared pieces: packed codes + per-row scale buffers and the lazily cached float weight."""

    CACHES = ("_w_cache", "_rt")  # the float weight; the kernel-layout layer (native backend)

    packing: Packing
    k: int

    def _init_packed(self, packed: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> None:
        self.bits = bits
        self.packing = packing_for_bits(bits)
        self.weight_dtype = dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", None)  # DLT's per-row/group shift γ (added after α·code)
        self._w_cache: Tensor | None = None
        self._rt: PackedLinearNP | None = None
        self.backend = "torch"

    def dequantized_weight(self) -> Tensor:
        """The float ``(N, K)`` weight, ``dequantize(codes, scale[:, None], weight_dtype)``."""
        if self._w_cache is None or self._w_cache.device != self.packed.device:
            codes = unpack_codes(self.packed, self.packing, self.k)
            offset = None if self.offset is None else _row_scale(self.offset)
            w = dequantize(codes, _row_scale(self.scale), self.weight_dtype, offset)
            if getattr(self, "w_layout_t", False):  # same memory layout as the fake-quant weight
                w = w.t().contiguous().t()
            self._w_cache = w
        return self._w_cache

    def packed_bits(self) -> int:
        """Bits of the packed codes (padding included) plus the scales."""
        return self.packed.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8


class PackedLinear(_PackedBase):
    """``y = F.linear(act_quant(x), α ⊙ unpack(codes), b)``: a converted 1/2-bit ``QuantLinear``."""

    def __init__(self, in_features: int, out_features: int, bits: int, *, bias: bool = True,
                 act_quant: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                 w_layout_t: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, in_features
        packing = packing_for_bits(bits)
        self._init_packed(torch.zeros(out_features, packing.row_bytes(in_features),
                                      dtype=torch.uint8),
                          torch.zeros(out_features, dtype=torch.float32), bits, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) \
            if bias else None
        self.act_quant = act_quant
        self.w_layout_t = w_layout_t

    def set_backend(self, backend: str, kernel_backend: str | None = None) -> str | None:
        """``"torch"`` (dequantized ``F.linear``) or ``"native"`` (integer kernels).

        Returns None when the requested backend is in use, else why the layer stays on torch.
        ``kernel_backend`` picks the kernel implementation (``tbt.runtime.kernels``: ``ref``,
        ``native``, ``scalar`` ...; default ``$TBT_KERNEL_BACKEND`` or auto).
        """
        if backend not in ("torch", "native"):
            raise ValueError(f"backend={backend!r}; choose 'native' or 'torch'")
        self.clear_cache()
        self.backend, self.kernel_backend = "torch", kernel_backend
        if backend == "torch":
            return None
        if self.scale.dim() != 1 or self.offset is not None:
            return "per-group scales or a weight offset (DLT) have no kernel format"
        try:
            spec = act_spec_of(self.act_quant)
        except KeyError as e:
            return str(e)
        reason = kernel_unavailable_reason(self.packing, spec, kernel_backend)
        if reason is None:
            self.backend = "native"
        return reason

    def runtime_linear(self) -> PackedLinearNP:
        """The torch-free layer the native backend runs (built once from the buffers, cached)."""
        if self._rt is None:
            bias = None if self.bias is None else self.bias.detach().float().cpu().numpy()
            self._rt = PackedLinearNP(self.packed.cpu().numpy(), self.k,
                                      self.scale.detach().float().cpu().numpy(), bias,
                                      self.packing, act_spec_of(self.act_quant),
                                      getattr(self, "kernel_backend", None))
        return self._rt

    def _native_forward(self, x: Tensor) -> Tensor:
        rt = self.runtime_linear()
        x32 = x.detach()
        if x32.dtype != torch.float32:
            x32 = x32.to(torch.float32)
        x32 = x32.contiguous()
        # the paper's signed quantizers centre by the tensor mean: use torch's value (same codes)
        shift = float(x32.mean()) if rt.act.needs_mean else None
        fused = rt.fused
        m = x32.numel() // self.k
        if fused is None or m == 0:
            y = torch.from_numpy(rt(x32.numpy(), shift))  # (..., N) float32
        else:  # one C call: quantizer + kernel, on torch's buffers (no numpy round trip)
            y = torch.empty(*x32.shape[:-1], self.out_features, dtype=torch.float32)
            if fused.run_ptr(x32.data_ptr(), m, 0.0 if shift is None else shift, y.data_ptr()):
                rt.undo_binary_zeros(y.numpy().reshape(m, -1), x32.numpy().reshape(m, -1), shift)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "native" and x.device.type == "cpu" and not (
                x.requires_grad and torch.is_grad_enabled()):
            return self._native_forward(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return float_linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.packing.value}, "
                f"bias={self.bias is not None}")


class PackedEmbedding(_PackedBase):
    """Token lookup in ``α ⊙ unpack(codes)`` (times ``embed_scale``): a converted
    ``QuantEmbedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int,
                 padding_idx: int | None = None, embed_scale: float | Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.k = embedding_dim
        self.padding_idx = padding_idx
        packing = packing_for_bits(bits)
        self._init_packed(torch.zeros(num_embeddings, packing.row_bytes(embedding_dim),
                                      dtype=torch.uint8),
                          torch.zeros(num_embeddings, dtype=torch.float32), bits, dtype)
        if isinstance(embed_scale, Tensor):
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = embed_scale

    def set_backend(self, backend: str, kernel_backend: str | None = None) -> None:
        """``"native"``: dequantize only the looked-up rows (no float copy of the matrix)."""
        if backend not in ("torch", "native"):
            raise ValueError(f"backend={backend!r}; choose 'native' or 'torch'")
        self.clear_cache()
        self.backend = backend

    def _lookup_rows(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1)
        codes = unpack_codes(self.packed[flat], self.packing, self.k)  # (T, K) int8
        offset = None if self.offset is None else _row_scale(self.offset)[flat]
        w = dequantize(codes, _row_scale(self.scale)[flat], self.weight_dtype, offset)
        return w.view(*input_ids.shape, self.k)  # same values as the full dequantized matrix

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.backend == "native":
            out = self._lookup_rows(input_ids)
        else:
            out = F.embedding(input_ids, self.dequantized_weight(), self.padding_idx)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"{self.packing.value}, embed_scale={self.embed_scale}")


def set_backend(model: nn.Module, backend: str = "auto",
                kernel_backend: str | None = None) -> dict[str, str]:
    """Run every packed layer of ``model`` on ``backend`` (``auto``, ``native`` or ``torch``).

    ``auto`` is ``native`` when the C kernel library loads here and ``torch`` otherwise;
    ``native`` uses the kernels of ``kernel_backend`` (default auto: the C library, else the
    numpy reference). A packed layer is any :class:`~tbt.inference.cached.CachedModule` with a
    ``set_backend(backend, kernel_backend)`` method (this module's, the int8 LM head, the packed
    PTQ scheme layers). Returns ``{layer: reason}`` for the layers left on the torch path (also
    logged once, grouped by reason).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        from tbt.runtime.kernels import native

        backend = "native" if native.available() else "torch"
    fallback: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, CachedModule) and hasattr(mod, "set_backend"):
            reason = mod.set_backend(backend, kernel_backend)
            if reason is not None:
                fallback[name] = reason
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallback.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        logger.info("tbt: %d packed linear layer(s) stay on the torch path (%s), e.g. %s",
                    len(names), reason, names[0])
    return fallback
