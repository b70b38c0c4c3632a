"""Shared test helpers (import them with ``from conftest import ...``; pytest puts this
directory on ``sys.path``, so no test changes it):

* tiny random Hugging Face models of every supported family (CPU, seconds): :func:`make_tiny`;
* the training tests' workspace: a tiny learnable corpus, a tokenizer, tiny teachers, and the
  ``tbt`` command line in a subprocess (:func:`make_workspace`, :func:`make_model_dir`,
  :func:`flat_settings`, :func:`tbt_cli`, :func:`cli_args`). The corpus is a copy task over a
  fixed word list (the summary is the document's first words), so 20 steps visibly lower the
  loss of even a random tiny model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

VOCAB = 128


def _seq2seq_kw():
    return dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def make_tiny(family: str, seed: int = 0):
    """A tiny random model of ``family``; every config small enough for a unit test."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bart":
        cfg = tf.BartConfig(**_seq2seq_kw())
        return tf.BartForConditionalGeneration(cfg)
    if family == "mbart":
        cfg = tf.MBartConfig(**_seq2seq_kw())
        return tf.MBartForConditionalGeneration(cfg)
    if family == "marian":
        kw = _seq2seq_kw()
        kw.update(decoder_start_token_id=1, pad_token_id=1, decoder_vocab_size=VOCAB)
        return tf.MarianMTModel(tf.MarianConfig(**kw))
    if family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                          num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8)
        return tf.T5ForConditionalGeneration(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                            eos_token_id=2, pad_token_id=1)
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    raise ValueError(family)


SEQ2SEQ = ("bart", "mbart", "marian", "t5")
CAUSAL = ("gpt2", "llama", "qwen2", "mistral")


@pytest.fixture
def tiny_bart():
    return make_tiny("bart")


# ---- the training tests' workspace -----------------------------------------------------------

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega red green blue black white north south east "
         "west one two three four five six seven eight nine ten").split()

TINY = {  # overrides of the presets: small enough for a unit test
    "bart-tiny": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, max_position_embeddings=64),
    "gpt2-tiny": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def write_corpus(path: str, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            doc = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
            f.write(json.dumps({"document": " ".join(doc), "summary": " ".join(doc[:4])}) + "\n")
    return path


def make_workspace(root: str) -> dict[str, str]:
    """train/validation files and a trained BPE tokenizer under ``root``."""
    from tbt.train.tokenizer import train_tokenizer

    os.makedirs(root, exist_ok=True)
    train = write_corpus(os.path.join(root, "train.jsonl"), 48, seed=0)
    val = write_corpus(os.path.join(root, "validation.jsonl"), 8, seed=1)
    tok_dir = os.path.join(root, "tok")
    train_tokenizer([train], ["document", "summary"], 300, tok_dir)
    return {"train": train, "validation": val, "tokenizer": tok_dir, "root": root}


def make_model_dir(ws: dict[str, str], preset: str, name: str, seed: int = 0) -> str:
    """A tiny random model of ``preset`` saved with the tokenizer (a teacher or start point)."""
    import torch
    from transformers import AutoTokenizer

    from tbt.train.presets import build_from_scratch

    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    torch.manual_seed(seed)
    model = build_from_scratch(preset, len(tok), tok.pad_token_id, tok.bos_token_id,
                               tok.eos_token_id, **TINY[preset])
    out = os.path.join(ws["root"], name)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def flat_settings(ws: dict[str, str], out: str, **kw) -> dict:
    """Settings of a short, fast run on the workspace (override with ``kw``)."""
    flat = dict(train_file=ws["train"], validation_file=ws["validation"],
                source_column="document", target_column="summary", output_dir=out,
                batch_size=8, lr=3e-3, warmup_ratio=0.0, max_source_length=32,
                max_target_length=16, max_length=48, device="cpu", progress=False, seed=0,
                copy_warmup_steps=0)
    flat.update(kw)
    return flat


def tbt_cli(*args: str, **popen_kw) -> subprocess.Popen:
    """Start ``python -m tbt ARGS`` (the console script's code) in a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "tbt", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen_kw)


def cli_args(flat: dict) -> list[str]:
    """Flags for ``tbt train`` from flat settings."""
    out = []
    for k, v in flat.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append({"progress": "--no-progress", "mask_padding": "--no-mask-padding"}[k])
        else:
            out += [flag, str(v)]
    return out
