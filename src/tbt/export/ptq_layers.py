"""Packed PTQ layers: PTQTP, PB-LLM and BiLLM weights as stored codes (``docs/format.md`` §9).

How it works
------------
A layer whose weight is not "one code plane × one scale per row" is a *scheme* layer: its
``tbt.layers`` entry has ``"scheme"`` (the method), ``"packing"`` (the same name, so a reader
that predates schemes stops with "unknown packing"), ``"shape": [N, K]``, ``"params"``
(scheme integers: group size, stream widths, counts) and ``"tensors"`` ``{role: tensor}``.
Each scheme (:class:`Scheme`, registered in :data:`SCHEMES`) states

* ``layout(n, k, params)``: every role's safetensors dtype and shape (checked on load, with
  :class:`~tbt.export.format.FormatError` on a missing tensor or a dtype/shape mismatch);
* ``encode(tensors of the method's LayerQuant, its config)``: params + stored tensors, packed
  with the
  normative packers of :mod:`tbt.export.pack` (``ternary_2bit``, ``binary_1bit``,
  :func:`~tbt.export.pack.pack_uint` bit streams);
* ``decode(stored, n, k, params)``: the float32 ``(N, K)`` weight, with the *same* float32
  operations as the method computed ``Ŵ`` (so the packed model's logits equal the PTQ
  model's).

:class:`SchemeLinear` holds the stored tensors as buffers, dequantizes once (cached like
:meth:`PackedLinear.dequantized_weight`) and runs ``F.linear`` with float activations:
these are weight-only PTQ layers (``fp-W-fp``), for which tbt's integer kernels (integer
activation codes) do not apply, so :meth:`SchemeLinear.set_backend` keeps the torch path and
says so. Scales are stored as float32 (exact); ``tbt ptq``'s accounting counts them at 16
bits, and :func:`layer_bits` gives both figures from the stored tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tbt.export.format import FormatError, Packing
from tbt.export.pack import pack, pack_uint, unpack, unpack_uint
from tbt.inference.cached import CachedModule, float_linear

__all__ = ["Scheme", "SCHEMES", "register_scheme", "SchemeLinear", "check_scheme_layer",
           "layer_bits", "layer_keys", "tensor_bits"]

T2, B1 = Packing.TERNARY_2BIT, Packing.BINARY_1BIT
ST_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4,
            "F64": 8, "I64": 8}
_TORCH = {"U8": torch.uint8, "I32": torch.int32, "F32": torch.float32}
Layout = dict[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Scheme:
    """A stored PTQ layer format: code ``bits`` of its planes (for the layer table), and the
    ``layout`` / ``encode`` / ``decode`` functions of the module docstring."""

    name: str
    bits: int
    layout: Callable[[int, int, dict], Layout]
    encode: Callable[[dict[str, Tensor], Any], tuple[dict[str, Any], dict[str, Tensor]]]
    decode: Callable[[dict[str, Tensor], int, int, dict], Tensor]


SCHEMES: dict[str, Scheme] = {}


def register_scheme(name: str, bits: int, layout, encode):
    """Decorator on ``decode``: register scheme ``name`` with its ``layout`` and ``encode``."""
    def deco(decode):
        if name in SCHEMES:
            raise ValueError(f"scheme {name!r} is already registered")
        SCHEMES[name] = Scheme(name, bits, layout, encode, decode)
        return decode
    return deco


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _packed(q: Tensor, packing: Packing) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(pack(_np(q).astype(np.int8), packing)))


def _codes(t: Tensor, packing: Packing, k: int) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(unpack(_np(t), packing, k))).to(torch.float32)


def _stream(values: Tensor, width: int) -> Tensor:
    return torch.from_numpy(pack_uint(_np(values).astype(np.int64), width))


def _mask_plane(mask: Tensor) -> Tensor:  # bool → ±1 codes for binary_1bit
    return torch.where(mask, 1, -1).to(torch.int8)


# ---- PTQTP: two ternary planes, (α¹, α²) per row or per group -------------------------------

def _ptqtp_layout(n: int, k: int, p: dict) -> Layout:
    g = p["group_size"]
    if not isinstance(g, int) or g < 1 or k % g:
        raise FormatError(f"group_size {g!r} does not divide in_features={k}")
    return {"plane1": ("U8", (n, T2.row_bytes(k))), "plane2": ("U8", (n, T2.row_bytes(k))),
            "alpha": ("F32", (n, k // g, 2))}


def _ptqtp_encode(t: dict[str, Tensor], cfg: Any):
    k, alpha = t["plane1"].shape[1], t["alpha"].to(torch.float32)
    return ({"group_size": k // alpha.shape[1]},
            {"plane1": _packed(t["plane1"], T2), "plane2": _packed(t["plane2"], T2),
             "alpha": alpha.contiguous()})


def dequantize_planes(t1: Tensor, t2: Tensor, alpha: Tensor) -> Tensor:
    """``α¹ ⊙ t¹ + α² ⊙ t²`` as float32 ``(out, in)``; ``alpha (out, n_groups, 2)``."""
    out, k = t1.shape
    ng = alpha.shape[1]
    a = alpha.repeat_interleave(k // ng, dim=1)  # (out, in, 2)
    return a[..., 0] * t1.to(torch.float32) + a[..., 1] * t2.to(torch.float32)


@register_scheme("ptqtp", 2, _ptqtp_layout, _ptqtp_encode)
def _ptqtp_decode(s: dict[str, Tensor], n: int, k: int, p: dict) -> Tensor:
    """``α¹ ⊙ t¹ + α² ⊙ t²`` (:func:`dequantize_planes`)."""
    return dequantize_planes(_codes(s["plane1"], T2, k), _codes(s["plane2"], T2, k), s["alpha"])


# ---- PB-LLM: binary plane + per-row (μ, α), salient weights in CSR --------------------------

def _index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def _pbllm_layout(n: int, k: int, p: dict) -> Layout:
    nnz, sb, ib = p["nnz"], p["salient_bits"], p["index_bits"]
    if ib != _index_bits(k) or not 2 <= sb <= 16 or not 0 <= nnz <= n * k:
        raise FormatError(f"params {p} do not fit in_features={k}: index_bits must be "
                          f"{_index_bits(k)}, salient_bits 2..16, 0 <= nnz <= {n * k}")
    out: Layout = {"plane": ("U8", (n, B1.row_bytes(k))), "alpha": ("F32", (n,))}
    if p["center"]:
        out["mu"] = ("F32", (n,))
    if nnz:
        out.update({"salient_scale": ("F32", (n,)), "salient_zero": ("F32", (n,)),
                    "row_ptr": ("I32", (n + 1,)), "salient_index": ("U8", (-(-nnz * ib // 8),)),
                    "salient_codes": ("U8", (-(-nnz * sb // 8),))})
    return out


def _pbllm_encode(t: dict[str, Tensor], cfg: Any):
    mask = t["salient_mask"]
    n, k = mask.shape
    nnz = int(mask.sum())
    params = {"center": bool(cfg.center), "nnz": nnz, "index_bits": _index_bits(k),
              "salient_bits": int(cfg.salient_bits)}
    out = {"plane": _packed(t["signs"], B1), "alpha": t["alpha"].float().contiguous()}
    if params["center"]:
        out["mu"] = t["mu"].float().contiguous()
    if nnz:
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: CSR order
        counts = torch.bincount(rows, minlength=n)
        out.update({"salient_scale": t["scale"].float().contiguous(),
                    "salient_zero": t["zero"].float().contiguous(),
                    "row_ptr": torch.cat([torch.zeros(1, dtype=torch.int64),
                                          counts.cumsum(0)]).to(torch.int32),
                    "salient_index": _stream(cols, params["index_bits"]),
                    "salient_codes": _stream(t["salient_codes"][rows, cols],
                                             params["salient_bits"])})
    return params, out


@register_scheme("pbllm", 1, _pbllm_layout, _pbllm_encode)
def _pbllm_decode(s: dict[str, Tensor], n: int, k: int, p: dict) -> Tensor:
    """``μ + α·sign`` off the salient set, ``(c − zero)·scale`` on it (:mod:`tbt.ptq.pbllm`)."""
    signs = _codes(s["plane"], B1, k)
    mu = s["mu"][:, None] if "mu" in s else torch.zeros(n, 1)
    w = mu + s["alpha"][:, None] * signs
    if p["nnz"]:
        ptr = _np(s["row_ptr"]).astype(np.int64)
        if ptr[0] != 0 or ptr[-1] != p["nnz"] or (np.diff(ptr) < 0).any():
            raise FormatError(f"row_ptr must rise from 0 to nnz={p['nnz']}: corrupted side-store")
        cols = unpack_uint(_np(s["salient_index"]), p["index_bits"], p["nnz"])
        if (cols >= k).any():
            raise FormatError(f"salient column index >= in_features={k}: corrupted side-store")
        rows = np.repeat(np.arange(n), np.diff(ptr))
        codes = unpack_uint(_np(s["salient_codes"]), p["salient_bits"], p["nnz"])
        r, c = torch.from_numpy(rows), torch.from_numpy(cols)
        zero, scale = s["salient_zero"][r], s["salient_scale"][r]
        w[r, c] = (torch.from_numpy(codes).to(torch.float32) - zero) * scale
    return w


# ---- BiLLM: sign planes, salient-column bitmap, group bits, 4 (μ, α) pairs per block --------

def _billm_layout(n: int, k: int, p: dict) -> Layout:
    bs, sal = p["block_size"], p["salient_columns"]
    if not isinstance(bs, int) or bs < 1 or not 1 <= sal <= k:
        raise FormatError(f"params {p} do not fit in_features={k} (block_size >= 1, "
                          f"1 <= salient_columns <= {k})")
    out: Layout = {"plane1": ("U8", (n, B1.row_bytes(k))), "plane2": ("U8", (n, B1.row_bytes(sal))),
                   "salient_cols": ("U8", (B1.row_bytes(k),)),
                   "pairs": ("F32", (n, -(-k // bs), 4, 2))}
    if sal < k:
        out["group"] = ("U8", (n, B1.row_bytes(k - sal)))
    return out


def _billm_encode(t: dict[str, Tensor], cfg: Any):
    sal = t["salient_cols"]
    params = {"block_size": int(cfg.block_size), "salient_columns": int(sal.sum())}
    k = sal.numel()
    out = {"plane1": _packed(t["plane1"], B1), "plane2": _packed(t["plane2"], B1),
           "salient_cols": _packed(_mask_plane(sal), B1),
           "pairs": t["pairs"].float().contiguous()}
    if params["salient_columns"] < k:
        out["group"] = _packed(_mask_plane(t["group"]), B1)
    return params, out


@register_scheme("billm", 1, _billm_layout, _billm_encode)
def _billm_decode(s: dict[str, Tensor], n: int, k: int, p: dict) -> Tensor:
    """Salient: ``(μ₁ + α₁s₁) + (μ₂ + α₂s₂)``; other: ``μ_g + α_g·s₁`` of its group g."""
    sal = _codes(s["salient_cols"], B1, k) > 0
    n_sal = p["salient_columns"]
    if int(sal.sum()) != n_sal:
        raise FormatError(f"salient-column bitmap has {int(sal.sum())} columns, the table says "
                          f"{n_sal}: corrupted")
    s1 = _codes(s["plane1"], B1, k)
    s2 = torch.zeros(n, k)
    s2[:, sal] = _codes(s["plane2"], B1, n_sal)
    sparse = torch.zeros(n, k, dtype=torch.bool)
    if n_sal < k:
        sparse[:, ~sal] = _codes(s["group"], B1, k - n_sal) > 0
    blk = torch.arange(k) // p["block_size"]
    par = s["pairs"]  # (n, blocks, 4, 2)

    def col(i: int, j: int) -> Tensor:  # (μ or α) of pair i, per column: (n, k)
        return par[:, :, i, j][:, blk]

    salient = (col(0, 0) + col(0, 1) * s1) + (col(1, 0) + col(1, 1) * s2)
    mu = torch.where(sparse, col(3, 0), col(2, 0))
    alpha = torch.where(sparse, col(3, 1), col(2, 1))
    return torch.where(sal, salient, mu + alpha * s1)


# ---- the module, validation and accounting ---------------------------------------------------

def _layout(scheme: str, n: int, k: int, params: dict) -> Layout:
    spec = SCHEMES.get(scheme)
    if spec is None:
        raise FormatError(f"unknown PTQ scheme {scheme!r}; this tbt reads {sorted(SCHEMES)}")
    try:
        return spec.layout(n, k, params)
    except (KeyError, TypeError) as e:
        raise FormatError(f"scheme {scheme!r}: params {params!r} lack or garble {e}") from e


def check_scheme_layer(name: str, info: dict, tensors: dict, check_tensor) -> None:
    """Every tensor of a scheme layer exists with its layout's dtype and shape (FormatError)."""
    n, k = (int(v) for v in info["shape"])
    if n < 1 or k < 1:
        raise FormatError(f"layer {name}: shape {info['shape']} must be positive")
    try:
        layout = _layout(info["scheme"], n, k, info["params"])
    except FormatError as e:
        raise FormatError(f"layer {name}: {e}") from e
    names = info["tensors"]
    for role, (dtype, shape) in layout.items():
        if role not in names:
            raise FormatError(f"layer {name} ({info['scheme']}): no {role!r} in its tensor list")
        check_tensor(f"layer {name} ({info['scheme']})", names[role], tensors, dtype, shape)


def tensor_bits(keys, tensors: dict) -> tuple[int, int]:
    """(stored bits, bits with float tensors counted at 16 bits -- ``tbt ptq``'s convention,
    ``tbt.ptq.registry.SCALE_BITS``) of the tensors ``keys`` in the index
    ``{name: (dtype, shape)}``."""
    stored = fp16 = 0
    for key in keys:
        dtype, shape = tensors[key]
        numel = math.prod(int(s) for s in shape)
        stored += numel * ST_BYTES.get(dtype, 4) * 8
        fp16 += numel * (16 if dtype in ("F32", "F16", "BF16", "F64") else ST_BYTES[dtype] * 8)
    return stored, fp16


def layer_keys(info: dict) -> list[str]:
    """The tensors of a layer entry: a scheme's list, else ``packed`` + ``scale``."""
    return list(info["tensors"].values()) if "scheme" in info else [info["packed"],
                                                                    info["scale"]]


def layer_bits(info: dict, tensors: dict) -> tuple[int, int]:
    """:func:`tensor_bits` of one layer entry's tensors (:func:`layer_keys`)."""
    return tensor_bits(layer_keys(info), tensors)


class SchemeLinear(CachedModule):
    """``y = F.linear(x, decode(stored tensors), b)``: a packed PTQ layer (float activations)."""

    CACHES = ("_w_cache",)  # the decoded float weight

    def __init__(self, scheme: str, in_features: int, out_features: int, params: dict,
                 stored: dict[str, Tensor] | None = None, bias: Tensor | bool | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scheme, self.params = scheme, dict(params)
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = dtype
        layout = _layout(scheme, out_features, in_features, self.params)
        self.roles = list(layout)
        for role, (st, shape) in layout.items():
            t = stored[role] if stored is not None else torch.zeros(shape, dtype=_TORCH[st])
            if tuple(t.shape) != shape or t.dtype != _TORCH[st]:
                raise ValueError(f"{scheme} {role}: {t.dtype} {tuple(t.shape)}, the layout "
                                 f"needs {_TORCH[st]} {shape}")
            self.register_buffer(role, t)
        if isinstance(bias, Tensor):
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype),
                                     requires_grad=False) if bias else None
        self._w_cache: Tensor | None = None
        self.backend = "torch"

    @classmethod
    def from_method(cls, scheme: str, shape: tuple[int, int], tensors: dict[str, Tensor],
                    method_config: Any, bias: Tensor | None,
                    dtype: torch.dtype = torch.float32) -> SchemeLinear:
        """Encode a method's ``LayerQuant.tensors`` (:mod:`tbt.ptq`) of an ``(out, in)`` layer
        into stored tensors; ``method_config``: the method's config (PB-LLM's salient_bits ...)."""
        if scheme not in SCHEMES:
            raise ValueError(f"no packed scheme {scheme!r}; schemes: {sorted(SCHEMES)}")
        params, stored = SCHEMES[scheme].encode(tensors, method_config)
        n, k = (int(v) for v in shape)
        return cls(scheme, k, n, params, stored, bias, dtype)

    @classmethod
    def skeleton(cls, info: dict, bias: bool, dtype: torch.dtype = torch.float32) -> SchemeLinear:
        """Zero buffers shaped by a layer-table entry, to load a checkpoint into."""
        n, k = (int(v) for v in info["shape"])
        return cls(info["scheme"], k, n, info["params"], None, bias, dtype)

    def layer_entry(self, name: str) -> dict[str, Any]:
        """This layer's ``tbt.layers`` entry (``docs/format.md`` §9)."""
        return {"kind": "linear", "scheme": self.scheme, "packing": self.scheme,
                "bits": SCHEMES[self.scheme].bits, "shape": [self.out_features, self.in_features],
                "params": self.params, "tensors": {r: f"{name}.{r}" for r in self.roles},
                "act": None}

    def dequantized_weight(self) -> Tensor:
        """The float ``(N, K)`` weight, decoded once from the stored tensors and cached."""
        dev = getattr(self, self.roles[0]).device
        if self._w_cache is None or self._w_cache.device != dev:
            stored = {r: getattr(self, r).cpu() for r in self.roles}
            w = SCHEMES[self.scheme].decode(stored, self.out_features, self.in_features,
                                            self.params)
            self._w_cache = w.to(device=dev, dtype=self.weight_dtype)
        return self._w_cache

    def set_backend(self, backend: str, kernel_backend: str | None = None) -> str | None:
        """Always the torch path; returns why for ``"native"`` (None for ``"torch"``)."""
        if backend not in ("torch", "native"):
            raise ValueError(f"backend={backend!r}; choose 'native' or 'torch'")
        self.clear_cache()
        if backend == "torch":
            return None
        return (f"PTQ scheme {self.scheme!r} is weight-only with float activations: tbt's "
                f"kernels need integer activation codes, so it runs dequantized F.linear")

    def forward(self, x: Tensor) -> Tensor:
        return float_linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, "
                f"params={self.params}, bias={self.bias is not None}")
