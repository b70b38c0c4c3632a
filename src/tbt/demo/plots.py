"""Figures of the demo: training curves, and weight/activation histograms FP vs quantized.

matplotlib is imported inside the functions with the non-interactive ``Agg`` backend, so the
figures render on a machine without a display.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):  # trailing mean over k points
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot_training_curves(teacher: Mapping[str, str], students: Mapping[str, str], path: str,
                         smooth: int = 10) -> str:
    """Three panels from ``log.jsonl`` files (``name -> path``).

    * the teacher's label cross-entropy, its phases (e.g. warm-up, then the task) one after the
      other on one step axis, training (smoothed) and validation;
    * the students' training loss (every term; the soft cross-entropy part is bounded below by
      the teacher's entropy, so it does not go to 0);
    * the students' validation label cross-entropy, with the teacher's last value for reference.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    offset, teacher_val = 0, None
    for i, (name, log_path) in enumerate(teacher.items()):
        log = read_log(log_path)
        steps = [offset + r["step"] for r in log]
        axes[0].plot(steps, _smooth([r["ce"] for r in log], smooth), color=f"C{i}",
                     label=f"{name} (train)")
        val = [(offset + r["step"], r["val_ce"]) for r in log if "val_ce" in r]
        if val:
            axes[0].plot(*zip(*val), "o--", color=f"C{i}", label=f"{name} (validation)")
            teacher_val = val[-1][1]
        if offset:
            axes[0].axvline(offset, color="0.5", linestyle=":")
        offset = steps[-1] if steps else offset
    for i, (name, log_path) in enumerate(students.items()):
        log = read_log(log_path)
        axes[1].plot([r["step"] for r in log], _smooth([r["loss"] for r in log], smooth),
                     color=f"C{i + 2}", label=name)
        val = [(r["step"], r["val_ce"]) for r in log if "val_ce" in r]
        if val:
            axes[2].plot(*zip(*val), "o-", color=f"C{i + 2}", label=name)
    if teacher_val is not None:
        axes[2].axhline(teacher_val, color="k", linestyle="--", label="FP teacher")
    titles = ("teacher: label cross-entropy", "students: training loss (all terms)",
              "students: validation label cross-entropy")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def layer_tensors(model: torch.nn.Module, layer: str, batch: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """FP and quantized weight and input activation of ``layer`` (a QuantLinear) on ``batch``.

    Returns ``weight_fp`` (the latent weight), ``weight_q`` (what the forward uses),
    ``act_fp`` (the layer's input) and ``act_q`` (after the input quantizer), all flattened
    float32. The padding positions are dropped from the activations.
    """
    mod = model.get_submodule(layer)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(m, args, out) -> None:  # returns None: the output is left alone
        seen.setdefault("x", args[0].detach())

    hook = mod.register_forward_hook(keep_input)
    was_training = model.training
    model.eval()
    try:
        model(**batch)
    finally:
        hook.remove()
        model.train(was_training)
    x = seen["x"].float()
    if "attention_mask" in batch and x.shape[:2] == batch["attention_mask"].shape:
        x = x[batch["attention_mask"].bool()]
    w_fp = mod.weight.detach().float()
    w_q = mod.quantized_weight().float() if hasattr(mod, "quantized_weight") else w_fp
    aq = getattr(mod, "act_quant", None)
    x_q = aq(x).float() if aq is not None else x
    return {"weight_fp": w_fp.flatten(), "weight_q": w_q.flatten(), "act_fp": x.flatten(),
            "act_q": x_q.flatten()}


def _levels(ax, values: torch.Tensor, label: str, color: str) -> None:
    """A histogram of a quantized tensor: a bar per distinct level when there are few."""
    uniq, counts = torch.unique(values, return_counts=True)
    share = (counts.float() / counts.sum()).tolist()
    if len(uniq) <= 16:  # few levels (per tensor, or per row when few rows differ)
        ax.vlines(uniq.tolist(), 0, share, colors=color, linewidth=3, label=label)
    else:
        hist, edges = torch.histogram(values, bins=80)
        ax.stairs((hist / hist.sum()).tolist(), edges.tolist(), color=color, label=label)


def plot_histograms(tensors: Mapping[str, Mapping[str, torch.Tensor]], layer: str,
                    path: str) -> str:
    """For each model (``name -> layer_tensors(...)``): weights and input activations of
    ``layer``, full precision (grey) vs quantized (colour), like the paper's distribution plots.
    """
    plt = _pyplot()
    names = list(tensors)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6), squeeze=False)
    for j, name in enumerate(names):
        t = tensors[name]
        for i, kind in enumerate(("weight", "act")):
            ax = axes[i][j]
            fp = t[f"{kind}_fp"]
            hist, edges = torch.histogram(fp, bins=80)
            ax.stairs((hist / hist.sum()).tolist(), edges.tolist(), fill=True, color="0.75",
                      label="full precision")
            if not torch.equal(t[f"{kind}_q"], fp):
                _levels(ax, t[f"{kind}_q"], "quantized", "C3")
            ax.set_title(f"{name}: {'weights' if kind == 'weight' else 'input activations'}",
                         fontsize=9)
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
        axes[0][j].legend(fontsize=7)
    fig.suptitle(f"layer {layer}: share of values (log scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_all(out_dir: str, teacher_logs: Mapping[str, str], student_logs: Mapping[str, str],
             tensors: Mapping[str, Mapping[str, Any]], layer: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [plot_training_curves(teacher_logs, student_logs,
                                 os.path.join(out_dir, "training_curves.png")),
            plot_histograms(tensors, layer, os.path.join(out_dir, "histograms.png"))]
