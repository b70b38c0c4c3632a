"""End-to-end CPU benchmark: fp32 torch vs packed tbt checkpoints on the integer kernels.

A BART-base-shaped model (d_model 768, 6+6 layers, 12 heads, FFN 3072, vocab 50265; random
weights, seed 0) is saved as an fp32 safetensors checkpoint (``save_pretrained``) and, for each
setting (2-2-8, 1-1-8, 2-2-2, 1-1-1; α initialised from one random batch), as packed
checkpoints with the LM head in FP (TBT's default, tied to the latent embedding) and in int8.
Each checkpoint is then loaded and run in its own subprocess, so peak RSS is per model:

* greedy generation, batch 1, a ``--src-len``-token source, exactly ``--new-tokens`` new tokens
  (``min_new_tokens = max_new_tokens``, KV cache): tokens/s of the whole ``generate`` call and
  of the decoding steps alone (``(t_N − t_1)/(N − 1)``: prefill and the first step removed);
* peak RSS of the process (``VmHWM``: load + generate) and RSS after loading;
* checkpoint size on disk, and for the packed ones the size without the LM head.

``--profile`` adds a cProfile of one generate call of the first setting (both heads).
Timings are the best over ``--rounds`` interleaved worker processes × ``--repeat`` runs each,
so a load spike on a shared machine does not land on one model only.
``--quick`` uses a small shape (d_model 256, 2+2 layers, vocab 8000) for a smoke run.
``--arch llama`` runs a decoder-only model of the SmolLM2-135M shape instead (30 layers,
hidden 576, GQA 9/3 heads, FFN 1536, vocab 49152, tied embeddings; the source is the prompt).

Usage::

    python benchmarks/bench_e2e.py [--quick] [--arch bart|llama] [--torch-threads 1]
        [--heads fp,int8,packed] [--out benchmarks/results/e2e-DATE.md] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("2-2-8", "1-1-8", "2-2-2", "1-1-1")
BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
            decoder_ffn_dim=3072, max_position_embeddings=1024)
QUICK = dict(vocab_size=8000, d_model=256, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
             decoder_ffn_dim=1024, max_position_embeddings=256)


# --arch llama: the SmolLM2-135M shape (decoder-only, GQA, tied embeddings), random weights
LLAMA = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
             tie_word_embeddings=True)
LLAMA_QUICK = dict(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   tie_word_embeddings=True)


def _shape(arch: str, quick: bool) -> dict:
    if arch == "llama":
        return LLAMA_QUICK if quick else LLAMA
    return QUICK if quick else BASE


def _config(quick: bool, arch: str = "bart"):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_shape(arch, quick), bos_token_id=1, eos_token_id=2)
    return tf.BartConfig(**(QUICK if quick else BASE), pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                         forced_bos_token_id=None, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0)


def _dir_bytes(d: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.name not in skip)


def _head_bytes(d: Path) -> int:
    """Bytes of the LM head tensors inside a packed checkpoint (from its metadata)."""
    from tbt.export.io import read_packed_metadata

    meta = read_packed_metadata(d)
    entry = meta["lm_head"]
    size = {"F32": 4, "I8": 1, "F16": 2, "BF16": 2, "U8": 1}
    if entry["format"] == "packed":
        return 0  # quantized in training, tied: the token embedding's codes (stored once)
    keys = ([f"{entry['name']}.weight"] if entry["format"] == "fp"
            else [entry["weight"], entry["scale"]])
    out = 0
    for k in keys:
        k = meta["aliases"].get(k, k)
        dtype, shape = meta["tensors"][k]
        n = 1
        for s in shape:
            n *= s
        out += n * size[dtype]
    return out


HEADS = ("fp", "int8", "packed")


def build(work: Path, quick: bool, settings: tuple[str, ...],
          heads: tuple[str, ...] = HEADS, arch: str = "bart") -> dict[str, dict]:
    """Write the fp32 and packed checkpoints; returns {name: {dir, kind, bytes, ...}}."""
    import copy

    import torch
    import transformers as tf

    from tbt.config import QuantConfig
    from tbt.export.io import save_packed
    from tbt.quant.surgery import quantize_model

    torch.manual_seed(0)
    cls = tf.LlamaForCausalLM if arch == "llama" else tf.BartForConditionalGeneration
    fp = cls(_config(quick, arch)).eval()
    fp_dir = work / "fp32"
    fp.save_pretrained(fp_dir, safe_serialization=True)
    fp_bytes = (fp_dir / "model.safetensors").stat().st_size
    runs = {"fp32": {"dir": str(fp_dir), "kind": "fp32", "bytes": fp_bytes}}
    src = torch.randint(3, fp.config.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(1))
    for bits in settings:
        for head in heads:
            # "packed": the head quantized with the embedding (skip_modules=(), trained so);
            # "fp"/"int8": TBT's FP head, stored as is or post-training int8
            qcfg = QuantConfig(bits=bits, skip_modules=() if head == "packed" else ("lm_head",))
            m = quantize_model(copy.deepcopy(fp), qcfg).train()
            with torch.no_grad():
                kw = {} if arch == "llama" else {"decoder_input_ids": src[:, :8]}
                m(input_ids=src, **kw)  # α from one batch
            m.eval()
            d = work / f"{bits}-{head}"
            save_packed(m, d, lm_head="int8" if head == "int8" else "fp")
            size = (d / "tbt_packed.safetensors").stat().st_size
            runs[f"{bits} head={head}"] = {"dir": str(d), "kind": "packed", "bytes": size,
                                          "bytes_no_head": size - _head_bytes(d)}
            del m
    return runs


def worker(args: argparse.Namespace) -> None:
    """One model in this process: load, generate, report JSON on stdout."""
    import torch
    import transformers as tf

    torch.set_num_threads(args.torch_threads or args.threads)
    t0 = time.perf_counter()
    if args.worker == "fp32":
        model = tf.AutoModelForCausalLM.from_pretrained(args.dir).eval() if args.arch == "llama" \
            else tf.BartForConditionalGeneration.from_pretrained(args.dir).eval()
    else:
        from tbt.export.io import load_packed

        model = load_packed(args.dir, backend="native")
    load_s = time.perf_counter() - t0
    rss_load = _rss_now()
    src = torch.randint(3, model.config.vocab_size, (1, args.src_len),
                        generator=torch.Generator().manual_seed(2))

    def gen(n: int):
        with torch.inference_mode():
            return model.generate(input_ids=src, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=1, use_cache=True)

    gen(2)  # warm up (kernel layouts, allocator)
    t1 = min(_timed(lambda: gen(1)) for _ in range(args.repeat))
    tn = min(_timed(lambda: gen(args.new_tokens)) for _ in range(args.repeat))
    out = {"load_s": load_s, "t_first_s": t1, "t_total_s": tn,
           "gen_tok_s": args.new_tokens / tn,
           "decode_tok_s": (args.new_tokens - 1) / max(tn - t1, 1e-9),
           "rss_load_mb": rss_load / 2**20, "peak_rss_mb": _peak_rss() / 2**20}
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        gen(args.new_tokens)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        out["profile"] = s.getvalue()
    print("RESULT " + json.dumps(out))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _peak_rss() -> int:
    """VmHWM of this process in bytes (``ru_maxrss`` would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_worker(name: str, info: dict, args: argparse.Namespace, profile: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", info["kind"], "--dir", info["dir"],
           "--src-len", str(args.src_len), "--new-tokens", str(args.new_tokens),
           "--arch", args.arch,
           "--threads", str(args.threads), "--repeat", str(args.repeat),
           "--torch-threads", str(args.torch_threads or args.threads)]
    if profile:
        cmd.append("--profile")
    env = dict(os.environ, TBT_NUM_THREADS=str(args.threads))
    if args.omp_wait:
        env["OMP_WAIT_POLICY"] = args.omp_wait
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name}: worker failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def table(runs: dict[str, dict]) -> str:
    fp = runs["fp32"]
    rows = ["| model | checkpoint MB | vs fp32 | w/o LM head MB | vs fp32 | load s | "
            "generate tok/s | decode tok/s | decode speedup | RSS after load MB | "
            "peak RSS MB |", "|" + "---|" * 11]
    fp_bytes = fp["bytes"]
    for name, r in runs.items():
        no_head = r.get("bytes_no_head")
        nh_mb = "" if no_head is None else f"{no_head / 1e6:.1f}"
        nh_rel = "" if no_head is None else f"{no_head / fp_bytes:.3f}"
        rows.append(
            f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / fp_bytes:.3f} | "
            f"{nh_mb} | {nh_rel} | "
            f"{r['load_s']:.1f} | {r['gen_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / fp['decode_tok_s']:.2f}x | {r['rss_load_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape (smoke run)")
    p.add_argument("--arch", choices=("bart", "llama"), default="bart",
                   help="bart: BART-base shape (default); llama: the SmolLM2-135M shape "
                        "(decoder-only, 30 layers, d 576, GQA 9/3 heads, tied embeddings)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="E-W-A settings to run")
    p.add_argument("--src-len", type=int, default=64, help="source tokens (batch 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens (exactly)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads and native kernel threads (TBT_NUM_THREADS)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch's intra-op threads (default: --threads). The packed models leave "
                        "torch only small attention ops, where waking a second OpenMP thread "
                        "per op costs more than it saves: 1 is their best setting")
    p.add_argument("--omp-wait", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the workers ('' keeps the environment's): torch's "
                        "OpenMP workers spin after each op by default and steal the core the "
                        "kernels' pool needs, and vice versa (same for fp32 and packed)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per worker (best kept)")
    p.add_argument("--rounds", type=int, default=2,
                   help="worker processes per model, interleaved (the best run is reported)")
    p.add_argument("--heads", default=",".join(HEADS),
                   help="LM heads of the packed models: fp (TBT: FP, tied to the latent "
                        "embedding), int8 (post-training int8 of that FP head), packed (quantized "
                        "in training with the embedding, skip_modules=(): shares its codes)")
    p.add_argument("--profile", action="store_true", help="cProfile the packed 2-2-8 run")
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument("--workdir", help="keep the checkpoints here and reuse them on the next run "
                                     "(default: a temporary directory)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    settings = tuple(s for s in args.settings.split(",") if s)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        index = work / "runs.json"
        t = time.perf_counter()
        if args.workdir and index.is_file():  # checkpoints of an earlier run, same options
            runs = json.loads(index.read_text())
        else:
            work.mkdir(parents=True, exist_ok=True)
            runs = build(work, args.quick, settings, arch=args.arch, heads=
                         tuple(h for h in args.heads.split(",") if h))
            index.write_text(json.dumps(runs))
        build_s = time.perf_counter() - t
        profiles: dict[str, str] = {}
        for rnd in range(args.rounds):  # interleaved rounds: a load spike hits every model
            for name, info in runs.items():
                do_prof = args.profile and rnd == 0 and name.startswith(settings[0] + " ")
                res = _run_worker(name, info, args, do_prof)
                if do_prof:
                    profiles[name] = res.pop("profile")
                if res["decode_tok_s"] > info.get("decode_tok_s", 0):
                    info.update(res)
                print(f"round {rnd}: {name}: {res['decode_tok_s']:.1f} decode tok/s, "
                      f"{res['peak_rss_mb']:.0f} MB peak", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    shape = _shape(args.arch, args.quick)
    report = ["# End-to-end: fp32 torch vs packed tbt (native kernels)", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.arch}-shaped "
              f"{json.dumps(shape)}; random weights; batch 1, {args.src_len}-token source, "
              f"{args.new_tokens} new tokens (greedy, KV cache); "
              f"threads: tbt kernels {args.threads}, "
              f"torch {args.torch_threads or args.threads}; "
              f"OMP_WAIT_POLICY={args.omp_wait or 'unset'}; "
              f"best of {args.rounds} processes x {args.repeat} runs; "
              f"checkpoints built in {build_s:.0f} s; load average "
              f"{' '.join(load)} (machine load).", "", table(runs), ""]
    for name, prof in profiles.items():
        report += [f"cProfile of one {name} generate call (top functions by own time):", "",
                   "```", prof.strip(), "```", ""]
    emit_report(report, args.out)
    return 0


def emit_report(lines: list[str], out: str | None) -> None:
    """Print a Markdown report and, with ``--out``, also write it there (the benchmarks share it)."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
