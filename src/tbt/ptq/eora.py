"""EoRA: training-free low-rank compensation in the activation eigenspace (RELATED2.md §2).

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
``16·r·(in + out)`` bits, i.e. ``16·r·(in + out)/(in·out)`` bits per weight of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
        return torch.finfo(ADAPTER_DTYPES[self.adapter_dtype]).bits


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


class LowRankAdapter(nn.Module):
    """``y = base(x) + F.linear(F.linear(x, A), B)``: a rank-r branch beside a quantized layer."""

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a)  # (r, in)
        self.register_buffer("lora_b", b)  # (out, r)
        self.enabled = True  # False: the base layer alone (to measure the uncompensated model)

    @property
    def weight(self) -> Tensor:  # what generic code reads (dtype/device); the base's weight
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        # the branch runs in float32 whatever the storage dtype of A and B
        low = F.linear(F.linear(x.float(), self.lora_a.float()), self.lora_b.float())
        return self.base(x) + low.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, dtype={self.lora_a.dtype}"


def adapter_from_delta(delta_w: Tensor, gram: Tensor, cfg: EoRAConfig) -> tuple[Tensor, Tensor]:
    """EoRA factors rounded to the storage dtype: ``(A, B)`` at ``cfg.adapter_dtype``."""
    b, a = eora_factors(delta_w, gram, cfg.rank)
    dt = ADAPTER_DTYPES[cfg.adapter_dtype]
    return a.to(dt), b.to(dt)


def adapter_bits(out_features: int, in_features: int, cfg: EoRAConfig) -> int:
    r = min(cfg.rank, out_features, in_features)
    return r * (in_features + out_features) * cfg.adapter_bits
