"""Calibration statistics: per-linear input Gram matrices, collected block by block.

:func:`linear_groups` lists the model's linears (``nn.Linear`` and transformers' ``Conv1D``) in
execution order, grouped by decoder/encoder block (``model.layers.3.*``). :func:`collect_grams`
runs the calibration batches through the model with a forward pre-hook on each linear of one
group that accumulates ``C = Σ_t x_t x_tᵀ`` in float64 over the non-padding tokens, and stops
each forward pass as soon as every hooked linear has seen its input (later blocks are not
computed). Called once per group *after* the earlier groups were quantized, this gives the
GPTQ/EoRA "sequential" statistics: each block is calibrated on the activations of the
already-compressed model before it (docs/related.md §11, §14, §15). For a decoder-only stack of
blocks, :class:`BlockCalibrator` gets the same statistics by caching each block's inputs and
running one block at a time (:func:`make_calibrator` picks it).
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


class _GramHooks:
    """Forward pre-hooks accumulating each module's input Gram; optionally stop the pass once
    every hooked module has fired (``stop=True``)."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], stop: bool) -> None:
        self.stats = {name: LayerStats(None, 0) for name, _ in modules}
        self.mask: Tensor | None = None
        self.seen: set[str] = set()
        self.stop = stop
        self.cache: dict[int, tuple[Tensor, Tensor, int]] = {}
        self.handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in modules]

    def new_batch(self, mask: Tensor | None) -> None:
        self.mask, self.seen = (None if mask is None else mask.bool()), set()
        self.cache: dict[int, tuple[Tensor, Tensor, int]] = {}

    def _gram(self, x: Tensor) -> tuple[Tensor, int]:
        # q/k/v (gate/up) receive the same input tensor object: one Gram per distinct input
        # and batch. The cache holds the tensor itself, so its id cannot be reused meanwhile.
        hit = self.cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1], hit[2]
        xs = x
        if self.mask is not None and x.shape[:-1] == self.mask.shape:
            xs = x[self.mask]  # (tokens, in): only real tokens
        xs = xs.reshape(-1, xs.shape[-1]).to(torch.float64)
        g = xs.t() @ xs
        self.cache[id(x)] = (x, g, xs.shape[0])
        return g, xs.shape[0]

    def _hook(self, name: str):
        def hook(mod, args):
            g, n = self._gram(args[0].detach())
            st = self.stats[name]
            st.gram = g.clone() if st.gram is None else st.gram + g
            st.n_tokens += n
            self.seen.add(name)
            if self.stop and len(self.seen) == len(self.stats):
                raise _Stop
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect_grams(model: nn.Module, modules: Sequence[tuple[str, nn.Module]],
                  batches: Iterable[dict[str, Tensor]]) -> dict[str, LayerStats]:
    """Input Gram matrices of ``modules`` over ``batches`` (float64, padding excluded).

    Runs the whole model on each batch, stopped as soon as every module has seen its input.
    """
    hooks = _GramHooks(modules, stop=True)
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                hooks.new_batch(batch.get("attention_mask"))
                try:
                    model(**batch)
                except _Stop:
                    pass
    finally:
        hooks.remove()
        model.train(was_training)
    return hooks.stats


class FullForwardCalibrator:
    """Sequential statistics by re-running the model from the embeddings for every group."""

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> None:
        self.model, self.batches = model, batches

    def grams(self, group: Sequence[tuple[str, nn.Module]]) -> dict[str, LayerStats]:
        return collect_grams(self.model, group, self.batches)

    def advance(self, index: int) -> None:
        """Nothing to do: the next ``grams`` call recomputes everything."""


class BlockCalibrator:
    """Sequential statistics for a stack of blocks (``model.layers.<i>``) at one block's cost.

    The inputs of block 0 (positional arguments and keyword arguments: rotary embeddings,
    masks) are captured once per batch; ``grams(group i)`` runs block ``i`` alone on its cached
    inputs, and ``advance(i)`` runs it again with its *quantized* weights to produce block
    ``i + 1``'s inputs -- exactly the activations :class:`FullForwardCalibrator` would see,
    for about two block passes per block instead of a forward pass of the model each.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList,
                 batches: Sequence[dict[str, Tensor]]) -> None:
        self.blocks = blocks
        self.inputs: list[tuple[tuple, dict]] = []
        self.masks: list[Tensor | None] = []
        device = _device(model)

        def capture(mod, args, kwargs):
            self.inputs.append((args, kwargs))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                    self.masks.append(batch.get("attention_mask"))
                    try:
                        model(**batch, use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()

    def _run(self, i: int, hooks: _GramHooks | None) -> list[Tensor]:
        outs = []
        with torch.no_grad():
            for (args, kwargs), mask in zip(self.inputs, self.masks, strict=True):
                if hooks is not None:
                    hooks.new_batch(mask)
                y = self.blocks[i](*args, **kwargs)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    def grams(self, group: Sequence[tuple[str, nn.Module]]) -> dict[str, LayerStats]:
        hooks = _GramHooks(group, stop=False)
        try:
            self._run(self._index(group), hooks)
        finally:
            hooks.remove()
        return hooks.stats

    def advance(self, index: int) -> None:
        outs = self._run(index, None)
        self.inputs = [((y, *args[1:]), kw) if args else ((), {**kw, "hidden_states": y})
                       for (args, kw), y in zip(self.inputs, outs, strict=True)]

    def _index(self, group: Sequence[tuple[str, nn.Module]]) -> int:
        mod = group[0][1]
        for i, block in enumerate(self.blocks):
            if any(m is mod for m in block.modules()):
                return i
        raise ValueError(f"{group[0][0]} is not in the block stack")


def make_calibrator(model: nn.Module, groups: Sequence[Sequence[tuple[str, nn.Module]]],
                    batches: Sequence[dict[str, Tensor]]):
    """:class:`BlockCalibrator` when the groups are exactly the blocks 0..L-1 of one
    ``ModuleList`` of a decoder-only model (Llama, Qwen2, Mistral, GPT-2), else
    :class:`FullForwardCalibrator` (encoder-decoder models, anything else)."""
    names = [_BLOCK.match(g[0][0]) for g in groups]
    cfg = getattr(model, "config", None)
    if all(names) and not getattr(cfg, "is_encoder_decoder", False):
        prefixes = [m.group(1) for m in names]
        parent = prefixes[0].rsplit(".", 1)[0]
        try:
            blocks = model.get_submodule(parent)
        except AttributeError:
            blocks = None
        if (isinstance(blocks, nn.ModuleList)
                and prefixes == [f"{parent}.{i}" for i in range(len(blocks))]):
            return BlockCalibrator(model, blocks, batches)
    return FullForwardCalibrator(model, batches)
