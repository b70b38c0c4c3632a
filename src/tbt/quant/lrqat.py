"""LR-QAT: low-rank quantization-aware training on the ternary and binary grids (docs/related.md §16).

How it works
------------
Full QAT keeps a float latent copy of every weight, its gradient and two Adam moments: 16 bytes
per weight in float32. LR-QAT (Bondarenko et al. 2024) freezes the pretrained weight ``W0`` *in
grid units* and trains only a low-rank update added **inside** the rounding::

    Φ0 = clip((W0 − μ) / s0, −1, 1)                    frozen, stored in int8 (fixed point)
    Z  = Φ0 + (α/r)·A·B                                A (out, r) = 0, B (r, in) Kaiming init
    Ŵ  = s · grid(Z)                                   s (out, 1) learnable, starts at s0

``s0`` and ``μ`` come from the layer's tbt weight quantizer (:func:`tbt.quant.weight.weight_codes`):
the TBT row scale ``α`` (``4/3·mean|W|`` ternary, ``mean|W|`` binary), BitNet's absmean ``γ`` ...
so at step 0 ``Ŵ`` equals the layer's round-to-nearest quantized weight *exactly* (test).
``grid`` is the layer's code set:

* ternary (2 bits): ``clamp(round(Z), −1, 1)`` (half to even);
* binary (1 bit): ``sign(Z)`` with ``sign(0) = +1`` (one-bit packable, ``docs/format.md``).

Backward (:class:`_ScaledGrid`, one int8 tensor saved per layer): the rounding is an identity STE. Ternary follows the reference
code's ``clamp(round_ste(Z))``: the gradient passes where ``round(Z)`` lies in ``[−1, 1]``.
Binary passes it where ``|Z| ≤ 1`` (the BNN window; the original code has no binary grid).
``s`` gets ``Σ_in G_W ⊙ grid(Z)`` from autograd; ``Z`` does not depend on ``s`` (``Φ0`` uses the
frozen ``s0``), so there is no LSQ term. Nothing else of the layer trains: the bias is frozen.

Storage of Φ0 (``LRQATConfig.storage``; docs/related.md §16 "Φ options"):

* ``"int8"``: ``round(Φ0·2^f)`` with ``f = frac_bits`` fractional bits (default 6, the paper's
  ``2^(8−b)`` rule at b = 2; ``|Φ0| ≤ 1`` needs ``f ≤ 6`` to fit int8). 1 byte per weight.
* ``"bfloat16"`` / ``"float32"``: a cast (2 / 4 bytes).

[tbt choice] A stored value that would land in another grid cell than the layer's RTN code (a
ratio within ``2^−(f+1)`` of a rounding threshold) is moved one step back into that cell, so the
"A·B = 0 is RTN" contract holds for every storage; the error stays ≤ ``2^−f`` grid units there
and ≤ ``2^−(f+1)`` elsewhere.

``checkpoint=True`` runs "upcast Φ0 → add A·B → grid → ·s → F.linear" under
``torch.utils.checkpoint`` (non-reentrant), so the full-size ``Z`` and ``Ŵ`` are recomputed in
backward instead of stored.

After training, :func:`tbt.export.lrqat.merge_lrqat` replaces every :class:`LRQATLinear` by a plain
:class:`~tbt.inference.packed.PackedLinear` holding ``grid(Z)`` and ``s``: no adapter is left,
and ``save_packed`` / ``load_packed`` treat the model as any tbt checkpoint. In eval mode the
merged model's logits equal the LR-QAT model's bit for bit (both compute
``dequantize(codes, s)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from tbt.quant.modules import QuantLinear, WeightSpec
from tbt.quant.weight import ABSMEAN_EPS, dequantize, weight_codes

__all__ = ["GRIDS", "LRQATConfig", "LRQATLinear", "STORAGES", "apply_lrqat", "grid_ratio",
           "lrqat_parameters"]


# ---- grids: code set, STE window, and the cell of each code (for the storage nudge) --------

class Grid(NamedTuple):
    """``marked(Z)``: int8 in ``[−2, 2]``; ``clamp(·, −1, 1)`` is the code and ``|·| ≤ 1`` the
    STE window, so backward keeps one byte per weight. ``cell(codes, step)``: ``(lo, hi)`` of
    the values that round to ``codes``, one storage step inside."""

    marked: Callable[[Tensor], Tensor]
    cell: Callable[[Tensor, float], tuple[Tensor, Tensor]]

    def codes(self, z: Tensor) -> Tensor:
        return self.marked(z).clamp_(-1, 1)


def _ternary_cell(c: Tensor, step: float) -> tuple[Tensor, Tensor]:
    cf = c.to(torch.float32)
    return cf - 0.5 + step, cf + 0.5 - step     # open cell (c − ½, c + ½), one step inside


def _binary_cell(c: Tensor, step: float) -> tuple[Tensor, Tensor]:
    neg = c < 0
    f32 = dict(dtype=torch.float32)
    lo = torch.where(neg, torch.full_like(c, -1, **f32), torch.zeros_like(c, **f32))
    hi = torch.where(neg, torch.full_like(c, -step, **f32), torch.ones_like(c, **f32))
    return lo, hi                                # −1 ↦ [−1, −step], +1 ↦ [0, 1]


def _ternary_marked(z: Tensor) -> Tensor:  # round(Z), kept to ±2 (= outside the window)
    return z.round().clamp_(-2, 2).to(torch.int8)


def _binary_marked(z: Tensor) -> Tensor:  # sign(Z) (0 -> +1), doubled outside |Z| <= 1
    sign = torch.where(z < 0, -1, 1).to(torch.int8)
    return torch.where(z.abs() > 1, 2 * sign, sign)


GRIDS: dict[int, Grid] = {2: Grid(_ternary_marked, _ternary_cell),
                          1: Grid(_binary_marked, _binary_cell)}


class _ScaledGrid(torch.autograd.Function):
    """``Ŵ = dequantize(grid(Z), s)``; backward (module docstring):
    ``∂L/∂Z = G·s·1[window]``, ``∂L/∂s = Σ_in G ⊙ grid(Z)``; saves int8 ``marked(Z)`` and s."""

    @staticmethod
    def forward(ctx, z: Tensor, scale: Tensor, bits: int, dtype: torch.dtype
                ) -> Tensor:  # type: ignore[override]
        marked = GRIDS[bits].marked(z)
        ctx.save_for_backward(marked, scale)
        return dequantize(marked.clamp(-1, 1), scale, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        marked, scale = ctx.saved_tensors
        g = grad.to(torch.float32)
        grad_s = (g * marked.clamp(-1, 1)).sum(dim=1, keepdim=True)
        grad_z = (g * scale).masked_fill_(marked.abs() > 1, 0.0)
        return grad_z, grad_s, None, None


# ---- Φ0 storages -----------------------------------------------------------------------------

class Storage(NamedTuple):
    encode: Callable[[Tensor, int], Tensor]    # Φ float32, frac_bits -> stored tensor
    decode: Callable[[Tensor, int], Tensor]    # stored, frac_bits -> float32
    step: Callable[[int], float]               # spacing of representable values near ±1


STORAGES: dict[str, Storage] = {
    "int8": Storage(lambda p, f: (p * 2.0 ** f).round_().to(torch.int8),
                    lambda s, f: s.to(torch.float32).mul_(2.0 ** -f), lambda f: 2.0 ** -f),
    "bfloat16": Storage(lambda p, f: p.to(torch.bfloat16), lambda s, f: s.to(torch.float32),
                        lambda f: 2.0 ** -8),
    "float32": Storage(lambda p, f: p.clone(), lambda s, f: s, lambda f: 2.0 ** -24),
}


@dataclass(frozen=True)
class LRQATConfig:
    """LR-QAT settings (docs/related.md §16; defaults follow the paper's README command).

    Args:
        rank: r, the inner dimension of ``A (out, r)·B (r, in)``; >= 1.
        alpha: the LoRA scaling numerator, update ``(alpha/rank)·A·B`` (paper: 1).
        storage: how the frozen Φ0 is kept: ``int8`` (fixed point), ``bfloat16``, ``float32``.
        frac_bits: fractional bits of the int8 fixed point, 0..6 (|Φ0| ≤ 1 must fit int8).
        checkpoint: recompute Z, Ŵ and the product in backward (activation checkpointing).
        train_act_scales: keep the activation quantizers' α trainable (the "scales" group);
            every other parameter outside the LR-QAT layers is frozen.
    """

    rank: int
    alpha: float = 1.0
    storage: str = "int8"
    frac_bits: int = 6
    checkpoint: bool = False
    train_act_scales: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: the low-rank dimension must be an int >= 1 "
                             "(e.g. --lrqat-rank 8)")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be > 0 (the update is alpha/rank·A·B)")
        if self.storage not in STORAGES:
            raise ValueError(f"storage={self.storage!r}: choose one of {sorted(STORAGES)}")
        if not 0 <= self.frac_bits <= 6:
            raise ValueError(f"frac_bits={self.frac_bits}: |Φ0| ≤ 1 fits int8 with at most 6 "
                             "fractional bits; choose 0..6")


# ---- the grid ratio Φ0 of a layer ------------------------------------------------------------

def _centre(w: Tensor, spec: WeightSpec) -> Tensor:
    """μ of the layer's quantizer: paper TBT centres per α granularity, BWN per tensor."""
    if spec.method == "tbt" and spec.variant == "paper":
        per_row = (spec.granularity or "row") == "row"
        return w.mean(dim=1, keepdim=True) if per_row else w.mean().reshape(1, 1)
    if spec.method == "bwn":
        return w.mean().reshape(1, 1)
    return torch.zeros((1, 1), dtype=w.dtype, device=w.device)


def grid_ratio(w: Tensor, spec: WeightSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(Φ0, s0, codes)`` of a float ``(out, in)`` weight under ``spec`` (1 or 2 bits).

    ``codes, s0 = weight_codes(w, spec)`` (the layer's RTN quantization, ``s0`` as ``(out, 1)``)
    and ``Φ0 = clip((w − μ)/s0', −1, 1)`` in float32, where ``s0' = s0 + ε`` for ``absmean``
    (BitNet divides by ``γ + ε``) and ``s0`` otherwise (0 guarded to 1). ``Φ0`` is *not* yet
    forced into the codes' cells; :class:`LRQATLinear` does that after the storage cast.
    """
    if spec.bits not in GRIDS:
        raise ValueError(f"LR-QAT has grids for 1 (binary) and 2 (ternary) bits; got "
                         f"{spec.bits}-bit weights")
    w32 = w.detach().to(torch.float32)
    codes, s0 = weight_codes(w32, spec)
    s0 = s0.to(torch.float32).expand(w32.shape[0], 1).contiguous()
    div = s0 + ABSMEAN_EPS if spec.method == "absmean" else s0.masked_fill(s0 == 0, 1.0)
    phi = ((w32 - _centre(w32, spec)) / div).clamp_(-1.0, 1.0)
    return phi, s0, codes


def _into_cells(phi: Tensor, codes: Tensor, bits: int, step: float) -> Tensor:
    """Move the entries of ``phi`` whose grid code differs from ``codes`` one step inside."""
    wrong = GRIDS[bits].codes(phi) != codes
    lo, hi = GRIDS[bits].cell(codes, step)
    return torch.where(wrong, torch.minimum(torch.maximum(phi, lo), hi), phi)


# ---- the layer -------------------------------------------------------------------------------

class LRQATLinear(nn.Module):
    """``y = F.linear(act_quant(x), s·grid(Φ0 + (α/r)·A·B), b)`` with frozen Φ0 and b.

    Build it with :meth:`from_quant` from a 1/2-bit :class:`~tbt.quant.modules.QuantLinear`.
    Buffers: ``phi`` (stored Φ0). Parameters: ``lora_a (out, r)``, ``lora_b (r, in)``,
    ``scale (out, 1)`` float32; ``bias`` is a frozen Parameter (same state-dict name as before).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, cfg: LRQATConfig, *,
                 bias: bool = True, act_quant: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.cfg = bits, cfg
        self.weight_dtype = dtype
        st = STORAGES[cfg.storage]
        zero = st.encode(torch.zeros(out_features, in_features, device=device), cfg.frac_bits)
        self.register_buffer("phi", zero)
        self.lora_a = nn.Parameter(torch.zeros(out_features, cfg.rank, device=device))
        self.lora_b = nn.Parameter(torch.empty(cfg.rank, in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(out_features, 1, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                  requires_grad=False) if bias else None)
        self.act_quant = act_quant

    @classmethod
    def from_quant(cls, ql: QuantLinear, cfg: LRQATConfig) -> LRQATLinear:
        spec = ql.weight_spec
        w = ql.weight.t() if ql.transposed else ql.weight
        new = cls(ql.in_features, ql.out_features, spec.bits, cfg, bias=ql.bias is not None,
                  act_quant=ql.act_quant, dtype=ql.weight.dtype, device=w.device)
        with torch.no_grad():
            phi, s0, codes = grid_ratio(w, spec)
            st = STORAGES[cfg.storage]
            stored = st.decode(st.encode(phi, cfg.frac_bits), cfg.frac_bits)
            new.phi = st.encode(_into_cells(stored, codes, spec.bits, st.step(cfg.frac_bits)),
                                cfg.frac_bits)
            new.scale.copy_(s0)
            if ql.bias is not None:
                new.bias.copy_(ql.bias.detach())
        return new

    @property
    def scaling(self) -> float:
        return self.cfg.alpha / self.cfg.rank

    def grid_input(self) -> Tensor:
        """``Z = Φ0 + (α/r)·A·B``, float32 ``(out, in)``."""
        phi = STORAGES[self.cfg.storage].decode(self.phi, self.cfg.frac_bits)
        # one (out, in) result: Φ0 + (α/r)·A·B; Φ0 has no gradient, so nothing full-size is saved
        return torch.addmm(phi, self.lora_a.float(), self.lora_b.float(), alpha=self.scaling)

    @torch.no_grad()
    def codes(self) -> Tensor:
        """int8 ``grid(Z)`` ``(out, in)``: what the merge packs."""
        return GRIDS[self.bits].codes(self.grid_input())

    def quantized_weight(self) -> Tensor:
        """``Ŵ = s·grid(Z)`` in the layer dtype; differentiable in A, B and s."""
        z = self.grid_input()
        if torch.is_grad_enabled() and (z.requires_grad or self.scale.requires_grad):
            return _ScaledGrid.apply(z, self.scale, self.bits, self.weight_dtype)
        return dequantize(GRIDS[self.bits].codes(z), self.scale.detach(), self.weight_dtype)

    def _linear(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return F.linear(x, w, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.cfg.checkpoint and torch.is_grad_enabled():
            return _checkpoint(self._linear, x, use_reentrant=False)
        return self._linear(x)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit grid, "
                f"rank={c.rank}, alpha={c.alpha}, phi={c.storage}, checkpoint={c.checkpoint}")


# ---- model-level verbs -----------------------------------------------------------------------

def apply_lrqat(model: nn.Module, cfg: LRQATConfig) -> nn.Module:
    """Replace every 1/2-bit ``QuantLinear`` of a quantized model by :class:`LRQATLinear`.

    The latent float weights are dropped (only Φ0 remains). Every other parameter is frozen
    except the activation quantizers' α when ``cfg.train_act_scales``. Returns ``model``.

    Raises:
        ValueError: no 1/2-bit QuantLinear (run :func:`tbt.quant.surgery.quantize_model` first).
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)
               and m.weight_spec is not None and m.weight_spec.bits in GRIDS]
    if not targets:
        raise ValueError("apply_lrqat found no 1/2-bit QuantLinear: quantize the model first "
                         "(quantize_model with ternary or binary weights)")
    model.requires_grad_(False)
    for name, mod in targets:
        model.set_submodule(name, LRQATLinear.from_quant(mod, cfg))
    for m in model.modules():
        if isinstance(m, LRQATLinear):
            for p in (m.lora_a, m.lora_b, m.scale):
                p.requires_grad_(True)
        elif cfg.train_act_scales and type(m).__name__ == "ElasticQuantizer":
            m.requires_grad_(True)
    return model


def lrqat_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable groups: ``{"ab": [A, B, ...], "scales": [s, act α, ...]}``."""
    groups: dict[str, list[nn.Parameter]] = {"ab": [], "scales": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["ab" if name.endswith(("lora_a", "lora_b")) else "scales"].append(p)
    return groups
