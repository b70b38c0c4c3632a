"""Apply a PTQ method (and optionally EoRA) to every linear of a model, block by block.

:func:`quantize_model_ptq` is the whole job. For each block of linears, in execution order:

1. if the method or EoRA needs them, collect the block's input Gram matrices on the calibration
   batches, with every earlier block already quantized (sequential calibration,
   :mod:`tbt.ptq.calib`);
2. quantize each linear's ``W`` with the registered method (:mod:`tbt.ptq.registry`), measure
   its relative weight error ``‖W − Ŵ‖²/‖W‖²`` and relative output error on the calibration set
   ``tr(ΔW·C·ΔWᵀ)/tr(W·C·Wᵀ)``;
3. with EoRA, fit the rank-r adapter to ``ΔW = W − Ŵ`` and measure the output error of
   ``Ŵ + B·A``;
4. write ``Ŵ`` into the layer (same module, same dtype) and, with EoRA, wrap it in a
   :class:`~tbt.ptq.eora.LowRankAdapter` (``y = Ŵx + B(Ax)``).

The result is a model that computes with the PTQ weights, plus a :class:`PTQReport` (per-layer
table, bits per weight under honest and reported conventions). :func:`merge_adapters` folds
the adapters into the weights (``W ← Ŵ + B·A``) for a plain Hugging Face checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tbt.ptq.calib import get_weight, linear_groups, make_calibrator, set_weight
from tbt.ptq.eora import (EoRAConfig, LowRankAdapter, adapter_bits, adapter_from_delta,
                          weighted_error)
from tbt.ptq.registry import LayerStats, get_ptq_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PTQConfig:
    """Args: method (a registered PTQ method), method_config (its config; ``None`` = defaults),
    eora (``EoRAConfig`` to compensate, or ``None``), skip_modules (fnmatch patterns of
    linears left in full precision), keep_tensors (keep codes/masks in the report)."""

    method: str = "rtn"
    method_config: Any = None
    eora: EoRAConfig | None = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    keep_tensors: bool = False

    def __post_init__(self) -> None:
        m = get_ptq_method(self.method)
        if self.method_config is None:
            object.__setattr__(self, "method_config", m.config_cls())
        elif not isinstance(self.method_config, m.config_cls):
            raise ValueError(f"method_config for {self.method!r} must be a "
                             f"{m.config_cls.__name__}, got {type(self.method_config).__name__}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    @property
    def needs_calibration(self) -> bool:
        return get_ptq_method(self.method).needs_gram or self.eora is not None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "method_config": asdict(self.method_config),
                "eora": None if self.eora is None else asdict(self.eora),
                "skip_modules": list(self.skip_modules)}


@dataclass
class PTQReport:
    """Per-layer rows and totals of one PTQ run (JSON-able via :meth:`to_dict`)."""

    config: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def totals(self) -> dict[str, float]:
        n = sum(r["numel"] for r in self.layers)
        bits = sum(r["bits"] for r in self.layers)
        ad = sum(r.get("adapter_bits", 0) for r in self.layers)
        rep = sum(r["bits_reported"] for r in self.layers)
        return {"weights": n, "bits_per_weight": bits / n, "bits_per_weight_reported": rep / n,
                "adapter_bits_per_weight": ad / n, "bits_per_weight_with_adapters": (bits + ad) / n}

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "totals": self.totals(), "seconds": self.seconds,
                "layers": self.layers}

    def table(self) -> str:
        """A text table: layer, shape, bpw, weight and calibration-output errors."""
        eora = any("out_rel_err_eora" in r for r in self.layers)
        head = f"{'layer':44s} {'shape':>11s} {'bpw':>6s} {'w_err':>8s} {'out_err':>8s}"
        lines = [head + (f" {'+eora':>8s} {'ad_bpw':>6s}" if eora else "")]
        for r in self.layers:
            shape = "x".join(map(str, r["shape"]))
            oe = r.get("out_rel_err")
            line = (f"{r['name'][-44:]:44s} {shape:>11s} {r['bits'] / r['numel']:6.3f} "
                    f"{r['weight_rel_err']:8.4f} {'-' if oe is None else f'{oe:8.4f}':>8s}")
            if eora:
                line += f" {r['out_rel_err_eora']:8.4f} {r['adapter_bits'] / r['numel']:6.3f}"
            lines.append(line)
        t = self.totals()
        lines.append(f"bits/weight (honest, all scales/masks/indices): {t['bits_per_weight']:.3f}"
                     f"; as the method reports it: {t['bits_per_weight_reported']:.3f}")
        if eora:
            lines.append(f"EoRA adapters: +{t['adapter_bits_per_weight']:.3f} bits/weight -> "
                         f"{t['bits_per_weight_with_adapters']:.3f} bits/weight in total")
        return "\n".join(lines)


def _rel(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _quantize_layer(name: str, mod: nn.Module, stats: LayerStats, cfg: PTQConfig,
                    report: PTQReport) -> nn.Module:
    method = get_ptq_method(cfg.method)
    w = get_weight(mod).detach().to(torch.float32)
    lq = method.fn(w, stats, cfg.method_config)
    delta = w - lq.w_hat
    row: dict[str, Any] = {
        "name": name, "shape": list(w.shape), "numel": w.numel(), "bits": lq.bits,
        "bits_reported": lq.bits if lq.bits_reported is None else lq.bits_reported,
        "weight_rel_err": _rel(float(delta.double().pow(2).sum()), float(w.double().pow(2).sum())),
        **lq.info,
    }
    new: nn.Module = mod
    if stats.gram is not None:
        ref = weighted_error(w, stats.gram)
        row["out_rel_err"] = _rel(weighted_error(delta, stats.gram), ref)
    set_weight(mod, lq.w_hat)
    if cfg.eora is not None:
        factors = adapter_from_delta(delta, stats.gram, cfg.eora)
        new = LowRankAdapter(mod, **{k: v.to(w.device) for k, v in factors.items()})
        a, b = new.factors()  # as stored (rounded to the adapter dtype)
        comp = delta.double() - b.double() @ a.double()
        row["out_rel_err_eora"] = _rel(weighted_error(comp, stats.gram), ref)
        row["adapter_bits"] = adapter_bits(*w.shape, cfg.eora)
    if cfg.keep_tensors:
        report.tensors[name] = dict(lq.tensors)
    report.layers.append(row)
    return new


def quantize_model_ptq(model: nn.Module, cfg: PTQConfig,
                       batches: list[dict[str, torch.Tensor]] | None = None) -> PTQReport:
    """Quantize ``model``'s linears in place with ``cfg``; returns the :class:`PTQReport`.

    ``batches``: calibration batches (``input_ids``, ``attention_mask``, ...), required when the
    method needs the Gram matrix or EoRA is on; given to a calibration-free method they only
    serve to report each layer's output error.
    """
    if cfg.needs_calibration and not batches:
        raise ValueError(f"PTQ method {cfg.method!r}{' with EoRA' if cfg.eora else ''} needs "
                         "calibration data: pass --calib-file FILE")
    if any(isinstance(m, LowRankAdapter) for m in model.modules()):
        raise ValueError("model already has EoRA adapters: start from the full-precision model")
    groups = linear_groups(model, cfg.skip_modules)
    if not groups:
        raise ValueError("no linear layers to quantize; check skip_modules")
    report = PTQReport(config=cfg.to_dict())
    t0 = time.perf_counter()
    # with batches, calibration-free methods get their output error measured as well
    was_training = model.training
    model.eval()
    calib = make_calibrator(model, groups, batches) if batches else None
    for index, group in enumerate(groups):
        stats = calib.grams(group) if calib else {n: LayerStats() for n, _ in group}
        for name, mod in group:
            new = _quantize_layer(name, mod, stats[name], cfg, report)
            if new is not mod:
                model.set_submodule(name, new)
        if calib:
            calib.advance(index)
        logger.info("ptq: %s done (%d linears)", group[0][0].rsplit(".", 1)[0], len(group))
    report.seconds = time.perf_counter() - t0
    model.train(was_training)
    return report


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankAdapter` by its base layer with ``W ← Ŵ + B·A``, in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowRankAdapter):
            w = get_weight(mod.base).detach().to(torch.float32)
            a, b = mod.factors()
            set_weight(mod.base, w + b @ a)
            model.set_submodule(name, mod.base)
    return model
