"""evaluate(): generation order, gen_len, files written; `tbt evaluate` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tbt.eval.evaluate import GENERATION_PRESETS, evaluate, generate_predictions, resolve_preset

ROWS = [{"source": f"Return the value of field number {i} from the record{'s' * i}.",
         "target": f"Return field {i}."} for i in range(7)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps beam search fast on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tbt.train.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4), encoding="utf-8")
    return train_tokenizer([str(d / "t.jsonl")], ["source", "target"], 300, str(d / "tok"))


def tiny_bart(vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=2)
    return tf.BartForConditionalGeneration(cfg)


class EchoSeq2Seq(torch.nn.Module):
    """Stub encoder-decoder whose generate() returns its (right-padded) input ids."""

    config = type("C", (), {"is_encoder_decoder": True, "max_position_embeddings": 64})()

    def forward(self, *a, **k):  # pragma: no cover - not used
        raise AssertionError

    def generate(self, input_ids, attention_mask, **kw):
        assert (attention_mask[:, 0] == 1).all()  # right padding
        return input_ids


class EchoCausal(EchoSeq2Seq):
    """Stub decoder-only model: generate() appends the tokens of " Return" to the prompt."""

    config = type("C", (), {"is_encoder_decoder": False})()

    def generate(self, input_ids, attention_mask, **kw):
        assert (attention_mask[:, -1] == 1).all()  # left padding: prompts end flush
        assert "max_new_tokens" in kw and "max_length" not in kw
        new = torch.tensor(self.new_ids).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_predictions_in_input_order_and_gen_len(tok, tmp_path):
    # Sources have different lengths, so batches are formed in sorted order; the echo model
    # must still give each source back in its own slot.
    res = evaluate(EchoSeq2Seq(), tok, ROWS, metrics=("rouge", "bleu"), gen_kwargs={},
                   batch_size=3, output_dir=str(tmp_path), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [x["prediction"] for x in lines] == [r["source"] for r in ROWS]
    assert [x["reference"] for x in lines] == [r["target"] for r in ROWS]
    want_len = sum(len(tok(r["source"])["input_ids"]) for r in ROWS) / len(ROWS)
    assert res["gen_len"] == pytest.approx(want_len)  # non-pad tokens incl. <s> and </s>
    assert res["n_examples"] == 7
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "gen_len",
                            "n_examples", "degenerate"}
    assert on_disk.pop("degenerate") == res["degenerate"]
    assert res["degenerate"]["verdict"] == "ok"  # the echo model writes 7 different outputs
    assert on_disk == pytest.approx({k: v for k, v in res.items() if k != "degenerate"})


def test_causal_generation_strips_prompt_and_uses_new_tokens(tok):
    model = EchoCausal()
    model.new_ids = tok(" Return", add_special_tokens=False)["input_ids"]
    side = tok.padding_side
    preds = generate_predictions(model, tok, [r["source"] for r in ROWS[:4]],
                                 {"max_length": 5}, batch_size=4, device="cpu", progress=False)
    assert preds == ["Return"] * 4
    assert tok.padding_side == side  # restored


def test_evaluate_tiny_random_bart_writes_files(tok, tmp_path, capsys):
    model = tiny_bart(len(tok)).train()
    gen = {"num_beams": 2, "max_length": 10, "min_length": 10, "suppress_tokens": [1]}
    res = evaluate(model, tok, ROWS[:4], metrics=("rouge",), gen_kwargs=gen, batch_size=2,
                   output_dir=str(tmp_path), progress=False)
    assert set(res) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "n_examples",
                        "degenerate"}
    assert res["gen_len"] == 10.0  # min = max length, pad suppressed: every output is full
    assert all(0.0 <= res[k] <= 100.0 for k in ("rouge1", "rougeLsum"))
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["prediction"] for x in lines)
    assert "rougeLsum" in capsys.readouterr().out  # the printed table
    assert model.training  # generation ran in eval mode and restored the caller's mode
    ppl = evaluate(model, tok, ROWS[:4], metrics=("perplexity",), progress=False)
    assert 1.0 < ppl["perplexity"] < 10 * len(tok) and "gen_len" not in ppl


def test_presets_and_errors(tok):
    assert resolve_preset("xsum") == {"num_beams": 6, "length_penalty": 1.0, "max_length": 62,
                                      "min_length": 11}
    assert resolve_preset("cnn_dailymail")["length_penalty"] == 2.0
    assert resolve_preset(None) == GENERATION_PRESETS["default"]
    assert resolve_preset("abisee/cnn_dailymail")["num_beams"] == 4
    with pytest.raises(ValueError, match="choose one of"):
        resolve_preset("squad")
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(EchoSeq2Seq(), tok, ROWS, metrics=("meteor",))


def test_cli_evaluate(tok, tmp_path):
    from tbt.cli import main

    model_dir = tmp_path / "model"
    tiny_bart(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"document": r["source"], "summary": r["target"]})
                                 + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(model_dir), "--test-file", str(test_file),
               "--source-column", "document", "--target-column", "summary", "--metrics", "bleu",
               "--output-dir", str(out), "--num-beams", "1", "--max-length", "6",
               "--max-samples", "3", "--device", "cpu", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bleu", "chrf", "gen_len", "n_examples", "degenerate"}
    assert metrics["n_examples"] == 3
    assert metrics["gen_len"] <= 6
    rc = main(["evaluate", "--model", str(model_dir), "--test-file", str(test_file),
               "--source-column", "article", "--output-dir", str(tmp_path / "eval2")])
    assert rc == 2  # clear error, no traceback
