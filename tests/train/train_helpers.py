"""Shared setup of the training tests: a tiny learnable corpus, a tokenizer, tiny teachers.

The corpus is a copy task over a fixed word list (the summary is the document's first words),
so 20 steps visibly lower the loss of even a random tiny model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

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
