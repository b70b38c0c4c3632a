"""Generate with a model on a test set, score it, and write the results.

:func:`evaluate` is the whole job: generate one output per source with beam search
(:func:`generate_predictions`), score the outputs against the references (ROUGE for
summaries, BLEU/chrF for translations, see :mod:`tbt.eval.metrics`) or compute perplexity,
write ``metrics.json`` and ``predictions.jsonl``, and print a table.

Generation settings come from :data:`GENERATION_PRESETS` (the reference code's values for XSUM
and CNN/DM, docs/recipe.md §4). Anything not set there (``no_repeat_ngram_size``,
``early_stopping``, forced BOS/EOS) comes from the model's own ``generation_config``, as in the reference.

``gen_len`` is the average length of the generated sequences in tokens, counted the way the
reference scripts (HF ``run_summarization``) count it: every non-pad token of the output,
including the decoder start token and ``</s>``. A model that never stops therefore scores
``max_length`` exactly (the 62.0 of the BWN rows in the paper's Table 4).

Sources are generated in batches sorted by length (less padding, same outputs) and written back
in input order.

Degenerate output (:func:`degenerate_output`): a model that has not learned to use its input
writes the empty string, or the same sentence, for every source, and scores near zero with no
other sign. ``evaluate`` checks the predictions, writes the finding to ``metrics.json``
(``"degenerate"``) and prints one WARNING block on stderr when the output is degenerate.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    # reference code, run_summarization_no_trainer.py parse_args (docs/recipe.md §4)
    "xsum": {"num_beams": 6, "length_penalty": 1.0, "max_length": 62, "min_length": 11},
    "cnn_dailymail": {"num_beams": 4, "length_penalty": 2.0, "max_length": 142, "min_length": 56},
    # not in the reference (no MT code): fairseq's mBART En-Ro evaluation uses beam 5, length
    # penalty 1.0; 200 tokens covers the longest WMT16 test sentences with room to spare.
    "wmt16": {"num_beams": 5, "length_penalty": 1.0, "max_length": 200},
    # anything else: a moderate beam and a length cap that fits short summaries/sentences.
    "default": {"num_beams": 4, "length_penalty": 1.0, "max_length": 128},
}
METRICS = ("rouge", "bleu", "perplexity")

# Degenerate-output thresholds (degenerate_output): a test set where more than half the
# predictions are empty, or more than half are one identical string (and the references are
# not that repetitive themselves), or the mean prediction is shorter than one word.
MAX_EMPTY_FRAC = 0.5
MAX_TOP_FRAC = 0.5
MIN_MEAN_WORDS = 1.0


def degenerate_output(predictions: Sequence[str], references: Sequence[str] | None = None
                      ) -> dict[str, Any]:
    """Whether ``predictions`` are degenerate: mostly empty, mostly one string, or near-empty.

    Args:
        predictions: the generated texts (whitespace is stripped before comparing).
        references: the reference texts, if any. "Mostly one string" is only a finding when the
            most common prediction is more common than the most common reference (a test set
            whose references repeat may legitimately get repeated predictions).

    Returns:
        ``{"empty_frac", "top_prediction_frac", "top_prediction", "distinct_frac",
        "mean_words", "verdict", "reasons"}``: fractions of the predictions that are empty,
        equal to the most common one, and distinct; the mean count of whitespace-separated
        words; ``verdict`` ``"ok"`` or ``"degenerate"`` and the reasons (empty list if ok).
    """
    preds = [" ".join(p.split()) for p in predictions]
    n = len(preds)
    if n == 0:
        raise ValueError("no predictions to check")
    top, top_n = Counter(preds).most_common(1)[0]
    empty_frac = sum(not p for p in preds) / n
    top_frac = top_n / n
    mean_words = sum(len(p.split()) for p in preds) / n
    reasons = []
    if empty_frac > MAX_EMPTY_FRAC:
        reasons.append(f"{100 * empty_frac:.1f}% of the predictions are empty")
    ref_top = 0.0
    if references:
        refs = [" ".join(r.split()) for r in references]
        ref_top = Counter(refs).most_common(1)[0][1] / len(refs)
    if n >= 2 and top and top_frac > MAX_TOP_FRAC and top_frac > ref_top:
        shown = top if len(top) <= 60 else top[:57] + "..."
        reasons.append(f"{100 * top_frac:.1f}% of the predictions are the same string "
                       f"{shown!r} (references: at most {100 * ref_top:.1f}% identical)")
    if mean_words < MIN_MEAN_WORDS:
        reasons.append(f"the mean prediction is {mean_words:.2f} words long")
    return {"empty_frac": empty_frac, "top_prediction_frac": top_frac, "top_prediction": top[:200],
            "distinct_frac": len(set(preds)) / n, "mean_words": mean_words,
            "verdict": "degenerate" if reasons else "ok", "reasons": reasons}


def warn_degenerate(finding: dict[str, Any], file: Any = None) -> None:
    """Print one WARNING block for a degenerate :func:`degenerate_output` finding."""
    if finding["verdict"] == "ok":
        return
    file = file if file is not None else sys.stderr
    bar = "=" * 78
    lines = [bar, "WARNING: degenerate output -- the scores above measure a model that does not "
             "use its input", *(f"  * {r}" for r in finding["reasons"]),
             f"  distinct predictions: {100 * finding['distinct_frac']:.1f}%",
             "  A model trained from scratch on too little data, too few steps or with "
             "fine-tuning",
             "  settings writes the same text for every input. See docs/training.md "
             "(\"Training from",
             "  scratch\"): the presets' defaults and the copy warm-up (--copy-warmup-steps).",
             bar]
    print("\n".join(lines), file=file, flush=True)


def resolve_preset(name: str | None) -> dict[str, Any]:
    """The generation preset called ``name`` (``None`` → ``"default"``); hub prefixes ignored."""
    key = (name or "default").split("/")[-1]
    if key not in GENERATION_PRESETS:
        raise ValueError(f"unknown generation preset {name!r}; choose one of "
                         f"{', '.join(GENERATION_PRESETS)}")
    return dict(GENERATION_PRESETS[key])


def _max_source_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 1024


def _causal_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """For decoder-only models, read max/min_length as counts of *new* tokens."""
    kw = dict(gen_kwargs)
    for old, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if old in kw:
            value = kw.pop(old)
            kw.setdefault(new, value)
    return kw


def _generate(model: Any, tokenizer: Any, sources: Sequence[str], gen_kwargs: dict[str, Any],
              batch_size: int, device: Any, progress: bool = True,
              max_source_length: int | None = None, prompt_template: str | None = None
              ) -> tuple[list[str], list[int]]:
    """Generate for every source; return the decoded texts and their lengths in tokens.

    ``prompt_template`` (decoder-only models): each source is put into the template as in
    training (:class:`tbt.data.PromptEncoder`, the source cut to fit), the prompts are
    left-padded, and only the tokens generated after the prompt are decoded.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    causal = not getattr(model.config, "is_encoder_decoder", False)
    kw = _causal_kwargs(gen_kwargs) if causal else dict(gen_kwargs)
    limit = max_source_length or _max_source_length(model, tokenizer)
    if causal:  # prompt and new tokens share the position table: leave room for the answer
        room = _max_source_length(model, tokenizer) - int(kw.get("max_new_tokens", 0))
        if room < 1:
            raise ValueError(f"max_new_tokens={kw.get('max_new_tokens')} leaves no room for a "
                             f"prompt within the model's {_max_source_length(model, tokenizer)} "
                             "positions; lower --max-length")
        limit = min(limit, room)
    _ensure_pad_token(tokenizer)
    pad_id = tokenizer.pad_token_id
    if causal:
        kw.setdefault("pad_token_id", pad_id)
    prompts = None
    if causal and prompt_template is not None:
        from tbt.data import PromptEncoder

        prompts = PromptEncoder(tokenizer, prompt_template).encode(sources, limit)[0]
    order = sorted(range(len(sources)), key=lambda i: -(len(prompts[i]) if prompts is not None
                                                       else len(sources[i])))
    texts: list[str] = [""] * len(sources)
    lengths: list[int] = [0] * len(sources)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left" if causal else "right"  # decoder-only prompts end flush
    try:
        with torch.no_grad(), tqdm(total=len(sources), desc="generate", unit="ex",
                                   disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if prompts is not None:
                    enc = _left_pad([prompts[i] for i in idx], pad_id, device)
                else:
                    enc = tokenizer([sources[i] for i in idx], padding=True, truncation=True,
                                    max_length=limit, return_tensors="pt").to(device)
                enc.pop("token_type_ids", None)
                out = model.generate(**enc, **kw)
                if causal:
                    out = out[:, enc["input_ids"].shape[1]:]
                decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    texts[i] = decoded[j].strip()
                    lengths[i] = int((out[j] != pad_id).sum())
                bar.update(len(idx))
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return texts, lengths


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> dict[str, Any]:
    """``input_ids``/``attention_mask`` of token lists padded on the left to the longest."""
    import torch

    width = max(len(x) for x in seqs)
    ids = [[pad_id] * (width - len(x)) + list(x) for x in seqs]
    mask = [[0] * (width - len(x)) + [1] * len(x) for x in seqs]
    return {"input_ids": torch.tensor(ids, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=device)}


def _ensure_pad_token(tokenizer: Any) -> None:
    """Decoder-only tokenizers (GPT-2) often have no pad token: pad with eos, as is usual."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
        logger.info("tokenizer has no pad token; padding with eos %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def generate_predictions(model: Any, tokenizer: Any, sources: Sequence[str],
                         gen_kwargs: dict[str, Any], batch_size: int, device: Any,
                         progress: bool = True) -> list[str]:
    """Decoded generations (special tokens removed, stripped), in the order of ``sources``."""
    return _generate(model, tokenizer, sources, gen_kwargs, batch_size, device, progress)[0]


def _perplexity(model: Any, tokenizer: Any, rows: Sequence[dict], task: str, batch_size: int,
                device: Any, max_source_length: int | None) -> float:
    from tbt.eval.metrics import perplexity
    from tbt.data import DataConfig, build_dataloader, tokenize_rows

    limit = max_source_length or _max_source_length(model, tokenizer)
    _ensure_pad_token(tokenizer)
    if task == "causal-lm" and "text" not in rows[0]:  # prompt + continuation as one text
        rows = [{"text": f"{r['source']} {r['target']}"} for r in rows]
    cfg = DataConfig(task=task, max_source_length=limit, max_length=limit,
                     max_target_length=limit)
    loader = build_dataloader(tokenize_rows(rows, tokenizer, cfg), tokenizer, cfg,
                              batch_size=batch_size, shuffle=False, seed=0)
    return perplexity(model, loader, device)


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of ``metrics``."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for k, v in metrics.items():
        if isinstance(v, dict) and "verdict" in v:  # degenerate_output's finding
            v = v["verdict"]
        lines.append(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def evaluate(model: Any, tokenizer: Any, rows: Sequence[dict], metrics: Sequence[str] = ("rouge",),
             gen_kwargs: dict[str, Any] | None = None, batch_size: int = 16,
             device: Any = "cpu", output_dir: str | None = None, task: str = "seq2seq",
             max_source_length: int | None = None, progress: bool = True,
             prompt_template: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``rows`` and (if ``output_dir``) write the results there.

    Args:
        rows: ``{"source", "target"}`` rows (from :func:`tbt.data.load_raw_splits`), or
            ``{"text"}`` rows for causal-LM perplexity.
        metrics: any of ``"rouge"`` (rouge1/rouge2/rougeL/rougeLsum), ``"bleu"`` (bleu, chrf),
            ``"perplexity"``.
        gen_kwargs: ``model.generate`` keyword arguments; ``None`` → the ``"default"`` preset.
        task: ``"seq2seq"`` or ``"causal-lm"``, how rows are tokenized for perplexity.
        max_source_length: truncate sources to this many tokens (default: the model's limit;
            with ``prompt_template``, the whole prompt).
        prompt_template: decoder-only models: the prompt each source is put into, as in
            training (``DataConfig.prompt_template``; ``tbt evaluate`` passes the one the model
            was trained with). ``None``: the source itself is the prompt.

    Returns:
        The metrics (floats ×100 for ROUGE/BLEU/chrF), plus ``gen_len`` (mean generated tokens)
        when generating, and ``n_examples``. Written to ``output_dir/metrics.json``; the
        generations to ``output_dir/predictions.jsonl`` as ``{"source", "reference",
        "prediction"}`` lines.
    """
    from tbt.eval import metrics as M

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not rows:
        raise ValueError("no rows to evaluate")
    model.to(device)
    result: dict[str, Any] = {}
    predictions: list[str] | None = None
    if "rouge" in metrics or "bleu" in metrics:
        if "source" not in rows[0] or "target" not in rows[0]:
            raise ValueError("rouge/bleu need rows with 'source' and 'target'; got keys "
                             f"{sorted(rows[0])}")
        kw = dict(gen_kwargs) if gen_kwargs is not None else resolve_preset("default")
        predictions, lengths = _generate(model, tokenizer, [r["source"] for r in rows], kw,
                                         batch_size, device, progress, max_source_length,
                                         prompt_template)
        references = [r["target"] for r in rows]
        if "rouge" in metrics:
            result.update(M.rouge(predictions, references))
        if "bleu" in metrics:
            result.update(M.bleu(predictions, references))
        result["gen_len"] = sum(lengths) / len(lengths)
        result["degenerate"] = degenerate_output(predictions, references)
    if "perplexity" in metrics:
        result["perplexity"] = _perplexity(model, tokenizer, rows, task, batch_size, device,
                                           max_source_length)
    result["n_examples"] = len(rows)
    if output_dir is not None:
        _write(output_dir, result, rows, predictions)
    print(format_table(result))
    if "degenerate" in result:
        warn_degenerate(result["degenerate"])
    return result


def _write(output_dir: str, result: dict[str, Any], rows: Sequence[dict],
           predictions: list[str] | None) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if predictions is not None:
        with open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for row, pred in zip(rows, predictions, strict=True):
                f.write(json.dumps({"source": row["source"], "reference": row["target"],
                                    "prediction": pred}, ensure_ascii=False) + "\n")
    logger.info("wrote %s", output_dir)
