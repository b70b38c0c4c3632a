"""Shared pieces of the packed inference modules: derived caches and the float linear.

Packed modules keep float weights or kernel layouts derived from their buffers (a dequantized
matrix, fbgemm's prepacked weight, the kernel re-tiling). :class:`CachedModule` names those
attributes once (``CACHES``) and drops them wherever they could go stale or be duplicated:
copies and pickles (``__getstate__``), ``load_state_dict`` and ``.to()``/``.cuda()``
(``_apply``); they are rebuilt on the next use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CachedModule", "float_linear"]


class CachedModule(nn.Module):
    """An ``nn.Module`` whose attributes in ``CACHES`` are caches derived from its buffers."""

    CACHES: tuple[str, ...] = ()

    def clear_cache(self) -> None:
        for name in self.CACHES:
            setattr(self, name, None)

    def __getstate__(self):  # copies and pickles drop the caches (rebuilt on use)
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self.CACHES))
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.clear_cache()

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)


def float_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, w, bias)`` with ``x`` cast to ``w``'s dtype (unless autocast decides)."""
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(w.dtype)
    return F.linear(x, w, bias)
