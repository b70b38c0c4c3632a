"""Data loading, tokenization, collation: formats, clear errors, counted skips, padding."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from tbt.data import (
    DataConfig,
    build_dataloader,
    load_raw_splits,
    make_collator,
    read_records,
    tokenize_rows,
)

ROWS = [{"document": f"Document number {i} says something about topic {i}.",
         "summary": f"Topic {i}.", "id": i} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tbt.train.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    f = write_jsonl(d / "t.jsonl", ROWS * 5)
    return train_tokenizer([f], ["document", "summary"], 300, str(d / "tok"))


# --- formats ---------------------------------------------------------------------------------

def test_jsonl_rows_normalised(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = load_raw_splits(DataConfig(train_file=f))
    assert list(out) == ["train"]
    assert out["train"][2] == {"source": ROWS[2]["document"], "target": "Topic 2."}


def test_csv_and_parquet_and_json_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["document", "summary", "id"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    want = load_raw_splits(DataConfig(test_file=write_jsonl(tmp_path / "d.jsonl", ROWS)))["test"]
    for ext in ("csv", "parquet", "json"):
        got = load_raw_splits(DataConfig(test_file=str(tmp_path / f"d.{ext}")))["test"]
        assert got == want, ext


def test_translation_layout(tmp_path):
    rows = [{"translation": {"en": "the house", "ro": "casa"}},
            {"translation": {"en": "a dog", "ro": "un câine"}}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    out = load_raw_splits(DataConfig(validation_file=f, source_lang="en", target_lang="ro"))
    assert out["validation"] == [{"source": "the house", "target": "casa"},
                                 {"source": "a dog", "target": "un câine"}]
    with pytest.raises(ValueError, match=r"languages present: 'en', 'ro'"):
        load_raw_splits(DataConfig(validation_file=f, source_lang="en", target_lang="de"))
    with pytest.raises(ValueError, match="--source-lang"):  # columns missing: hint at the layout
        load_raw_splits(DataConfig(validation_file=f))


def test_causal_lm_text_and_txt_file(tmp_path):
    p = tmp_path / "lm.txt"
    p.write_text("first line\n\nsecond line\n", encoding="utf-8")
    out = load_raw_splits(DataConfig(task="causal-lm", train_file=str(p)))
    assert out["train"] == [{"text": "first line"}, {"text": "second line"}]


def test_prefix_and_sample_caps(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = DataConfig(train_file=f, test_file=f, source_prefix="summarize: ",
                     max_train_samples=2, max_eval_samples=3)
    out = load_raw_splits(cfg)
    assert len(out["train"]) == 2 and len(out["test"]) == 3
    assert out["test"][0]["source"] == "summarize: " + ROWS[0]["document"]


# --- errors and skips ------------------------------------------------------------------------

def test_missing_column_lists_present_columns(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError) as e:
        load_raw_splits(DataConfig(train_file=f, source_column="article"))
    msg = str(e.value)
    assert "'article'" in msg and "'document', 'summary', 'id'" in msg and "--source-column" in msg


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_raw_splits(DataConfig(train_file=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "d.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported extension '.xml'"):
        read_records(tmp_path / "d.xml")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="--train-file"):
        load_raw_splits(DataConfig())


def test_empty_rows_skipped_and_counted(tmp_path, caplog):
    rows = ROWS[:3] + [{"document": "  ", "summary": "x"}, {"document": "y", "summary": None},
                       {"document": "z"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="tbt.data"):
        out = load_raw_splits(DataConfig(train_file=f))["train"]
    assert [r["target"] for r in out] == ["Topic 0.", "Topic 1.", "Topic 2."]
    assert "skipped 3 of 6 rows" in caplog.text
    f2 = write_jsonl(tmp_path / "e.jsonl", [{"document": "", "summary": ""}])
    with pytest.raises(ValueError, match="all 1 rows have empty text"):
        load_raw_splits(DataConfig(train_file=f2))


def test_hub_dataset_columns_and_offline_error(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None):
        calls.append((name, config))
        if name == "missing":
            raise ConnectionError("no network")
        rows = [{"article": "A long news story. It goes on.", "highlights": "Story.", "id": "1"}]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = load_raw_splits(DataConfig(dataset="cnn_dailymail"), splits=("test", "validation"))
    assert calls == [("cnn_dailymail", "3.0.0")]  # the paper's config by default
    assert out == {"test": [{"source": "A long news story. It goes on.", "target": "Story."}]}
    with pytest.raises(ValueError, match="Offline\\? Use --train-file"):
        load_raw_splits(DataConfig(dataset="missing"))


def test_config_dict_round_trip():
    cfg = DataConfig(train_file="a.jsonl", source_lang="en", target_lang="ro", max_length=64)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown DataConfig field"):
        DataConfig.from_dict({"train_fil": "a.jsonl"})


def test_config_validation():
    with pytest.raises(ValueError, match="task"):
        DataConfig(task="mlm")
    with pytest.raises(ValueError, match="not both"):
        DataConfig(dataset="xsum", train_file="a.jsonl")
    with pytest.raises(ValueError, match="both --source-lang and --target-lang"):
        DataConfig(source_lang="en")


# --- tokens and batches ----------------------------------------------------------------------

def test_tokenize_truncates_keeps_eos_and_counts(tok, caplog):
    rows = [{"source": "short", "target": "Topic 1."},
            {"source": " ".join(["Document number"] * 30), "target": "Topic 2."}]
    cfg = DataConfig(max_source_length=8, max_target_length=64)
    with caplog.at_level(logging.INFO, logger="tbt.data"):
        out = tokenize_rows(rows, tok, cfg)
    assert "truncated 1 of 2 source sequences to 8 tokens" in caplog.text
    assert out[0]["input_ids"] == tok("short")["input_ids"]
    long_ids = out[1]["input_ids"]
    assert len(long_ids) == 8 and long_ids[0] == 0 and long_ids[-1] == 2
    assert long_ids == tok(rows[1]["source"], truncation=True, max_length=8)["input_ids"]
    assert out[1]["labels"] == tok(text_target="Topic 2.")["input_ids"]
    assert out[1]["attention_mask"] == [1] * 8


def test_collator_pads_inputs_and_labels():
    class Tok:
        pad_token_id = 1

    batch = make_collator(Tok(), DataConfig())([
        {"input_ids": [0, 5, 2], "attention_mask": [1, 1, 1], "labels": [0, 7, 8, 2]},
        {"input_ids": [0, 2], "attention_mask": [1, 1], "labels": [0, 2]}])
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[0, 7, 8, 2], [0, 2, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_causal_collator_masks_padding_by_position_even_if_pad_is_eos():
    class Tok:
        pad_token_id = 2  # GPT-2 style: pad == eos

    batch = make_collator(Tok(), DataConfig(task="causal-lm"))(
        [{"input_ids": [5, 6, 2]}, {"input_ids": [7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["labels"].tolist() == [[5, 6, 2], [7, -100, -100]]  # the real eos is kept
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dataloader_deterministic_given_seed(tok):
    rows = tokenize_rows([{"source": f"doc {i}", "target": f"t {i}"} for i in range(20)],
                         tok, DataConfig())

    def order(seed):
        dl = build_dataloader(rows, tok, DataConfig(), batch_size=4, shuffle=True, seed=seed)
        return [b["input_ids"].tolist() for b in dl]

    assert order(3) == order(3)
    assert order(3) != order(4)
    dl = build_dataloader(rows, tok, DataConfig(), batch_size=6, shuffle=False, seed=0,
                          drop_last=True)
    assert len(dl) == 3 and all(b["input_ids"].shape[0] == 6 for b in dl)
