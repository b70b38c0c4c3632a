"""Offline tokenizer training: BART special ids, <s> … </s> wrapping, save/load round trip."""

from __future__ import annotations

import json

import pytest

from tbt.train.tokenizer import train_tokenizer

TEXTS = [{"document": f"Return the value of field number {i} from the record, or None.",
          "summary": f"Return field {i}.", "translation": {"en": "the house", "ro": "casa"}}
         for i in range(40)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in TEXTS), encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_round_trip_through_auto_tokenizer(data_file, tmp_path, kind):
    from transformers import AutoTokenizer

    tok = train_tokenizer([data_file], ["document", "summary"], 300, str(tmp_path), kind=kind)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(again) == len(tok) > 40  # a real vocabulary, not the empty-vocab trap
    assert [again.bos_token_id, again.pad_token_id, again.eos_token_id,
            again.unk_token_id] == [0, 1, 2, 3]
    assert again.mask_token_id == len(again) - 1
    text = "Return the value of field number 7."
    ids = again(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    assert again.decode(ids, skip_special_tokens=True) == text
    assert again(text, text)["input_ids"] == ids + [2] + ids[1:]  # <s> A </s></s> B </s>
    batch = again(["Return", text], padding=True)["input_ids"]
    assert batch[0][-1] == again.pad_token_id


def test_bpe_is_byte_level_no_unknowns(data_file, tmp_path):
    tok = train_tokenizer([data_file], ["document"], 300, str(tmp_path))
    text = "naïve ☃ 東京"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_gpt2_model_type_adds_no_special_tokens(data_file, tmp_path):
    tok = train_tokenizer([data_file], ["summary"], 300, str(tmp_path), model_type="gpt2")
    ids = tok("Return field 3.")["input_ids"]
    assert ids and not set(ids) & {0, 2}


def test_translation_columns(data_file, tmp_path):
    tok = train_tokenizer([data_file], ["translation.ro"], 300, str(tmp_path))
    assert "casa" in tok.get_vocab()


def test_errors(data_file, tmp_path):
    with pytest.raises(ValueError, match=r"column 'text' not found; columns present: 'document'"):
        train_tokenizer([data_file], ["text"], 300, str(tmp_path))
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer([data_file], ["document"], 100, str(tmp_path))
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer([data_file], ["document"], 300, str(tmp_path), kind="wordpiece")


def test_cli_tokenizer_train(data_file, tmp_path, capsys):
    from transformers import AutoTokenizer

    from tbt.cli import main

    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--train-file", data_file, "--source-column", "document",
               "--target-column", "summary", "--vocab-size", "300", "--output-dir", str(out)])
    assert rc == 0
    assert "bpe tokenizer" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(out))("Return")["input_ids"][0] == 0
    rc = main(["tokenizer", "train", "--train-file", data_file, "--source-column", "nope",
               "--vocab-size", "300", "--output-dir", str(tmp_path / "tok2")])
    assert rc == 2
    assert "columns present" in capsys.readouterr().err
    assert not (tmp_path / "tok2").exists()  # nothing left behind by a failed run
