"""Native engine vs torch: prefill and decode tokens/s of a SmolLM2-135M-shaped packed model.

Three ways to run the same random-weight model (``bench_e2e.py --arch llama`` builds the
checkpoints: SmolLM2-135M shape, 30 layers, hidden 576, GQA 9/3 heads, FFN 1536, vocab 49152,
tied embeddings), each in its own worker process (peak RSS per process):

* ``torch fp32``: transformers' ``LlamaForCausalLM`` from the fp32 checkpoint;
* ``tbt torch``: ``load_packed(dir)``, the packed layers on the C kernels one call per layer,
  everything else in torch (torch threads 1, its best setting for decoding);
* ``tbt engine``: ``tbt.runtime.engine.Engine`` (``engine="native"``), the whole step in C.

Each worker runs, per batch size: a ``--prompt``-token prefill (one forward; tokens/s =
batch·prompt / time), then ``--new-tokens`` greedy decoding steps with the KV cache (tokens/s =
batch·steps / time). Times are the best of ``--repeat`` runs, after a warm-up run. Packed
settings: the LM head quantized with the embedding (``head=packed``) and TBT's FP head.

Usage::

    python benchmarks/bench_engine.py [--batch 1,8,32] [--threads 2] [--workdir DIR]
        [--out benchmarks/results/engine-DATE.md] [--profile]

``--workdir`` keeps the checkpoints (building them takes minutes) and reuses them.
``--profile`` adds the engine's split of a decoding step (linears, attention, the rest, head).

``--worker engine-s2s --dir PACKED`` times the encoder-decoder engine
(:class:`tbt.runtime.engine_s2s.Seq2SeqEngine`) on a packed BART/mBART/Marian folder:
prefill = the encoder over ``--prompt`` source tokens plus the first decoder step, decode =
the next ``--new-tokens`` greedy steps. ``bench_peers.py`` runs it on the BART-base shape
next to the torch backend and CTranslate2.
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

HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _loop_torch(model, prompt, steps: int) -> tuple[float, float]:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        t = time.perf_counter()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        t_pre = time.perf_counter() - t
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return t_pre, time.perf_counter() - t


def _loop_engine(eng, prompt, steps: int) -> tuple[float, float]:
    eng.reset()
    t = time.perf_counter()
    logits = eng.forward(prompt, reserve=steps)
    t_pre = time.perf_counter() - t
    tok = logits.argmax(-1)[:, None]
    t = time.perf_counter()
    for _ in range(steps):
        tok = eng.forward(tok).argmax(-1)[:, None]
    return t_pre, time.perf_counter() - t


def _loop_s2s(eng, src, steps: int) -> tuple[float, float]:
    """encoder + first decoder step, then ``steps`` greedy decoder steps."""
    import numpy as np

    t = time.perf_counter()
    eng.encode(src, None, max_new_tokens=steps + 1)
    start = eng.generation_config["decoder_start_token_id"]
    tok = eng.step(np.full(src.shape[0], start)).argmax(-1)
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        tok = eng.step(tok).argmax(-1)
    return t_pre, time.perf_counter() - t


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    if args.worker == "engine-s2s":
        from tbt.runtime.engine_s2s import Seq2SeqEngine

        model = Seq2SeqEngine(args.dir)
        loop = _loop_s2s
        vocab = model.vocab_size
        mk = lambda b: np.random.default_rng(2).integers(3, vocab, (b, args.prompt))  # noqa: E731
    elif args.worker == "engine":
        from tbt.runtime.engine import Engine

        model = Engine.from_packed_dir(args.dir)
        loop = _loop_engine
        vocab = model.vocab_size
        mk = lambda b: np.random.default_rng(2).integers(3, vocab, (b, args.prompt))  # noqa: E731
    else:
        import torch
        import transformers as tf

        torch.set_num_threads(1 if args.worker == "tbt-torch" else args.threads)
        if args.worker == "fp32":
            model = tf.AutoModelForCausalLM.from_pretrained(args.dir).eval()
        else:
            from tbt.export.io import load_packed

            model = load_packed(args.dir)
        loop = _loop_torch
        vocab = model.config.vocab_size
        mk = lambda b: torch.randint(3, vocab, (b, args.prompt),  # noqa: E731
                                     generator=torch.Generator().manual_seed(2))
    res = {}
    for b in [int(x) for x in args.batch.split(",")]:
        prompt = mk(b)
        loop(model, prompt, 2)  # warm-up: kernel layouts, allocator, caches
        best_pre = best_dec = float("inf")
        for _ in range(args.repeat):
            t_pre, t_dec = loop(model, prompt, args.new_tokens)
            best_pre, best_dec = min(best_pre, t_pre), min(best_dec, t_dec)
        res[b] = {"prefill_tok_s": b * args.prompt / best_pre,
                  "decode_tok_s": b * args.new_tokens / best_dec,
                  "decode_ms_step": best_dec / args.new_tokens * 1e3}
    out = {"batches": res, "peak_rss_mb": _peak_rss_mb()}
    if args.profile and args.worker == "engine-s2s":
        src = mk(1)
        model.profile(True)
        t = time.perf_counter()
        model.encode(src, None, max_new_tokens=args.new_tokens + 1)
        t_enc = time.perf_counter() - t
        enc = model.profile_result()
        model.profile(True)  # decoding steps only
        tok = np.full(1, model.generation_config["decoder_start_token_id"])
        for _ in range(args.new_tokens):
            tok = model.step(tok).argmax(-1)
        out["profile_us_per_step"] = {k: [w / args.new_tokens * 1e6, c / args.new_tokens * 1e6]
                                      for k, (w, c) in model.profile_result().items()}
        out["encode_profile_us"] = {"total wall": t_enc * 1e6,
                                    **{k: w * 1e6 for k, (w, _) in enc.items()}}
    if args.profile and args.worker == "engine":
        model.reset()
        tok = model.forward(mk(1), reserve=args.new_tokens).argmax(-1)[:, None]
        model.profile(True)  # decoding steps only
        for _ in range(args.new_tokens):
            tok = model.forward(tok).argmax(-1)[:, None]
        out["profile_us_per_step"] = {k: [w / args.new_tokens * 1e6, c / args.new_tokens * 1e6]
                                      for k, (w, c) in model.profile_result().items()}
    print("RESULT " + json.dumps(out))


def _run(kind: str, d: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--dir", d, "--batch", args.batch,
           "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ, TBT_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {d}: worker failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _checkpoints(work: Path, quick: bool) -> dict:
    index = work / "runs.json"
    if index.is_file():
        return json.loads(index.read_text())
    sys.path.insert(0, str(HERE))
    import bench_e2e

    work.mkdir(parents=True, exist_ok=True)
    runs = bench_e2e.build(work, quick, ("2-2-8",), heads=("packed", "fp"), arch="llama")
    index.write_text(json.dumps(runs))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoding steps")
    p.add_argument("--threads", type=int, default=2, help="kernel threads (TBT_NUM_THREADS); "
                   "torch fp32's intra-op threads too")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (best kept)")
    p.add_argument("--quick", action="store_true", help="the small llama shape (smoke run)")
    p.add_argument("--workdir", help="keep/reuse the checkpoints here")
    p.add_argument("--paths", default="fp32,tbt-torch,engine",
                   help="which of fp32, tbt-torch, engine to run")
    p.add_argument("--profile", action="store_true", help="engine: time the parts of a step")
    p.add_argument("--out", help="also write the Markdown report here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    paths = [x for x in args.paths.split(",") if x]
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    with tempfile.TemporaryDirectory() as tmp:
        runs = _checkpoints(Path(args.workdir or tmp), args.quick)
        rows, profiles = [], {}
        for name, info in runs.items():
            kinds = (["fp32"] if info["kind"] == "fp32" else
                     [k for k in ("tbt-torch", "engine") if k in paths])
            for kind in kinds:
                if kind not in paths:
                    continue
                r = _run(kind, info["dir"], args)
                label = "torch fp32" if kind == "fp32" else f"{name} {kind.replace('-', ' ')}"
                rows.append((label, r))
                if "profile_us_per_step" in r:
                    profiles[label] = r["profile_us_per_step"]
                print(f"{label}: {json.dumps(r['batches'])}", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load_after = " ".join(f.read().split()[:3])
    batches = [int(x) for x in args.batch.split(",")]
    head = ("| model / path | " + " | ".join(f"prefill tok/s b={b} | decode tok/s b={b}"
                                            for b in batches) + " | peak RSS MB |")
    lines = [head, "|" + "---|" * (2 * len(batches) + 2)]
    for label, r in rows:
        cells = []
        for b in batches:
            x = r["batches"][str(b)] if str(b) in r["batches"] else r["batches"][b]
            cells += [f"{x['prefill_tok_s']:.0f}", f"{x['decode_tok_s']:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} |")
    report = ["# Native engine vs torch (SmolLM2-135M shape, random weights)", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"{'quick llama shape' if args.quick else 'SmolLM2-135M shape'}; prompt "
              f"{args.prompt} tokens (prefill), {args.new_tokens} greedy decoding steps; "
              f"kernel threads {args.threads}; best of {args.repeat}; load average before "
              f"{load_before}, after {load_after} (`/proc/loadavg`, machine shared).", "",
              *lines, ""]
    for label, prof in profiles.items():
        tot_w = sum(v[0] for v in prof.values())
        report += [f"Engine profile, {label}, batch 1, per decoding step (wall µs / "
                   f"calling-thread CPU µs; total wall {tot_w:.0f} µs):", "",
                   "| part | wall µs | CPU µs |", "|---|---|---|"]
        report += [f"| {k} | {w:.0f} | {c:.0f} |" for k, (w, c) in prof.items()] + [""]
    sys.path.insert(0, str(HERE))
    from bench_e2e import emit_report

    emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
