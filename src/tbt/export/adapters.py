"""EoRA adapters: the rank-r float branch beside a quantized layer, and its side file.

A PTQ run with ``--compensate eora`` (:mod:`tbt.ptq.eora`) wraps each quantized linear in a
:class:`LowRankAdapter` (``y = layer(x) + B(A x)``). Checkpoints keep the factors in
``eora_adapters.safetensors`` next to the weights (``<layer>.lora_a`` ``(r, in)``,
``<layer>.lora_b`` ``(out, r)``, int8 factors with ``<layer>.lora_a_scale`` / ``lora_b_scale``);
:func:`tbt.export.io.load_packed` attaches them (:func:`attach_adapters`).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ADAPTERS_NAME", "LowRankAdapter", "adapters_state", "save_adapters",
           "attach_adapters"]

ADAPTERS_NAME = "eora_adapters.safetensors"


class LowRankAdapter(nn.Module):
    """``y = base(x) + F.linear(F.linear(x, A), B)``: a rank-r branch beside a quantized layer.

    ``A`` ``(r, in)`` and ``B`` ``(out, r)`` are stored at their dtype; int8 factors come with a
    float32 scale per row (``lora_a_scale`` ``(r, 1)``, ``lora_b_scale`` ``(out, 1)``).
    """

    def __init__(self, base: nn.Module, a: Tensor, b: Tensor, a_scale: Tensor | None = None,
                 b_scale: Tensor | None = None) -> None:
        super().__init__()
        if (a.dtype == torch.int8) != (a_scale is not None) or \
                (b.dtype == torch.int8) != (b_scale is not None):
            raise ValueError("int8 adapter factors need their per-row scales (and only they)")
        self.base = base
        self.register_buffer("lora_a", a)  # (r, in)
        self.register_buffer("lora_b", b)  # (out, r)
        self.register_buffer("lora_a_scale", a_scale)
        self.register_buffer("lora_b_scale", b_scale)
        self.enabled = True  # False: the base layer alone (to measure the uncompensated model)

    @property
    def weight(self) -> Tensor:  # what generic code reads (dtype/device); the base's weight
        return self.base.weight

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` in float32 (int8 codes times their row scales)."""
        a, b = self.lora_a.float(), self.lora_b.float()
        if self.lora_a_scale is not None:
            a = a * self.lora_a_scale
        if self.lora_b_scale is not None:
            b = b * self.lora_b_scale
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        a, b = self.factors()  # the branch runs in float32 whatever the storage dtype
        return self.base(x) + F.linear(F.linear(x.float(), a), b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, dtype={self.lora_a.dtype}"



def adapters_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<layer>.lora_a, <layer>.lora_b}`` of every :class:`LowRankAdapter` in ``model``."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankAdapter):
            for key in ("lora_a", "lora_b", "lora_a_scale", "lora_b_scale"):
                t = getattr(mod, key)
                if t is not None:
                    out[f"{name}.{key}"] = t.detach().cpu().contiguous()
    return out


def save_adapters(state: dict[str, torch.Tensor], directory: str) -> None:
    from safetensors.torch import save_file

    ranks = {k[: -len(".lora_a")]: int(v.shape[0]) for k, v in state.items()
             if k.endswith(".lora_a")}
    from tbt.export.integrity import TENSOR_DIGESTS_KEY, array_digest
    from tbt.export.io import _tensor_bytes

    digests = {k: array_digest(_tensor_bytes(v)) for k, v in state.items()}
    save_file(state, os.path.join(directory, ADAPTERS_NAME),
              metadata={"tbt.eora.ranks": json.dumps(ranks, sort_keys=True),
                        TENSOR_DIGESTS_KEY: json.dumps(digests, sort_keys=True)})


def attach_adapters(model: nn.Module, directory: str | os.PathLike) -> int:
    """Wrap every layer named in ``directory/eora_adapters.safetensors`` in a
    :class:`LowRankAdapter` (``y = layer(x) + B(A x)``, the branch in float32); returns how many.

    ``load_packed`` calls this, so a packed RTN checkpoint with EoRA adapters runs them on the
    packed runtime. A name that matches no layer, or factors whose shapes do not fit it, raise
    ``ValueError`` naming the layer. The file records the sha256 of each tensor
    (``tbt.tensor_sha256``, as the packed file does): a damaged file is a ``FormatError``.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from tbt.export.format import FormatError
    from tbt.export.integrity import TENSOR_DIGESTS_KEY, verify_array
    from tbt.export.io import _tensor_bytes

    path = os.path.join(os.fspath(directory), ADAPTERS_NAME)
    if not os.path.isfile(path):
        return 0
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(TENSOR_DIGESTS_KEY)
        state = load_file(path)
        digests = None if raw is None else json.loads(raw)
    except (SafetensorError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not a readable adapters file ({e}): truncated or "
                          f"corrupted") from e
    if digests is not None:  # files written before the checksums have none
        if not isinstance(digests, dict) or set(digests) != set(state):
            raise FormatError(f"{path}: {TENSOR_DIGESTS_KEY} does not list its tensors: a "
                              f"corrupted file, save it again")
        for k, t in state.items():
            verify_array(k, _tensor_bytes(t), digests, path)
    names = sorted(k[: -len(".lora_a")] for k in state if k.endswith(".lora_a"))
    modules = dict(model.named_modules())
    for name in names:
        base = modules.get(name)
        a, b = state[f"{name}.lora_a"], state.get(f"{name}.lora_b")
        if base is None or b is None:
            raise ValueError(f"{path}: adapter {name!r} has no layer (or no lora_b) in the model")
        out_f, in_f = getattr(base, "out_features", None), getattr(base, "in_features", None)
        if (b.shape[0], a.shape[1]) != (out_f, in_f) or a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: adapter {name!r} has A {tuple(a.shape)}, B "
                             f"{tuple(b.shape)}; the layer is {in_f} -> {out_f}")
        dev = _device(base)
        scales = {f"{k}_scale": state[f"{name}.lora_{k}_scale"].to(dev) for k in ("a", "b")
                  if f"{name}.lora_{k}_scale" in state}
        model.set_submodule(name, LowRankAdapter(base, a.to(dev), b.to(dev), **scales))
    return len(names)


def _device(mod: nn.Module) -> torch.device:
    t = next(iter(mod.buffers()), None)
    if t is None:
        t = next(iter(mod.parameters()), None)
    return t.device if t is not None else torch.device("cpu")
