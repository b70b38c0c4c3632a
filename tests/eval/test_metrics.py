"""Metrics against hand-worked values: ROUGE, the offline sentence splitter, BLEU, perplexity."""

from __future__ import annotations

import pytest
import torch

from tbt.eval.metrics import bleu, normalize_romanian, perplexity, rouge, split_sentences


@pytest.mark.parametrize("text, want", [
    ("Mr. Smith left. He came back!  Then 3 more.",
     ["Mr. Smith left.", "He came back!", "Then 3 more."]),
    ("The U.S. economy grew 3.5 percent. Stocks rose.",
     ["The U.S. economy grew 3.5 percent.", "Stocks rose."]),
    ('He said "Stop!" Then he left.', ['He said "Stop!"', "Then he left."]),
    ("See e.g. This one. And J. Smith agreed.", ["See e.g. This one.", "And J. Smith agreed."]),
    ("line one\n\nline two. Three", ["line one", "line two.", "Three"]),
    ("lower case. after a period stays", ["lower case. after a period stays"]),
    ("What? Yes.", ["What?", "Yes."]),
    ("", []),
])
def test_split_sentences(text, want):
    assert split_sentences(text) == want


def test_rouge_identical_and_disjoint():
    same = rouge(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}
    assert set(rouge(["alpha beta"], ["gamma delta"]).values()) == {0.0}


def test_rouge_hand_computed():
    # pred: the cat sat on the mat   ref: the cat lay on a rug (6 tokens each)
    # unigram overlap: the, cat, on = 3  -> P = R = 3/6 -> F = 50
    # bigrams: only "the cat" shared of 5 each -> F = 20; LCS "the cat on" = 3 -> F = 50
    got = rouge(["the cat sat on the mat"], ["the cat lay on a rug"])
    assert got["rouge1"] == pytest.approx(50.0)
    assert got["rouge2"] == pytest.approx(20.0)
    assert got["rougeL"] == pytest.approx(50.0)
    assert got["rougeLsum"] == pytest.approx(50.0)


def test_rouge_uses_stemmer():
    assert rouge(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(100.0)


def test_rougelsum_uses_sentence_split():
    # Same two sentences in swapped order: a single LCS over the whole text matches only one
    # (3 of 6 tokens -> 50), the summary-level union LCS matches both (100).
    got = rouge(["The cat sat. A dog ran."], ["A dog ran. The cat sat."])
    assert got["rougeL"] == pytest.approx(50.0)
    assert got["rougeLsum"] == pytest.approx(100.0)


def test_rouge_aggregate_is_deterministic_and_a_mean():
    preds, refs = ["the cat sat on the mat", "x y", "a b c"], ["the cat lay on a rug", "x z",
                                                                 "a b c"]
    first = rouge(preds, refs)
    assert first == rouge(preds, refs)
    assert first["rouge1"] == pytest.approx((50 + 50 + 100) / 3, abs=3.0)  # bootstrap median
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_bleu_and_chrf():
    sents = ["the cat sat on the mat .", "a quick brown fox jumps ."]
    assert bleu(sents, sents) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    low = bleu(["completely different words here ."] * 2, sents)
    assert low["bleu"] < 10 and low["chrf"] < 30


def test_romanian_normalisation():
    assert normalize_romanian("Şi ţara ăîâ şţ") == "Si tara aia st"
    assert bleu(["ţara"], ["țara"], romanian=True)["chrf"] == pytest.approx(100.0)


class _UniformLM(torch.nn.Module):
    """Decoder-only stub with all-zero logits: every token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.config = type("C", (), {"is_encoder_decoder": False})()

    def forward(self, input_ids, attention_mask=None, labels=None):
        return type("O", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_uniform_model_equals_vocab_size():
    labels = torch.tensor([[5, 6, 7, -100], [5, 6, -100, -100]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": (labels >= 0).long(),
             "labels": labels}
    assert perplexity(_UniformLM(50), [batch], "cpu") == pytest.approx(50.0)
    assert perplexity(_UniformLM(10), [batch, batch], "cpu") == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no label tokens"):
        perplexity(_UniformLM(7), [{"input_ids": labels[:, :1], "labels": labels[:, 3:]}], "cpu")
