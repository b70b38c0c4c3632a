"""Peak training memory of LR-QAT vs full QAT on one tiny-to-small Llama (CPU).

Each mode runs in its own subprocess (so peak RSS is per mode): build a random Llama, quantize it
(``2-2-8`` by default), optionally apply LR-QAT, then run a few AdamW steps on random tokens.
Reported per mode:

* ``peak RSS − baseline``: ``ru_maxrss`` after training minus the RSS right before the model
  is built (imports, allocator arenas excluded);
* ``state MiB``: bytes of every parameter, buffer, gradient and AdamW state tensor after the
  last step, summed from the tensors themselves (what a GPU would also hold persistently);
* the loss of the first and last step (a sanity check that each mode trains).

With ``--device cuda`` the peak column is ``torch.cuda.max_memory_allocated`` during training
minus the allocation before the model was built.

    python benchmarks/lrqat_memory.py                      # default shape, prints Markdown
    python benchmarks/lrqat_memory.py --quick              # small shape for a smoke run
    python benchmarks/lrqat_memory.py --out benchmarks/results/lrqat_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MODES = {
    "full QAT": {},
    "LR-QAT int8": {"storage": "int8"},
    "LR-QAT int8 + ckpt": {"storage": "int8", "checkpoint": True},
    "LR-QAT bf16": {"storage": "bfloat16"},
    "LR-QAT fp32": {"storage": "float32"},
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tensor_bytes(model, opt) -> int:
    import torch

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _warm_up(mode: str, bits: str, rank: int, device: str) -> None:
    tiny = dict(vocab=64, d=32, ff=64, layers=1, heads=2, seq=8, batch=1)
    _train(mode, tiny, 1, bits, rank, device)


def run_one(mode: str, shape: dict, steps: int, bits: str, rank: int, device: str = "cpu"
            ) -> dict:
    import gc

    import torch

    _warm_up(mode, bits, rank, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    params, model, opt, losses = _train(mode, shape, steps, bits, rank, device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"mode": mode, "peak_rss_mib": peak - base,
            "state_mib": _tensor_bytes(model, opt) / 2**20,
            "trainable_m": sum(p.numel() for p in params) / 1e6,
            "first_loss": losses[0], "last_loss": losses[-1]}


def _train(mode: str, shape: dict, steps: int, bits: str, rank: int, device: str) -> tuple:
    import torch
    import transformers as tf

    from tbt.config import QuantConfig
    from tbt.quant.lrqat import LRQATConfig, apply_lrqat
    from tbt.quant.surgery import quantize_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d"],
                         intermediate_size=shape["ff"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         max_position_embeddings=shape["seq"])
    model = tf.LlamaForCausalLM(cfg).to(device)
    quantize_model(model, QuantConfig(bits=bits))
    if MODES[mode]:
        apply_lrqat(model, LRQATConfig(rank=rank, alpha=float(rank), **MODES[mode]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)  # same batch in every mode (B's init uses the RNG)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen)
    ids = ids.to(device)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return params, model, opt, losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape (seconds)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bits", default="2-2-8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", help="also write the Markdown table here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = (dict(vocab=512, d=128, ff=352, layers=2, heads=4, seq=64, batch=2) if a.quick else
             dict(vocab=2048, d=768, ff=2048, layers=4, heads=12, seq=128, batch=4))
    if a._child:
        print(json.dumps(run_one(a._child, shape, a.steps, a.bits, a.rank, a.device)))
        return 0
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for mode in MODES:
        cmd = [sys.executable, __file__, "--_child", mode, "--steps", str(a.steps), "--bits",
               a.bits, "--rank", str(a.rank), "--device", a.device] + (["--quick"] if a.quick
                                                                        else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"Llama d={shape['d']} ff={shape['ff']} layers={shape['layers']} "
             f"vocab={shape['vocab']}"
             f", batch {shape['batch']}x{shape['seq']}, bits {a.bits}, rank {a.rank}, "
             f"{a.steps} AdamW steps, {a.device}, torch {__import__('torch').__version__}", "",
             "| mode | trainable (M) | state MiB (params+buffers+grads+Adam) | "
             f"{'peak RSS' if a.device == 'cpu' else 'max_memory_allocated'} − baseline "
             "MiB | loss first → last |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['trainable_m']:.2f} | {r['state_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.1f} | {r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
