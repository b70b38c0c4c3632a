"""Decoder-only seq2seq (the ``prompt-target`` task): prompt + target + eos with the loss on the
target only, distillation terms restricted as documented, and ``evaluate`` scoring only the
continuation generated after the prompt. Tiny random Llamas, no GGUF file needed."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, cli_args, flat_settings, make_workspace, tbt_cli
from tbt.data import (DataConfig, PromptEncoder, load_raw_splits, make_collator,
                      tokenize_prompt_target, tokenize_rows)
from tbt.train.config import DistillConfig
from tbt.train.objective import loss_terms, target_predictions


class WordTok:
    """A word-level tokenizer: one id per whitespace-separated word, BOS (0) put first by
    ``add_special_tokens``, eos 2, pad 1; ``decode`` joins words with spaces."""

    def __init__(self):
        self.words = ["<s>", "<pad>", "</s>", "=>", *"a b c d x y z".split()]
        self.id = {w: i for i, w in enumerate(self.words)}
        self.eos_token_id, self.pad_token_id, self.bos_token_id = 2, 1, 0
        self.chat_template = None

    def __call__(self, text, add_special_tokens=True, **kw):
        one = isinstance(text, str)
        out = [([0] if add_special_tokens else []) + [self.id[w] for w in t.split()]
               for t in ([text] if one else text)]
        return {"input_ids": out[0] if one else out}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] for i in ids)


def test_hand_worked_labels_and_truncation():
    tok = WordTok()
    cfg = DataConfig(task="prompt-target", prompt_template="{source} =>", max_source_length=5,
                     max_target_length=3)
    # prompt budget 5 = BOS + source + "=>": the source keeps 3 of its 4 words; the target
    # keeps 2 of its 3 words, then eos. The template's "=>" is never cut.
    ex = tokenize_prompt_target([{"source": "a b c d", "target": "x y z"},
                                 {"source": "d", "target": "z"}], tok, cfg)
    A, B, C, D, X, Y, Z, ARROW = (tok.id[w] for w in "a b c d x y z =>".split())
    assert ex[0]["input_ids"] == [0, A, B, C, ARROW, X, Y, 2]
    assert ex[0]["labels"] == [-100, -100, -100, -100, -100, X, Y, 2]
    assert ex[1]["input_ids"] == [0, D, ARROW, Z, 2]
    assert ex[1]["labels"] == [-100, -100, -100, Z, 2]
    assert all(e["attention_mask"] == [1] * len(e["input_ids"]) for e in ex)
    # the collator right-pads: pad id in the inputs, -100 in the labels, 0 in the mask
    batch = make_collator(tok, cfg)(ex)
    assert batch["input_ids"][1].tolist() == [0, D, ARROW, Z, 2, 1, 1, 1]
    assert batch["labels"][1].tolist() == [-100, -100, -100, Z, 2, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    # tokenize_rows dispatches on the task
    assert tokenize_rows([{"source": "d", "target": "z"}], tok, cfg) == ex[1:]


def test_template_errors():
    tok = WordTok()
    with pytest.raises(ValueError, match="no {source}"):
        DataConfig(prompt_template="Summarize:")
    with pytest.raises(ValueError, match="no room for the source"):
        PromptEncoder(tok, "a b c {source} =>").encode(["d"], 5)
    with pytest.raises(ValueError, match="chat template"):
        PromptEncoder(tok, "chat:{source}")


def test_bpe_tokenizer_prompt_then_target(tmp_path):
    """A real BPE tokenizer that adds <s> ... </s> by itself: the prompt keeps <s> and drops
    </s>; the target follows "Summary:" with a space, and decodes back to itself."""
    from transformers import AutoTokenizer

    ws = make_workspace(str(tmp_path / "ws"))
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    cfg = DataConfig(task="prompt-target")
    ex = tokenize_prompt_target([{"source": "alpha beta gamma", "target": "alpha beta"}], tok,
                                cfg)[0]
    n_prompt = sum(x == -100 for x in ex["labels"])
    prompt = ex["input_ids"][:n_prompt]
    assert prompt[0] == tok.bos_token_id and tok.eos_token_id not in prompt
    assert tok.decode(prompt, skip_special_tokens=True) == "alpha beta gamma\nSummary:"
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:], skip_special_tokens=True) == " alpha beta"


def tiny_llama(vocab: int = VOCAB, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1)
    return tf.LlamaForCausalLM(cfg).eval()


def test_model_loss_counts_target_tokens_only():
    """HF's shifted cross-entropy on a collated batch = a float64 mean over target tokens."""
    tok = WordTok()
    cfg = DataConfig(task="prompt-target", prompt_template="{source} =>")
    batch = make_collator(tok, cfg)(tokenize_prompt_target(
        [{"source": "a b c d", "target": "x y z"}, {"source": "b", "target": "y"}], tok, cfg))
    model = tiny_llama()
    with torch.no_grad():
        out = model(**batch)
    logp = torch.log_softmax(out.logits.double(), -1)
    terms = []
    for b in range(2):
        for t in range(batch["input_ids"].shape[1] - 1):
            y = int(batch["labels"][b, t + 1])
            if y != -100:
                terms.append(-logp[b, t, y])
    assert len(terms) == 4 + 2  # x y z </s>, y </s>
    assert float(out.loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_distillation_terms_target_only_logits_all_real_positions_hidden():
    g = torch.Generator().manual_seed(0)
    B, T, V, D = 2, 6, 5, 3
    labels = torch.tensor([[-100, -100, -100, 7, 8, 2], [-100, -100, 9, 2, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    want = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(target_predictions(labels), want)

    def out(seed_logits, hidden):
        return SimpleNamespace(loss=torch.tensor(0.5), logits=seed_logits,
                               hidden_states=hidden, attentions=None)

    s_log, t_log = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    s_hid = tuple(torch.randn(B, T, D, generator=g) for _ in range(3))
    t_hid = tuple(torch.randn(B, T, D, generator=g) for _ in range(3))
    dcfg = DistillConfig(w_logits=1.0, w_hidden=1.0, w_attn=0.0)
    batch = {"labels": labels, "attention_mask": mask}
    got = loss_terms(out(s_log, s_hid), out(t_log, t_hid), batch, dcfg, seq2seq=False,
                     target_only=True)
    # float64 reference: logits over the 5 positions predicting a target token
    p = torch.softmax(t_log.double(), -1)
    rows = -(p * torch.log_softmax(s_log.double(), -1)).sum(-1)
    assert float(got["logits"]) == pytest.approx(float(rows[want].mean()), rel=1e-6)
    # hidden: every real position (prompt included), summed over the 3 hidden-state tensors
    ref_h = sum(((s.double() - t.double()) ** 2).mean(-1)[mask.bool()].mean()
                for s, t in zip(s_hid, t_hid))
    assert float(got["hidden"]) == pytest.approx(float(ref_h), rel=1e-6)
    # teacher logits where no target is predicted do not matter; with target_only=False
    # (plain causal LM) they do
    t2 = t_log.clone()
    t2[~want] += 10 * torch.randn(int((~want).sum()), V, generator=g)
    again = loss_terms(out(s_log, s_hid), out(t2, t_hid), batch, dcfg, False, target_only=True)
    assert float(again["logits"]) == pytest.approx(float(got["logits"]), rel=1e-6)
    plain = loss_terms(out(s_log, s_hid), out(t2, t_hid), batch, dcfg, False)
    assert float(plain["logits"]) != pytest.approx(float(got["logits"]), rel=1e-3)


def _greedy_reference(model, prompt: list[int], n_new: int, eos: int) -> list[int]:
    """Greedy decoding by hand: one unpadded forward over the whole sequence per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


def test_evaluate_scores_the_continuation_only(tmp_path):
    from transformers import AutoTokenizer

    from tbt.eval.evaluate import evaluate

    ws = make_workspace(str(tmp_path / "ws"))
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    model = tiny_llama(len(tok), seed=3)
    rows = load_raw_splits(DataConfig(train_file=ws["train"]), ("train",))["train"][:5]
    template = "Q: {source} A:"
    res = evaluate(model, tok, rows, metrics=("rouge",),
                   gen_kwargs={"num_beams": 1, "do_sample": False, "max_length": 6},
                   batch_size=3, output_dir=str(tmp_path / "eval"), prompt_template=template,
                   progress=False)
    preds = [json.loads(x)["prediction"]
             for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    # independent prompts: <s> + the template's words around the source, no </s>
    for row, pred in zip(rows, preds, strict=True):
        prompt = [tok.bos_token_id] + tok(f"Q: {row['source']} A:",
                                          add_special_tokens=False)["input_ids"]
        new = _greedy_reference(model, prompt, 6, tok.eos_token_id)
        assert pred == tok.decode(new, skip_special_tokens=True).strip()
        assert "Q:" not in pred  # the prompt itself is not part of the prediction
    assert res["n_examples"] == 5 and "degenerate" in res


@pytest.fixture(scope="module")
def llama_ws(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("pt")
    ws = make_workspace(str(root / "ws"))
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    start = str(root / "llama")
    tiny_llama(len(tok)).save_pretrained(start)
    tok.save_pretrained(start)
    test = root / "test.jsonl"
    test.write_text(open(ws["validation"]).read())
    return ws, start, str(test)


def _run(*args: str) -> str:
    proc = tbt_cli(*args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_cli_train_fp_then_2_2_8_then_evaluate(llama_ws, tmp_path):
    ws, start, test = llama_ws
    template = "Q: {source} A:"
    fp = str(tmp_path / "fp")
    flat = flat_settings(ws, fp, model=start, bits="fp", max_steps=12,
                         max_source_length=24, max_target_length=8)
    _run("train", *cli_args(flat), "--prompt-template", template)
    saved = json.load(open(os.path.join(fp, "train_config.json")))
    assert saved["data"]["prompt_template"] == template
    log = [json.loads(x) for x in open(os.path.join(fp, "log.jsonl"))]
    assert log[-1]["ce"] < log[0]["ce"]  # learns the target (the first 4 source words)
    # the input-use check runs for decoder-only seq2seq too (prompts deranged)
    assert {"input_use_ce", "input_use_ce_shuffled", "input_use_ok"} <= set(log[-1])
    assert log[-1]["input_use_gap"] == pytest.approx(
        log[-1]["input_use_ce_shuffled"] - log[-1]["input_use_ce"])
    w2 = str(tmp_path / "w2")
    flat = flat_settings(ws, w2, teacher=fp, bits="2-2-8", max_steps=3,
                         max_source_length=24, max_target_length=8)
    _run("train", *cli_args(flat), "--prompt-template", template)
    log = [json.loads(x) for x in open(os.path.join(w2, "log.jsonl"))]
    assert {"ce", "logits", "hidden", "attn"} <= set(log[0])
    for model in (fp, w2):
        out_dir = str(tmp_path / (os.path.basename(model) + "-eval"))
        out = _run("evaluate", "--model", model, "--test-file", test, "--num-beams", "1",
                   "--output-dir", out_dir, "--device", "cpu", "--no-progress")
        assert repr(template) in out  # the training run's template, read back
        metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
        assert {"rouge1", "rougeL", "degenerate", "gen_len"} <= set(metrics)
        assert metrics["gen_len"] <= 8  # --max-target-length of the run = new tokens
        lines = open(os.path.join(out_dir, "predictions.jsonl")).read().splitlines()
        assert len(lines) == 8


def test_cli_template_without_source_slot_is_a_one_line_error(llama_ws, tmp_path, capsys):
    from tbt.cli import main

    ws, start, test = llama_ws
    rc = main(["evaluate", "--model", start, "--test-file", test, "--prompt-template",
               "Summarize:", "--output-dir", str(tmp_path / "e"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no {source}" in err and "Traceback" not in err
    rc = main(["train", *cli_args(flat_settings(ws, str(tmp_path / "t"), model=start,
                                                bits="fp", max_steps=1)),
               "--prompt-template", "Summarize:"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no {source}" in err and "Traceback" not in err


def test_task_resolution():
    from conftest import make_tiny
    from tbt.train.build import data_task

    llama, bart = tiny_llama(), make_tiny("bart")
    seq, pt, lm = (SimpleNamespace(data=DataConfig(task=t))  # data_task reads cfg.data only
                   for t in ("seq2seq", "prompt-target", "causal-lm"))
    assert data_task(seq, llama) == "prompt-target" and data_task(pt, llama) == "prompt-target"
    assert data_task(lm, llama) == "causal-lm" and data_task(seq, bart) == "seq2seq"
    for cfg in (pt, lm):
        with pytest.raises(ValueError, match="pass --task seq2seq"):
            data_task(cfg, bart)
