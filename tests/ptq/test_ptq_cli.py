"""`tbt ptq` end to end on a tiny Llama-style model: every method (packed too), EoRA, QAT init."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from tbt.cli import main

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega red green blue black white north").split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import transformers as tf

    from tbt.train.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ptq")
    rng = random.Random(0)
    for name, n in (("calib.txt", 24), ("eval.txt", 8)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) + "\n")
    tok_dir = str(root / "tok")
    train_tokenizer([str(root / "calib.txt")], ["text"], 300, tok_dir, model_type="gpt2")
    tok = tf.AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = tf.LlamaForCausalLM(cfg)
    fp = str(root / "fp")
    model.save_pretrained(fp)
    tok.save_pretrained(fp)
    return {"root": root, "fp": fp, "calib": str(root / "calib.txt"),
            "eval": str(root / "eval.txt")}


def _run(ws, name, *extra):
    out = str(ws["root"] / name)
    rc = main(["ptq", "--model", ws["fp"], "--calib-file", ws["calib"], "--eval-file", ws["eval"],
               "--max-length", "32", "--output-dir", out, *extra])
    assert rc == 0
    with open(os.path.join(out, "ptq_report.json")) as f:
        return out, json.load(f)


def _ppl(model_dir, ws):
    from tbt.eval.metrics import perplexity
    from tbt.hf import load_pretrained
    from tbt.data import DataConfig, build_dataloader, load_raw_splits, tokenize_rows

    model, tok = load_pretrained(model_dir)
    cfg = DataConfig(task="causal-lm", train_file=ws["eval"], max_length=32, max_train_samples=64)
    rows = load_raw_splits(cfg, ("train",))["train"]
    loader = build_dataloader(tokenize_rows(rows, tok, cfg), tok, cfg, 4, False, 0)
    return perplexity(model, loader, "cpu"), model


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [
    ("rtn", ()), ("ptqtp", ("--group-size", "16")), ("pbllm", ("--salient-frac", "0.1")),
    ("billm", ("--block-size", "32")),
])
def test_every_method_end_to_end(workspace, method, extra):
    out, rep = _run(workspace, method, "--method", method, "--save-packed", *extra)
    assert len(rep["layers"]) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head skipped
    assert all(0 < r["weight_rel_err"] < 1 and 0 < r["out_rel_err"] < 1.5 for r in rep["layers"])
    m = rep["metrics"]
    assert math.isfinite(m["perplexity_before"]) and math.isfinite(m["perplexity_after"])
    assert m["perplexity_after"] != m["perplexity_before"]
    bpw = rep["totals"]["bits_per_weight"]
    assert {"rtn": 2.0, "ptqtp": 4.0, "pbllm": 1.0, "billm": 1.0}[method] < bpw < 8
    # the saved checkpoint is the PTQ model: same perplexity when reloaded
    ppl, hf = _ppl(out, workspace)
    assert ppl == pytest.approx(m["perplexity_after"], rel=1e-5)
    # every method writes OUT/packed (docs/format.md §9): the same logits as the checkpoint
    from tbt.export.io import load_packed

    assert rep["packed"] == os.path.join(out, "packed")
    from transformers import AutoTokenizer  # the packed directory runs on its own

    assert AutoTokenizer.from_pretrained(rep["packed"]).vocab_size > 0
    packed = load_packed(rep["packed"])
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_eora_lowers_error_and_is_merged_in_the_checkpoint(workspace):
    _, base = _run(workspace, "ptqtp-plain", "--method", "ptqtp")
    out, rep = _run(workspace, "ptqtp-eora", "--method", "ptqtp", "--compensate", "eora",
                    "--rank", "4", "--adapter-dtype", "float32")
    for r in rep["layers"]:
        assert r["out_rel_err_eora"] < r["out_rel_err"]
        n_out, n_in = r["shape"]
        assert r["adapter_bits"] == 4 * (n_in + n_out) * 32
    t = rep["totals"]
    assert t["bits_per_weight_with_adapters"] == pytest.approx(
        t["bits_per_weight"] + t["adapter_bits_per_weight"])
    assert os.path.isfile(os.path.join(out, "eora_adapters.safetensors"))
    ppl, _ = _ppl(out, workspace)  # merged W_q + BA computes what the adapters computed
    assert ppl == pytest.approx(rep["metrics"]["perplexity_after"], rel=1e-4)
    # with the adapters switched off it is the plain PTQTP model
    assert rep["metrics"]["perplexity_after_uncompensated"] == pytest.approx(
        base["metrics"]["perplexity_after"], rel=1e-5)


@pytest.mark.slow
def test_rtn_packed_checkpoint_matches_and_trains_as_student(workspace, capsys):
    from tbt.export.io import load_packed

    out, rep = _run(workspace, "rtn-packed", "--method", "rtn", "--granularity", "row",
                    "--save-packed")
    packed = load_packed(os.path.join(out, "packed"))
    _, hf = _ppl(out, workspace)
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert main(["inspect", os.path.join(out, "packed")]) == 0
    # the PTQ checkpoint initialises a QAT student
    qat = str(workspace["root"] / "qat")
    rc = main(["train", "--model", out, "--teacher", workspace["fp"], "--bits", "2-2-8",
               "--train-file", workspace["calib"], "--task", "causal-lm", "--max-length", "32",
               "--max-steps", "2", "--batch-size", "4", "--output-dir", qat, "--device", "cpu",
               "--no-progress"])
    assert rc == 0 and os.path.isfile(os.path.join(qat, "config.json"))


def test_inspect_reports_the_eora_adapter_cost(workspace, capsys):
    out, rep = _run(workspace, "rtn-eora", "--method", "rtn", "--compensate", "eora", "--rank",
                    "2", "--save-packed")
    capsys.readouterr()
    assert main(["inspect", os.path.join(out, "packed")]) == 0
    text = capsys.readouterr().out
    t = rep["totals"]
    assert "EoRA adapters: 14 layers" in text
    assert f"{t['adapter_bits_per_weight']:.3f} bits per weight of the layers" in text


def test_int8_adapters_run_in_the_packed_runtime(workspace):
    """--adapter-dtype int8: codes + row scales on disk, cost counted, same logits as merged."""
    from safetensors.torch import load_file

    from tbt.export.io import load_packed
    from tbt.ptq.eora import LowRankAdapter

    out, rep = _run(workspace, "rtn-eora-i8", "--method", "rtn", "--granularity", "row",
                    "--compensate", "eora", "--rank", "2", "--adapter-dtype", "int8",
                    "--save-packed")
    state = load_file(os.path.join(out, "packed", "eora_adapters.safetensors"))
    a_keys = [k for k in state if k.endswith(".lora_a")]
    assert a_keys and all(state[k].dtype == torch.int8 for k in a_keys)
    assert all(state[k[:-len("lora_a")] + "lora_a_scale"].dtype == torch.float32 for k in a_keys)
    row = next(r for r in rep["layers"] if r.get("adapter_bits"))
    out_f, in_f = row["shape"]
    assert row["adapter_bits"] == 2 * (in_f + out_f) * 8 + 32 * (2 + out_f)  # hand count
    _, merged = _ppl(out, workspace)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = load_packed(os.path.join(out, "packed"), backend="torch")
        assert sum(isinstance(m, LowRankAdapter) for m in packed.modules()) == 14
        torch.testing.assert_close(packed(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


def test_packed_runtime_runs_the_eora_adapters(workspace):
    """load_packed attaches the adapters saved next to a packed RTN checkpoint: its logits equal
    the PTQ checkpoint's (adapters merged into W there), on both backends; without the adapter
    file they equal plain RTN."""
    import shutil

    from tbt.export.io import load_packed
    from tbt.ptq.eora import LowRankAdapter

    out, _ = _run(workspace, "rtn-eora-rt", "--method", "rtn", "--granularity", "row",
                  "--compensate", "eora", "--rank", "2", "--save-packed")
    _, merged = _ppl(out, workspace)  # HF checkpoint: W = RTN(W) + B·A
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = merged(ids).logits
        for backend in ("torch", "native"):
            packed = load_packed(os.path.join(out, "packed"), backend=backend)
            assert sum(isinstance(m, LowRankAdapter) for m in packed.modules()) == 14
            torch.testing.assert_close(packed(ids).logits, want, atol=1e-4, rtol=1e-4)
        bare = str(workspace["root"] / "rtn-eora-bare")
        shutil.copytree(os.path.join(out, "packed"), bare)
        os.remove(os.path.join(bare, "eora_adapters.safetensors"))
        plain = load_packed(bare, backend="torch")
        assert not any(isinstance(m, LowRankAdapter) for m in plain.modules())
        assert (plain(ids).logits - want).abs().max() > 1e-3  # the adapters do something


def test_bad_options_say_what_to_do(workspace, capsys):
    rc = main(["ptq", "--model", workspace["fp"], "--method", "ptqtp", "--salient-frac", "0.1",
               "--output-dir", str(workspace["root"] / "bad")])
    assert rc == 2 and "salient_frac" in capsys.readouterr().err
    rc = main(["ptq", "--model", workspace["fp"], "--method", "billm",
               "--output-dir", str(workspace["root"] / "bad2")])
    assert rc == 2 and "--calib-file" in capsys.readouterr().err
