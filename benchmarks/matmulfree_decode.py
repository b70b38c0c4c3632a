"""Greedy decoding of a random MatMul-free LM: FP vs packed (torch) vs packed on t2a8 kernels.

One model per size, random init (speed and size do not depend on training), batch 1:

* ``fp``: the full-precision architecture (float32 ``nn.Linear``);
* ``packed-torch``: ``bitlinear_config()`` + ``convert_model``: ternary codes unpacked once and
  run with ``F.linear`` (exact parity with training);
* ``packed-t2a8``: the same layers on the ``t2a8`` kernel (``set_backend(model, "native")``).

Reports tokens/s (after a prompt of 16 tokens, ``--new`` tokens with EOS suppressed), the
weight bytes of the projections (fp32 vs 2-bit codes + scales), and whether packed-t2a8 picked
the same tokens as packed-torch.

    OMP_NUM_THREADS=1 TBT_NUM_THREADS=1 python benchmarks/matmulfree_decode.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _tokens_per_s(model, prompt, new: int) -> tuple[float, torch.Tensor]:
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2)  # warm-up (caches, repack)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new)
    return new / (time.perf_counter() - t0), out


def run(d: int, layers: int, vocab: int, new: int) -> dict:
    from tbt.export.convert import convert_model
    from tbt.inference.packed import PackedLinear, set_backend
    from tbt.models.matmulfree import MatMulFreeConfig, MatMulFreeForCausalLM
    from tbt.quant.bitlinear import BitLinear, bitlinear_config
    from tbt.quant.surgery import quantize_model

    torch.manual_seed(0)
    fp = MatMulFreeForCausalLM(MatMulFreeConfig(vocab_size=vocab, hidden_size=d,
                                                num_hidden_layers=layers, eos_token_id=2)).eval()
    fp_bytes = sum(m.proj.weight.numel() * 4 for m in fp.modules() if isinstance(m, BitLinear))
    packed = convert_model(quantize_model(copy.deepcopy(fp), bitlinear_config())).eval()
    p_bytes = sum(m.packed.numel() + m.scale.numel() * 4 for m in packed.modules()
                  if isinstance(m, PackedLinear))
    kern = copy.deepcopy(packed)
    set_backend(kern, "native")
    prompt = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    row = {"d": d, "layers": layers, "vocab": vocab, "fp_mib": fp_bytes / 2**20,
           "packed_mib": p_bytes / 2**20}
    with torch.no_grad():
        for name, m in (("fp", fp), ("packed-torch", packed), ("packed-t2a8", kern)):
            row[name], row[f"{name}_out"] = _tokens_per_s(m, prompt, new)
    row["same_tokens"] = bool(torch.equal(row.pop("packed-torch_out"), row.pop("packed-t2a8_out")))
    row.pop("fp_out")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    sizes = [(256, 2, 4096)] if a.quick else [(512, 4, 8192), (1024, 4, 16384), (2048, 2, 32000)]
    from tbt.runtime.kernels import get_kernel

    lines = [f"MatMul-free LM, random init, batch 1, 16-token prompt, {a.new} new tokens, "
             f"torch {torch.__version__} threads {torch.get_num_threads()}, "
             f"kernel {get_kernel('t2', 'a8')!r}", "",
             "| d | layers | vocab | projection weights fp32 MiB | packed MiB | fp tok/s | "
             "packed-torch tok/s | packed-t2a8 tok/s | t2a8 tokens = torch tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, n, v in sizes:
        r = run(d, n, v, a.new)
        lines.append(f"| {d} | {n} | {v} | {r['fp_mib']:.1f} | {r['packed_mib']:.2f} | "
                     f"{r['fp']:.1f} | {r['packed-torch']:.1f} | {r['packed-t2a8']:.1f} | "
                     f"{r['same_tokens']} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
