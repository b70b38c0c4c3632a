"""Calibration statistics: per-linear input Gram matrices, collected block by block.

:func:`linear_groups` lists the model's linears (``nn.Linear`` and transformers' ``Conv1D``) in
execution order, grouped by decoder/encoder block (``model.layers.3.*``). :func:`collect_grams`
runs the calibration batches through the model with a forward pre-hook on each linear of one
group that accumulates ``C = Σ_t x_t x_tᵀ`` in float64 over the non-padding tokens, and stops
each forward pass as soon as every hooked linear has seen its input (later blocks are not
computed). Called once per group *after* the earlier groups were quantized, this gives the
GPTQ/EoRA "sequential" statistics: each block is calibrated on the activations of the
already-compressed model before it (RELATED2.md §2, §4, §6).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from tbt.ptq.registry import LayerStats

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"))


def get_weight(mod: nn.Module) -> Tensor:
    """The ``(out, in)`` weight (GPT-2's ``Conv1D`` stores ``(in, out)``)."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()


def set_weight(mod: nn.Module, w: Tensor) -> None:
    """Write ``w (out, in)`` into the module's weight, keeping its dtype and layout."""
    with torch.no_grad():
        target = mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()
        target.copy_(w.to(target.dtype))


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p)
               for p in patterns)


def linear_groups(model: nn.Module, skip: Sequence[str] = ("lm_head",)
                  ) -> list[list[tuple[str, nn.Module]]]:
    """Linears not matching ``skip`` (fnmatch on the full or last name), grouped by block."""
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules():
        if is_linear(mod) and not _matches(name, skip):
            m = _BLOCK.match(name)
            groups.setdefault(m.group(1) if m else name, []).append((name, mod))
    return list(groups.values())


class _Stop(Exception):
    """Raised from a hook to end a calibration forward pass early."""


def collect_grams(model: nn.Module, modules: Sequence[tuple[str, nn.Module]],
                  batches: Iterable[dict[str, Tensor]]) -> dict[str, LayerStats]:
    """Input Gram matrices of ``modules`` over ``batches`` (float64, padding excluded)."""
    stats = {name: LayerStats(None, 0) for name, _ in modules}
    state: dict = {"mask": None, "seen": set()}
    handles = []

    def hook_for(name: str):
        def hook(mod, args):
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask]  # (tokens, in): only real tokens
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            st = stats[name]
            g = x.t() @ x
            st.gram = g if st.gram is None else st.gram + g
            st.n_tokens += x.shape[0]
            state["seen"].add(name)
            if len(state["seen"]) == len(stats):
                raise _Stop
        return hook

    for name, mod in modules:
        handles.append(mod.register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                am = batch.get("attention_mask")
                state["mask"], state["seen"] = (None if am is None else am.bool()), set()
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
