"""Decoder-only QAT end to end: ``--task causal-lm`` on a text file, tiny GPT-2 and Llama
teachers distilled into ternary students (with the OFF, score and relation terms), then
``tbt evaluate`` perplexity and generation from the trained directory."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from tbt.train.config import TrainConfig
from tbt.train.loop import train
from train_helpers import WORDS, cli_args, make_model_dir, make_workspace, tbt_cli


def _write_text(path: str, n: int, seed: int) -> str:
    """Plain text, one example per line: a counting pattern a tiny LM learns in a few steps."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            start = rng.randrange(len(WORDS) - 12)
            f.write(" ".join(WORDS[start:start + rng.randint(8, 12)]) + "\n")
    return path


def _llama_dir(ws: dict[str, str], name: str) -> str:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(ws["tokenizer"])
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = os.path.join(ws["root"], name)
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(str(tmp_path_factory.mktemp("causal")))
    ws["text"] = _write_text(os.path.join(ws["root"], "train.txt"), 64, seed=0)
    ws["val_text"] = _write_text(os.path.join(ws["root"], "val.txt"), 8, seed=1)
    ws["gpt2"] = make_model_dir(ws, "gpt2-tiny", "gpt2")
    ws["llama"] = _llama_dir(ws, "llama")
    return ws


def _settings(ws, out, teacher, **kw):
    flat = dict(task="causal-lm", train_file=ws["text"], validation_file=ws["val_text"],
                teacher=teacher, bits="2-2-8", output_dir=out, batch_size=8, lr=3e-3,
                warmup_ratio=0.0, max_length=32, device="cpu", progress=False, seed=0,
                max_steps=20)
    flat.update(kw)
    return flat


def _log(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_twenty_causal_steps_with_every_term_lower_the_loss(ws, tmp_path, family):
    out = str(tmp_path / family)
    cfg = TrainConfig.from_flat(_settings(ws, out, ws[family], w_off=1.0, w_attn_scores=0.1,
                                          w_relation=1.0, relation_layers="0,-1"))
    assert cfg.data.task == "causal-lm"
    train(cfg)
    log = _log(out)
    assert len(log) == 20
    for r in log:
        for term in ("ce", "logits", "hidden", "attn", "off", "attn_scores", "relation", "loss"):
            assert term in r and math.isfinite(r[term]), (term, r)
    for term in ("loss", "ce"):
        first, last = _mean([r[term] for r in log[:3]]), _mean([r[term] for r in log[-3:]])
        assert last < 0.97 * first, (term, first, last)
    assert math.isfinite(log[-1]["val_loss"])


@pytest.mark.slow
def test_cli_train_evaluate_perplexity_and_generate(ws, tmp_path):
    out = str(tmp_path / "cli")
    flat = _settings(ws, out, ws["gpt2"], w_relation=1.0, relation_layers="-1")
    p = tbt_cli("train", *cli_args(flat))
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    saved = json.load(open(os.path.join(out, "train_config.json")))  # the resolved settings
    assert saved["data"]["task"] == "causal-lm" and saved["distill"]["w_relation"] == 1.0
    ev = str(tmp_path / "eval")
    p = tbt_cli("evaluate", "--model", out, "--test-file", ws["val_text"], "--metrics",
                "perplexity", "--output-dir", ev, "--device", "cpu", "--no-progress")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    metrics = json.load(open(os.path.join(ev, "metrics.json")))
    # the trained student beats the uniform guess over the vocabulary (a random model's ~V), and
    # the perplexity is exp of the validation cross-entropy the training loop logged last
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out))
    assert 1.0 < metrics["perplexity"] < 0.75 * vocab, metrics
    val_ce = _log(out)[-1]["val_ce"]
    assert math.log(metrics["perplexity"]) == pytest.approx(val_ce, rel=0.02), (metrics, val_ce)
    # generation: prompts from a document/summary file, continuations written per row
    gen = str(tmp_path / "gen")
    p = tbt_cli("evaluate", "--model", out, "--test-file", ws["validation"], "--metrics",
                "rouge", "--max-length", "8", "--min-length", "4", "--num-beams", "1",
                "--output-dir", gen,  # prompts cut to leave room for the 8 new tokens
                "--device", "cpu", "--no-progress")
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    preds = [json.loads(x) for x in open(os.path.join(gen, "predictions.jsonl"))]
    assert len(preds) == 8 and any(r.get("prediction") for r in preds), preds[:2]
