"""Rows -> tokens: response-only labels, pad = EOS, truncation, clear errors naming file and row."""

import csv
import json

import pytest

from kdflow.config import DataConfig
from kdflow.data import Encoder, IGNORE_INDEX, collate, encode_rows, read_rows
from kdflow.errors import DataError

from conftest import train_tokenizer, write_jsonl


def test_labels_cover_the_response_and_its_eos_even_when_pad_is_eos(bpe_tok, tmp_path):
    assert bpe_tok.pad_token_id == bpe_tok.eos_token_id  # the case that breaks id-based masks
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Define cat.", "response": "a small feline"},
                                           {"prompt": "Define the noun dog, please, in a phrase.", "response": "canine"}])
    ex = encode_rows(read_rows(str(f)), bpe_tok, DataConfig())
    for e in ex:
        resp = [t for t in e["labels"] if t != IGNORE_INDEX]
        assert resp[-1] == bpe_tok.eos_token_id
        assert e["labels"][: e["prompt_len"]] == [IGNORE_INDEX] * e["prompt_len"]
        assert e["input_ids"][e["prompt_len"]:] == resp
    # the decoded answer is exactly the response followed by EOS, nothing of the template after it
    assert bpe_tok.decode(ex[0]["input_ids"][ex[0]["prompt_len"]:]) == "a small feline<|im_end|>"
    batch = collate(ex, bpe_tok.pad_token_id)
    short = 0 if len(ex[0]["input_ids"]) < len(ex[1]["input_ids"]) else 1
    L = len(ex[short]["input_ids"])
    assert batch["labels"][short, L - 1] == bpe_tok.eos_token_id  # the real EOS is a target
    assert (batch["labels"][short, L:] == IGNORE_INDEX).all()  # the padding EOS ids are not
    assert (batch["attention_mask"][short, L:] == 0).all()


def test_prompt_is_exactly_what_generation_starts_from(bpe_tok):
    enc = Encoder(bpe_tok, DataConfig())
    e = enc.encode({"prompt": "Define cat.", "response": "a feline"}, "x", 0)
    prompt_text = bpe_tok.apply_chat_template([{"role": "user", "content": "Define cat."}], tokenize=False,
                                              add_generation_prompt=True)
    assert bpe_tok.decode(e["input_ids"][: e["prompt_len"]]) == prompt_text


def test_without_chat_template_uses_prompt_template_and_appends_eos(tmp_path):
    tok = train_tokenizer("bpe", chat=False)
    enc = Encoder(tok, DataConfig(prompt_template="Q: {prompt}\nA:"))
    e = enc.encode({"prompt": "Define cat.", "response": " a feline"}, "x", 0)
    assert tok.decode(e["input_ids"]) == "Q: Define cat.\nA: a feline<|im_end|>"
    assert e["labels"][-1] == tok.eos_token_id


def test_messages_rows_use_the_last_assistant_turn(bpe_tok, tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Define cat."},
        {"role": "assistant", "content": "a feline"}]}])
    (e,) = encode_rows(read_rows(str(f)), bpe_tok, DataConfig())
    assert bpe_tok.decode(e["input_ids"][e["prompt_len"]:]) == "a feline<|im_end|>"
    assert "Be brief." in bpe_tok.decode(e["input_ids"][: e["prompt_len"]])


def test_truncation_cuts_the_answer_end_but_never_removes_it(bpe_tok):
    enc = Encoder(bpe_tok, DataConfig(max_length=40, min_response_tokens=2))
    e = enc.encode({"prompt": "Define x.", "response": "word " * 100}, "x", 0)
    assert len(e["input_ids"]) == 40
    assert sum(t != IGNORE_INDEX for t in e["labels"]) == 40 - e["prompt_len"] >= 2


def test_prompt_over_the_limit_names_file_and_row(bpe_tok, tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ok", "response": "fine"},
                                              {"prompt": "very long " * 50, "response": "x"}])
    with pytest.raises(DataError, match=r"long\.jsonl:2: the prompt is \d+ tokens.*data\.max_length=64"):
        encode_rows(read_rows(str(f)), bpe_tok, DataConfig(max_length=64))


@pytest.mark.parametrize("row,match", [
    ({"prompt": "hi"}, r"bad\.jsonl:1: missing field 'response' \(row has: prompt\)"),
    ({"prompt": "  ", "response": "x"}, r"bad\.jsonl:1: field 'prompt' is empty"),
    ({"prompt": "hi", "response": 3}, r"bad\.jsonl:1: field 'response' must be text"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:1: the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, r"answer is empty"),
])
def test_bad_rows_give_one_clear_error(bpe_tok, tmp_path, row, match):
    f = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=match):
        encode_rows(read_rows(str(f)), bpe_tok, DataConfig())


def test_malformed_json_line_and_missing_file(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        read_rows(str(f))
    with pytest.raises(DataError, match=r"nope\.jsonl not found"):
        read_rows(str(tmp_path / "nope.jsonl"), "data.train")
    with pytest.raises(DataError, match="unsupported format '.txt'"):
        (tmp_path / "x.txt").write_text("a")
        read_rows(str(tmp_path / "x.txt"))


def test_csv_parquet_and_saved_dataset_read_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.csv", "d.parquet", "saved", "d.json"):
        got = read_rows(str(tmp_path / name))
        assert got.items == rows, name
    assert read_rows(str(tmp_path / "d.csv")).locations[1].endswith("d.csv:3")


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match="could not load dataset 'hf:no-such-org/no-such-set@train'"):
        read_rows("hf:no-such-org/no-such-set@train")
    with pytest.raises(DataError, match="needs a split"):
        read_rows("hf:org/name")


def test_bundled_wordnet_task_is_clean():
    from conftest import DATA

    seen = {}
    for split in ("train", "validation", "test"):
        rows = read_rows(str(DATA / f"{split}.jsonl"))
        assert len(rows) > 0
        for r in rows.items:
            assert r["prompt"].strip() and r["response"].strip()
            seen.setdefault(r["word"], set()).add(split)
    assert all(len(s) == 1 for s in seen.values()), "a word appears in two splits"
