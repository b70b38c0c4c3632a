"""Compare the PTQ methods on one model: perplexity, true bits/weight, time and peak memory.

    python benchmarks/ptq_compare.py                      # SmolLM2-135M (gguf:smollm2) on the
                                                          # stdlib docstring corpus
    python benchmarks/ptq_compare.py --model DIR --runs rtn-row,ptqtp --calib-samples 64

Each method runs as its own ``tbt ptq`` process (so peak RSS and wall time are its own), on the
same calibration rows (the corpus' train split, ``document`` column) and the same held-out rows
(test split). The model is converted once from GGUF to a plain checkpoint. Results go to
``benchmarks/results/ptq_compare_<name>.{md,json}``. Bits/weight count every code, scale, mask,
index and adapter of the quantized linears (docs/ptq.md); embeddings and the LM head stay
full precision and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RUNS: dict[str, list[str]] = {
    "rtn-absmean-tensor": ["--method", "rtn"],
    "rtn-absmean-row": ["--method", "rtn", "--granularity", "row"],
    "ptqtp-row": ["--method", "ptqtp"],
    # also reports PTQTP without the adapters (perplexity_after_uncompensated)
    "ptqtp-row+eora16": ["--method", "ptqtp", "--compensate", "eora", "--rank", "16"],
    "pbllm-10%": ["--method", "pbllm", "--salient-frac", "0.1"],
    "billm": ["--method", "billm"],
}
CALIBRATION_FREE = ("rtn-absmean-tensor", "rtn-absmean-row", "ptqtp-row")


def prepare_model(model: str, work: str) -> str:
    """A local checkpoint directory for ``model`` (GGUF converted once, directories as is)."""
    if os.path.isdir(model):
        return model
    out = os.path.join(work, "fp-model")
    if not os.path.isfile(os.path.join(out, "config.json")):
        from tbt.hf.gguf import load_gguf_model, load_gguf_tokenizer

        m, tok = load_gguf_model(model), load_gguf_tokenizer(model)
        m.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def prepare_data(work: str) -> dict[str, str]:
    from tbt.demo.corpus import build_docstring_corpus

    root = os.path.join(work, "corpus")
    if os.path.isfile(os.path.join(root, "test.jsonl")):
        return {s: os.path.join(root, f"{s}.jsonl") for s in ("train", "validation", "test")}
    return build_docstring_corpus(root)


def run_one(label: str, extra: list[str], model_dir: str, data: dict[str, str],
            args: argparse.Namespace, first: bool) -> dict:
    out = os.path.join(args.work, "runs", label)
    # calibration-free methods get no calibration text (it would only measure layer errors)
    calib = [] if label in CALIBRATION_FREE else ["--calib-file", data["train"]]
    before = [] if first else ["--no-eval-before"]  # the FP perplexity is measured once
    cmd = [sys.executable, "-m", "tbt", "ptq", "--model", model_dir, *extra, *calib, *before,
           "--eval-file", data["test"], "--text-column",
           "document", "--calib-samples", str(args.calib_samples), "--eval-samples",
           str(args.eval_samples), "--max-length", str(args.max_length), "--batch-size",
           str(args.batch_size), "--output-dir", out, "--no-save"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "ptq_report.json")) as f:
        rep = json.load(f)
    t = rep["totals"]
    row = {"run": label, "ppl_fp": rep["metrics"].get("perplexity_before"),
           "ppl": rep["metrics"]["perplexity_after"],
           "ppl_uncompensated": rep["metrics"].get("perplexity_after_uncompensated"),
           "bpw": t["bits_per_weight_with_adapters"],
           "bpw_codes_scales": t["bits_per_weight"], "bpw_reported": t["bits_per_weight_reported"],
           "adapter_bpw": t["adapter_bits_per_weight"], "quant_s": rep["seconds"],
           "wall_s": wall, "peak_rss_mib": rep["peak_rss_mib"], "layers": len(rep["layers"])}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# PTQ comparison: {args.model}", "",
             f"Calibration: {args.calib_samples} rows, eval: {args.eval_samples} rows of the "
             f"stdlib docstring corpus (`document`, <= {args.max_length} tokens). "
             f"{rows[0]['layers']} linears quantized (LM head and embeddings FP). "
             "Quantize s includes the sequential calibration passes (methods marked * get no "
             "calibration). CPU, 2 cores shared with other jobs: times are indicative.", "",
             f"FP perplexity: {rows[0]['ppl_fp']:.2f}", "",
             "| run | ppl | bits/weight (all) | codes+scales | as reported by the method | "
             "adapter | quantize s | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("ppl_uncompensated") is not None:
            lines.append(f"| {r['run'].split('+')[0]} (adapters off) | "
                         f"{r['ppl_uncompensated']:.2f} | {r['bpw_codes_scales']:.3f} | "
                         f"{r['bpw_codes_scales']:.3f} | {r['bpw_reported']:.3f} | 0 | - | - "
                         "| - |")
        star = "*" if r["run"] in CALIBRATION_FREE else ""
        lines.append(f"| {r['run']}{star} | {r['ppl']:.2f} | {r['bpw']:.3f} | "
                     f"{r['bpw_codes_scales']:.3f} | {r['bpw_reported']:.3f} | "
                     f"{r['adapter_bpw']:.3f} | {r['quant_s']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gguf:smollm2", help="GGUF name/path or model directory")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="comma list of " + ", ".join(RUNS).replace("%", "%%"))
    p.add_argument("--work", default="/tmp/tbt-ptq-bench", help="scratch directory")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--name", default=None, help="results file suffix (default: from --model)")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model_dir = prepare_model(args.model, args.work)
    data = prepare_data(args.work)
    rows = []
    for i, label in enumerate(args.runs.split(",")):
        rows.append(run_one(label, RUNS[label], model_dir, data, args, first=i == 0))
        write_results(rows, args)
    print(markdown(rows, args))
    return 0


def write_results(rows: list[dict], args: argparse.Namespace) -> None:
    """Rewritten after every run, so an interrupted benchmark keeps what it measured."""
    name = args.name or os.path.basename(args.model.rstrip("/")).replace("gguf:", "")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(here, exist_ok=True)
    with open(os.path.join(here, f"ptq_compare_{name}.json"), "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(here, f"ptq_compare_{name}.md"), "w") as f:
        f.write(markdown(rows, args))


if __name__ == "__main__":
    sys.exit(main())
