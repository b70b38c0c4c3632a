"""Writing PTQ results: a plain Hugging Face checkpoint, the EoRA adapters, packed checkpoints.

* :func:`save_ptq_checkpoint` writes ``save_pretrained`` weights equal to the dequantized PTQ
  weights (EoRA adapters merged: ``W = Ŵ + B·A``), the tokenizer, ``ptq_config.json``, and
  the unmerged adapters in ``eora_adapters.safetensors`` (``<layer>.lora_a`` ``(r, in)``,
  ``<layer>.lora_b`` ``(out, r)`` at their storage dtype). The checkpoint is a full-precision
  model as far as transformers is concerned, so ``tbt train --model OUT --teacher FP`` starts
  QAT from the PTQ weights and ``tbt evaluate --model OUT`` scores them.
* :func:`save_packed_rtn` writes the RTN result as a tbt packed checkpoint: RTN *is*
  ``quantize_model`` with the same weight quantizer and float activations (``bits="fp-2-fp"``),
  so ``save_packed`` stores exactly the RTN codes and scales.
* :func:`save_packed_ptq` writes PTQTP, PB-LLM and BiLLM results packed: every quantized
  linear becomes a :class:`~tbt.export.ptq_layers.SchemeLinear` holding the method's own
  compressed representation (``docs/format.md`` §9: PTQTP's two ``ternary_2bit`` planes and
  their scale pairs; PB-LLM's ``binary_1bit`` plane, per-row (μ, α) and the salient weights in
  CSR; BiLLM's sign planes, column bitmap, group bits and (μ, α) pairs), encoded from
  ``LayerQuant.tensors`` (run with ``PTQConfig(keep_tensors=True)``) and checked against the
  PTQ weights before it is written.

In both packed cases EoRA adapters are written next to the packed file; ``load_packed`` runs
them (:func:`attach_adapters`) and ``tbt inspect`` counts their bits. Not packed:
:data:`PACKED_UNSUPPORTED` (RTN at 3..8 bits: uniform codes have no packing).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from tbt.export.adapters import (ADAPTERS_NAME, LowRankAdapter, adapters_state,  # noqa: F401
                                 attach_adapters, save_adapters)
from tbt.ptq.apply import PTQConfig, merge_adapters

PACKED_SCHEMES = {"ptqtp": "ptqtp", "pbllm": "pbllm", "billm": "billm"}  # method -> scheme
PACKED_UNSUPPORTED = {
    "rtn": "RTN at 3..8 bits: uniform codes have no packing (1 or 2 bits only)",
}


def save_ptq_checkpoint(model: nn.Module, tokenizer: Any, cfg: PTQConfig, directory: str) -> None:
    """Adapters to ``eora_adapters.safetensors``, then merge them and ``save_pretrained``."""
    os.makedirs(directory, exist_ok=True)
    state = adapters_state(model)
    if state:
        save_adapters(state, directory)
    merge_adapters(model)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "ptq_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)


def save_packed_rtn(fp_model: nn.Module, cfg: PTQConfig, directory: str,
                    ptq_model: nn.Module | None = None) -> str:
    """Packed checkpoint of an RTN run from the *full-precision* model; returns a status line.

    ``fp_model`` is quantized in place (pass a copy). ``ptq_model``'s adapters, if any, are
    written next to the packed file.
    """
    from tbt.config import QuantConfig
    from tbt.export.io import save_packed
    from tbt.quant.surgery import quantize_model

    m = cfg.method_config
    if cfg.method != "rtn" or m.bits not in (1, 2):
        why = PACKED_UNSUPPORTED.get(cfg.method, f"{cfg.method} is not RTN")
        return f"not written: {why}"
    qc = QuantConfig(bits=f"fp-{m.bits}-fp", method=m.method, variant=m.variant,
                     granularity=m.granularity, quantize_attention=False,
                     skip_modules=cfg.skip_modules)
    quantize_model(fp_model, qc)
    save_packed(fp_model, directory)
    state = adapters_state(ptq_model) if ptq_model is not None else {}
    if state:
        save_adapters(state, directory)
    return os.fspath(directory)


def save_packed_ptq(ptq_model: nn.Module, report, cfg: PTQConfig, directory: str,
                    atol: float = 1e-6) -> str:
    """Packed checkpoint of a PTQTP / PB-LLM / BiLLM run; returns the directory (or a
    "not written" line for a method without a scheme).

    ``ptq_model``: the model :func:`~tbt.ptq.apply.quantize_model_ptq` quantized (with or
    without EoRA adapters), ``report``: its :class:`~tbt.ptq.apply.PTQReport`, run with
    ``keep_tensors=True``. Each quantized linear is swapped for its
    :class:`~tbt.export.ptq_layers.SchemeLinear` while ``save_packed`` writes the model, then
    put back (``ptq_model`` is unchanged; no copy of the model is made). Raises
    ``RuntimeError`` when a layer's stored codes do not rebuild its PTQ weight within ``atol``
    (relative to the layer's largest weight): the export never writes a different model.
    """
    from tbt.export.io import save_packed
    from tbt.export.ptq_layers import SchemeLinear
    from tbt.ptq.calib import get_weight

    scheme = PACKED_SCHEMES.get(cfg.method)
    if scheme is None:
        return f"not written: {PACKED_UNSUPPORTED.get(cfg.method, 'no packed scheme')}"
    names = [r["name"] for r in report.layers]
    missing = [n for n in names if n not in report.tensors]
    if missing:
        raise ValueError(f"the PTQ report has no stored tensors for {missing[0]} (and "
                         f"{len(missing) - 1} more): run with PTQConfig(keep_tensors=True)")
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name in names:
            old = ptq_model.get_submodule(name)
            base = old.base if isinstance(old, LowRankAdapter) else old
            w_hat = get_weight(base).detach().to(torch.float32).cpu()
            new = SchemeLinear.from_method(scheme, tuple(w_hat.shape), report.tensors[name],
                                           cfg.method_config, base.bias, base.weight.dtype)
            err = float((new.dequantized_weight().float() - w_hat).abs().max())
            if err > atol * max(float(w_hat.abs().max()), 1e-30):
                raise RuntimeError(f"{name}: the stored {scheme} codes rebuild the PTQ weight "
                                   f"with max error {err:.3g}: not written (a bug: report it)")
            ptq_model.set_submodule(name, new.to(base.weight.device))
            swapped.append((name, old))
        save_packed(ptq_model, directory)
    finally:
        for name, old in reversed(swapped):
            ptq_model.set_submodule(name, old)
    state = adapters_state(ptq_model)
    if state:
        save_adapters(state, directory)
    return os.fspath(directory)
