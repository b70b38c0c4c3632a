"""``tbt ptq``: post-training ternarization/binarization of a model, no training (docs/ptq.md).

Loads a full-precision model, runs the calibration text through it (for the methods that need
activation statistics), quantizes every linear but the LM head with the chosen method (and
optionally fits EoRA adapters), prints the per-layer error table and the bits per weight,
measures the metric before and after on a held-out file, and writes the result as a Hugging
Face checkpoint whose weights *are* the dequantized PTQ weights (adapters merged), usable as
``tbt train --model OUT`` (QAT student initialisation) or ``tbt evaluate --model OUT``.
"""

from __future__ import annotations

import argparse

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_local_dir, check_output_dir, staged_output

# CLI flag dest -> method-config field (only flags given on the command line are passed on)
METHOD_FLAGS = {
    "bits": "bits", "rtn_method": "method", "variant": "variant", "granularity": "granularity",
    "group_size": "group_size", "iters": "iters", "tol": "tol", "ridge": "ridge",
    "ridge_decay": "ridge_decay", "salient_frac": "salient_frac",
    "salient_metric": "salient_metric", "salient_bits": "salient_bits", "gptq": "gptq",
    "center": "center", "block_size": "block_size", "damp": "damp", "max_salient": "max_salient",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ptq", help="post-training ternarization/binarization: rtn, ptqtp, pbllm, billm (+eora)",
        description="Quantize a full-precision model with no training. Prints the per-layer "
                    "reconstruction error and the honest bits per weight, measures perplexity "
                    "before/after on --eval-file, and saves an HF checkpoint of the PTQ weights "
                    "(usable as a QAT student: tbt train --model OUT).")
    p.add_argument("--model", required=True, metavar="M",
                   help="full-precision model: directory, hub name, or GGUF (gguf:smollm2)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the model's)")
    p.add_argument("--method", required=True, metavar="NAME",
                   help="rtn | ptqtp | pbllm | billm (tbt.ptq.PTQ_METHODS)")
    p.add_argument("--output-dir", required=True, metavar="OUT",
                   help="where the checkpoint, ptq_report.json and the table go")
    p.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PATTERN",
                   help="fnmatch patterns of linears left in full precision (default: lm_head)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--save-packed", action="store_true",
                   help="also write OUT/packed, a tbt packed checkpoint (rtn with 1/2 bits, "
                        "ptqtp, pbllm, billm; tbt inspect OUT/packed shows its bits)")
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip the full-precision perplexity (benchmarks that measured it once)")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="write only the report and the table, not the model (benchmarks)")
    m = p.add_argument_group("method options (only those of --method apply)")
    m.add_argument("--bits", type=int, help="rtn: 2 ternary (default), 1 binary, 3..8 uniform")
    m.add_argument("--rtn-method", help="rtn: weight quantizer absmean (default), tbt, twn, bwn")
    m.add_argument("--variant", choices=("paper", "released"), help="rtn with tbt: variant")
    m.add_argument("--granularity", choices=("row", "tensor"),
                   help="rtn: scale per row or per tensor (default: the quantizer's)")
    m.add_argument("--group-size", type=int, help="ptqtp: columns per scale pair (default: row)")
    m.add_argument("--iters", type=int, help="ptqtp: max alternations (50)")
    m.add_argument("--tol", type=float, help="ptqtp: stop at this relative improvement (1e-6)")
    m.add_argument("--ridge", type=float, help="ptqtp: initial ridge lambda (0)")
    m.add_argument("--ridge-decay", type=float, help="ptqtp: lambda factor per iteration (0.5)")
    m.add_argument("--salient-frac", type=float, help="pbllm: salient fraction at 8 bits (0.1)")
    m.add_argument("--salient-metric", choices=("magnitude", "hessian"),
                   help="pbllm (magnitude) / billm (hessian): saliency")
    m.add_argument("--salient-bits", type=int, help="pbllm: bits of the salient weights (8)")
    m.add_argument("--no-gptq", dest="gptq", action="store_const", const=False,
                   help="pbllm/billm: no GPTQ error compensation (RTN variant)")
    m.add_argument("--no-center", dest="center", action="store_const", const=False,
                   help="pbllm: binarize as alpha*sign(w) instead of mu + alpha*sign(w - mu)")
    m.add_argument("--block-size", type=int, help="pbllm/billm: GPTQ block columns (128)")
    m.add_argument("--damp", type=float, help="pbllm/billm: Hessian damping (0.01)")
    m.add_argument("--max-salient", type=int, help="billm: salient-column search limit (50)")
    c = p.add_argument_group("low-rank compensation")
    c.add_argument("--compensate", choices=("none", "eora"), default="none",
                   help="eora: fit a rank-R adapter y = W_q x + B(A x) per layer")
    c.add_argument("--rank", type=int, default=16, help="EoRA rank (16)")
    c.add_argument("--adapter-dtype", choices=("float16", "bfloat16", "float32", "int8"),
                   default="float16", help="storage dtype of A and B (float16; int8: per-row "
                                           "symmetric codes + float32 row scales)")
    d = p.add_argument_group("data")
    d.add_argument("--calib-file", metavar="F",
                   help="calibration text (.txt lines, .jsonl/.json/.csv/.parquet rows)")
    d.add_argument("--calib-samples", type=int, default=32, metavar="N", help="rows (32)")
    d.add_argument("--eval-file", metavar="F", help="held-out text for perplexity before/after")
    d.add_argument("--eval-samples", type=int, default=64, metavar="N", help="rows (64)")
    d.add_argument("--max-length", type=int, default=256, metavar="N", help="tokens per row")
    d.add_argument("--batch-size", type=int, default=4, metavar="N", help="rows per batch (4)")
    d.add_argument("--text-column", default="text", help="causal-LM text column (text)")
    d.add_argument("--source-column", default="document", help="seq2seq input column")
    d.add_argument("--target-column", default="summary", help="seq2seq target column")
    add_overwrite_flag(p)
    p.set_defaults(func=run_ptq)


def _load(args: argparse.Namespace):
    from tbt.hf import load_pretrained

    if args.model.startswith("gguf:") or args.model.lower().endswith(".gguf"):
        try:
            from tbt.hf.gguf import load_gguf_model, load_gguf_tokenizer
        except ImportError as e:
            raise CliError(f"GGUF models need tbt.hf.gguf ({e})") from None
        model, tok = load_gguf_model(args.model), load_gguf_tokenizer(args.model)
    else:
        model, tok = load_pretrained(args.model)
    if args.tokenizer:
        from tbt.hf import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if tok is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "quantization_config", None) is not None:
        raise CliError(f"{args.model} is already quantized: start from the full-precision model")
    return model, tok


def _loader(path: str, n: int, args: argparse.Namespace, tok, causal: bool):
    from tbt.data import DataConfig, build_dataloader, load_raw_splits, tokenize_rows

    cfg = DataConfig(task="causal-lm" if causal else "seq2seq", train_file=path,
                     text_column=args.text_column, source_column=args.source_column,
                     target_column=args.target_column, max_length=args.max_length,
                     max_source_length=args.max_length, max_target_length=args.max_length,
                     max_train_samples=n)
    rows = load_raw_splits(cfg, ("train",))["train"]
    return build_dataloader(tokenize_rows(rows, tok, cfg), tok, cfg, batch_size=args.batch_size,
                            shuffle=False, seed=0), len(rows)


def _ptq_config(args: argparse.Namespace):
    from tbt.ptq import EoRAConfig, PTQConfig, make_method_config

    options = {field: getattr(args, flag) for flag, field in METHOD_FLAGS.items()}
    mcfg = make_method_config(args.method, options)
    eora = EoRAConfig(args.rank, args.adapter_dtype) if args.compensate == "eora" else None
    return PTQConfig(method=args.method, method_config=mcfg, eora=eora,
                     skip_modules=tuple(args.skip),
                     keep_tensors=bool(args.save_packed) and args.method != "rtn")


def _set_adapters(model, enabled: bool) -> None:
    from tbt.ptq import LowRankAdapter

    for m in model.modules():
        if isinstance(m, LowRankAdapter):
            m.enabled = enabled


def run_ptq(args: argparse.Namespace) -> int:
    import copy
    import json
    import os
    import resource

    from tbt.eval.metrics import perplexity
    from tbt.ptq import quantize_model_ptq
    from tbt.ptq.save import save_packed_ptq, save_packed_rtn, save_ptq_checkpoint

    cfg = _ptq_config(args)  # validate the options before loading anything
    if not (args.model.startswith("gguf:") or args.model.lower().endswith(".gguf")):
        check_local_dir(args.model, "--model", "give a model folder, a GGUF file or a hub name")
    if args.tokenizer:
        check_local_dir(args.tokenizer, "--tokenizer", "give a tokenizer or model folder")
    check_output_dir(args.output_dir, overwrite=args.overwrite,
                     inputs={"--model": args.model, "--tokenizer": args.tokenizer,
                             "--calib-file": args.calib_file, "--eval-file": args.eval_file})
    model, tok = _load(args)
    model.to(args.device)
    causal = not getattr(model.config, "is_encoder_decoder", False)
    batches = None
    if args.calib_file:
        loader, n = _loader(args.calib_file, args.calib_samples, args, tok, causal)
        batches = [{k: v for k, v in b.items() if not (causal and k == "labels")}
                   for b in loader]
        print(f"calibration: {n} rows of {args.calib_file}")
    eval_loader = _loader(args.eval_file, args.eval_samples, args, tok, causal)[0] \
        if args.eval_file else None
    metrics: dict[str, float] = {}
    if eval_loader is not None and args.eval_before:
        metrics["perplexity_before"] = perplexity(model, eval_loader, args.device)
    # RTN is packed from the FP model through quantize_model; the others from the PTQ codes
    fp_copy = copy.deepcopy(model) if args.save_packed and cfg.method == "rtn" else None

    report = quantize_model_ptq(model, cfg, batches)
    if eval_loader is not None:
        if cfg.eora is not None:  # the same PTQ weights without their adapters
            _set_adapters(model, False)
            metrics["perplexity_after_uncompensated"] = perplexity(model, eval_loader,
                                                                   args.device)
            _set_adapters(model, True)
        metrics["perplexity_after"] = perplexity(model, eval_loader, args.device)
    print(report.table())
    for k, v in metrics.items():
        print(f"{k}: {v:.3f}")
    print(f"quantization time: {report.seconds:.1f} s")

    with staged_output(args.output_dir, overwrite=args.overwrite) as tmp:
        out = report.to_dict()
        out.update(metrics=metrics, model=args.model,
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if args.save_packed:
            packed_dir = os.path.join(tmp, "packed")
            out["packed"] = (save_packed_rtn(fp_copy, cfg, packed_dir, model)
                             if fp_copy is not None
                             else save_packed_ptq(model, report, cfg, packed_dir))
            if os.path.isdir(packed_dir) and tok is not None:
                tok.save_pretrained(packed_dir)  # the packed model runs on its own
            out["packed"] = _final_paths(out["packed"], tmp, args.output_dir)
            print(f"packed checkpoint: {out['packed']}")
        if args.save:
            save_ptq_checkpoint(model, tok, cfg, tmp)
        with open(os.path.join(tmp, "ptq_report.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(tmp, "ptq_table.txt"), "w") as f:
            f.write(report.table() + "\n")
    print(f"saved the PTQ {'model' if args.save else 'report'} to {args.output_dir}")
    return 0


def _final_paths(value, tmp: str, final: str):
    """Paths inside the staging folder ``tmp`` -> the same paths under ``final``."""
    if isinstance(value, str):
        return final + value[len(tmp):] if value.startswith(tmp) else value
    if isinstance(value, dict):
        return {k: _final_paths(v, tmp, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_final_paths(v, tmp, final) for v in value]
    return value
