"""EoRA: training-free low-rank compensation in the activation eigenspace (docs/related.md §15).

How it works
------------
For a layer with original weight ``W``, compressed weight ``W_c`` and calibration inputs
``X`` (tokens × in), find ``B (out, r)``, ``A (r, in)`` minimising ``‖(W − W_c − B·A)·Xᵀ‖_F``:

1. ``C = Σ_t x_t x_tᵀ`` (float64), ``C = Q·Λ·Qᵀ`` (``torch.linalg.eigh``); eigenvalues below
   the numerical floor ``λ_max·in·ε`` are clamped to the smallest one above it (the code clamps
   negative eigenvalues to the smallest positive one; the floor keeps round-off out of
   ``Λ^{-1/2}``);
2. ``ΔW' = (W − W_c)·Q·Λ^{1/2}``; truncated SVD ``ΔW' ≈ U_r Σ_r V_rᵀ``;
3. ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ``.

Then ``‖(ΔW − BA)·Xᵀ‖²_F = Σ_{i>r} σ_i²(ΔW')`` (exactly, when ``C`` is full rank), so the
error falls monotonically with ``r`` and vanishes at full rank; scaling ``C`` changes nothing;
``C = I`` is plain SVD.

At inference :class:`LowRankAdapter` computes ``y = base(x) + B·(A·x)`` next to any quantized
layer (an ``nn.Linear`` holding ``W_c``, a ``QuantLinear``, a ``PackedLinear``). ``A`` and ``B``
are stored at ``adapter_dtype`` (float16 by default): the adapter costs
``16·r·(in + out)`` bits, i.e. ``16·r·(in + out)/(in·out)`` bits per weight of the layer; with
``int8`` (per-row symmetric codes) ``8·r·(in + out) + 32·(r + out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tbt.export.adapters import LowRankAdapter  # noqa: F401  (built here, run at export)

ADAPTER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "int8": torch.int8}  # int8: per-row symmetric codes + a float32 scale per row


@dataclass(frozen=True)
class EoRAConfig:
    """Args: rank (adapter rank r), adapter_dtype (storage dtype of A and B)."""

    rank: int = 16
    adapter_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1; got {self.rank} (pass --rank R)")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype={self.adapter_dtype!r}; choose one of "
                             f"{sorted(ADAPTER_DTYPES)}")

    @property
    def adapter_bits(self) -> int:
        dt = ADAPTER_DTYPES[self.adapter_dtype]
        return 8 if dt == torch.int8 else torch.finfo(dt).bits


def _eigh_clamped(gram: Tensor) -> tuple[Tensor, Tensor]:
    lam, q = torch.linalg.eigh(gram.to(torch.float64))
    floor = lam.abs().max().clamp_min(1e-300) * gram.shape[0] * torch.finfo(torch.float64).eps
    ok = lam > floor
    if not bool(ok.any()):  # no input energy at all: plain SVD
        return torch.ones_like(lam), torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.where(ok, lam, lam[ok].min()), q


def eora_factors(delta_w: Tensor, gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B (out, r), A (r, in))`` float64 for ``ΔW (out, in)`` and the input Gram ``C``."""
    lam, q = _eigh_clamped(gram)
    root = lam.sqrt()
    dw = delta_w.to(torch.float64) @ q * root  # ΔW' = ΔW·Q·Λ^{1/2}
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    r = min(rank, s.numel())
    rs = s[:r].sqrt()
    b = u[:, :r] * rs
    a = (rs[:, None] * vh[:r]) / root @ q.t()
    return b, a


def weighted_error(delta_w: Tensor, gram: Tensor) -> float:
    """``tr(Δ·C·Δᵀ) = ‖Δ·Xᵀ‖²_F`` in float64."""
    d = delta_w.to(torch.float64)
    return float(((d @ gram.to(torch.float64)) * d).sum())


def int8_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: ``(codes int8, scale (rows, 1) float32)``, ``t ≈ codes·scale``."""
    from tbt.quant.weight import weight_codes

    return weight_codes(t.to(torch.float32), 8, "uniform")


def adapter_from_delta(delta_w: Tensor, gram: Tensor, cfg: EoRAConfig) -> dict[str, Tensor]:
    """EoRA factors at the storage dtype: the :class:`LowRankAdapter` keyword arguments
    (``a``, ``b``, and for int8 ``a_scale``, ``b_scale``)."""
    b, a = eora_factors(delta_w, gram, cfg.rank)
    dt = ADAPTER_DTYPES[cfg.adapter_dtype]
    if dt != torch.int8:
        return {"a": a.to(dt), "b": b.to(dt)}
    (qa, sa), (qb, sb) = int8_rows(a), int8_rows(b)
    return {"a": qa, "b": qb, "a_scale": sa, "b_scale": sb}


def adapter_bits(out_features: int, in_features: int, cfg: EoRAConfig) -> int:
    r = min(cfg.rank, out_features, in_features)
    scales = 32 * (r + out_features) if cfg.adapter_dtype == "int8" else 0  # per-row scales
    return r * (in_features + out_features) * cfg.adapter_bits + scales
