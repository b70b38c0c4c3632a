"""QAT overhead: forward+backward step time of a converted BART vs the same model unquantized.

    python benchmarks/qat_overhead.py                     # d_model 512, 6+6 layers, batch 8 x 256
    python benchmarks/qat_overhead.py --settings 2-2-8,2-2-2,1-1-1 --steps 5 --device cuda

All settings are measured in one process, interleaved round-robin so that drift in machine load
hits them alike; the table reports the median step time and its ratio to full precision
(target: <= 1.5x).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(d_model: int, layers: int, vocab: int, seq: int):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=d_model // 64, decoder_attention_heads=d_model // 64,
                     encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
                     max_position_embeddings=max(seq, 64), dropout=0.0, attention_dropout=0.0)
    return BartForConditionalGeneration(cfg)


def step(model, batch, opt) -> float:
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.zero_grad(set_to_none=True)
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="source and target length")
    ap.add_argument("--settings", default="2-2-8,2-2-2,1-1-1", help="E-W-A settings to compare")
    ap.add_argument("--variant", default="paper", choices=["paper", "released"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's; 1 is the fair choice on a "
                         "shared machine, where OpenMP barriers stall under contention)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tbt import QuantConfig, quantize_model

    torch.manual_seed(0)
    base = build(args.d_model, args.layers, args.vocab, args.seq)
    models = {"fp": base}
    for s in args.settings.split(","):
        models[s] = quantize_model(copy.deepcopy(base), QuantConfig(bits=s, variant=args.variant))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids.to(args.device), "labels": ids.roll(1, 1).to(args.device)}
    opts = {}
    for name, m in models.items():
        m.to(args.device).train()
        opts[name] = torch.optim.SGD(m.parameters(), lr=0.0)
        step(m, batch, opts[name])  # warm-up (and α initialisation)
    times = {n: [] for n in models}
    for _ in range(args.steps):
        for n, m in models.items():
            times[n].append(step(m, batch, opts[n]))
    fp = statistics.median(times["fp"])
    n_params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"BART d_model={args.d_model} {args.layers}+{args.layers} layers ({n_params:.1f}M params), "
          f"batch {args.batch}x{args.seq}, device={args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps, variant={args.variant}")
    print("| setting | step (s) | ratio vs fp |\n|---|---|---|")
    for n in models:
        t = statistics.median(times[n])
        print(f"| {n} | {t:.3f} | {t / fp:.2f}x |")


if __name__ == "__main__":
    main()
