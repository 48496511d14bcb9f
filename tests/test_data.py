import json
import re
from pathlib import Path

import pytest
import torch

from tuneguard.data.examples import IGNORE, build_examples, label_index
from tuneguard.data.packing import collate, pack
from tuneguard.data.prepare import normalized_key, overlapping_rows, prepare_data
from tuneguard.data.readers import Row, read_rows
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cls_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(kind="classification", train=str(path), labels=["negative", "positive"],
                      prompt_template="Review: {text}", **kw)


def test_readers_name_file_and_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{broken", "[1, 2]", ""])
    rows = read_rows(path)
    assert rows[0].fields == {"text": "ok"}
    assert rows[1].where.endswith("d.jsonl:2") and "invalid JSON" in rows[1].problem
    assert rows[2].where.endswith("d.jsonl:3") and "expected a JSON object" in rows[2].problem
    tsv = tmp_path / "d.tsv"
    tsv.write_text("sentence\tlabel\na \"quoted\" film \t1\nbad row\n")
    rows = read_rows(tsv)
    assert rows[0].fields == {"sentence": 'a "quoted" film ', "label": "1"}
    assert rows[1].where.endswith("d.tsv:3") and "expected 2 columns" in rows[1].problem


def test_parquet_and_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "x", "label": 1}]), tmp_path / "d.parquet")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    assert read_rows(tmp_path / "d.parquet")[0].fields == {"text": "x", "label": 1}
    assert not (tmp_path / "hf").exists()  # no Arrow copy in a datasets cache outside the run's folders
    (tmp_path / "d.csv").write_text('text,label\n"a, b",0\n')
    assert read_rows(tmp_path / "d.csv")[0].fields == {"text": "a, b", "label": "0"}


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TuneguardError, match="the dataset is empty"):
        read_rows(jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(TuneguardError, match="data file not found"):
        read_rows(tmp_path / "none.jsonl")
    with pytest.raises(TuneguardError, match="cannot tell the format"):
        read_rows(jsonl(tmp_path / "x.data", [{"a": 1}]))


def test_classification_masks_prompt_and_maps_labels(tmp_path: Path, tokenizer) -> None:
    path = jsonl(tmp_path / "d.jsonl", [{"text": "great film", "label": 1}, {"text": "dull", "label": "negative"}])
    cfg = cls_cfg(path)
    examples, items = build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")
    assert [e.label for e in examples] == [1, 0]
    first = examples[0]
    answer = [t for t in first.labels if t != IGNORE]
    assert tokenizer.decode(answer) == "positive<|im_end|>\n"
    assert first.input_ids[len(first.input_ids) - len(answer):] == answer
    assert items[0].gold == 1 and items[0].choices[1] == tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(items[0].context_ids).endswith("<|im_start|>assistant\n")


def test_bad_rows_counted_named_and_allowed_fraction(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": "fine", "label": 0}] * 8 + [{"text": "x", "label": 7}, "{oops"]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(TuneguardError) as err:
        build_examples(read_rows(path), cls_cfg(path), tokenizer, is_encoder=False, what="training")
    msg = str(err.value)
    assert msg.startswith("2 of 10 training rows are bad")
    assert "d.jsonl:9: label '7' is not in the label set" in msg and "d.jsonl:10: invalid JSON" in msg
    examples, _ = build_examples(read_rows(path), cls_cfg(path, max_bad_fraction=0.25), tokenizer,
                                 is_encoder=False, what="training")
    assert len(examples) == 8


def test_label_index_accepts_dict_and_names() -> None:
    cfg = DataConfig(kind="classification", train="x", labels={"pos": "positive", "neg": "negative"})
    mapping, verbalizers = label_index(cfg)
    assert verbalizers == ["positive", "negative"]
    assert mapping["pos"] == 0 and mapping["negative"] == 1


def test_raw_labels_that_share_a_name_are_one_class(tmp_path: Path, tokenizer) -> None:
    """Star ratings merged by a mapping: two classes, not four of which two could never be predicted (a tie between
    equal answers went to the first, so every row rated 2 or 5 was counted wrong)."""
    cfg = DataConfig(kind="classification", train="x", labels={1: "negative", 2: "negative", 4: "positive", 5: "positive"})
    mapping, verbalizers = label_index(cfg)
    assert verbalizers == cfg.classes == ["negative", "positive"]
    assert [mapping[k] for k in ("1", "2", "4", "5", "negative", "positive")] == [0, 0, 1, 1, 0, 1]
    path = jsonl(tmp_path / "d.jsonl", [{"text": "bad", "label": 2}, {"text": "good", "label": 5}])
    examples, _ = build_examples(read_rows(path), cfg.model_copy(update={"train": str(path)}), tokenizer,
                                 is_encoder=True, what="training")
    assert [e.label for e in examples] == [0, 1]


def test_turns_whose_content_is_not_text_are_bad_rows(tmp_path: Path, tokenizer) -> None:
    """OpenAI-style content parts, a null content, or roles the chat template refuses: counted and named bad rows
    (a traceback with exit 1 before), so max_bad_fraction can let a run skip them."""
    good = [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}]
    rows = [{"messages": good},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, good[1]]},
            {"messages": [good[0], {"role": "assistant", "content": None}]}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(TuneguardError) as err:
        build_examples(read_rows(path), DataConfig(kind="instruction", train=str(path)), tokenizer, is_encoder=False,
                       what="training")
    assert "d.jsonl:2: 'messages' turn 1: role and content must be text (content list" in str(err.value)
    assert "d.jsonl:3: 'messages' turn 2: role and content must be text (content NoneType" in str(err.value)
    cfg = DataConfig(kind="instruction", train=str(path), max_bad_fraction=0.7)
    assert len(build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")[0]) == 1


def test_an_instruction_row_without_its_prompt_field_is_bad_not_read_from_text(tmp_path: Path, tokenizer) -> None:
    """Alpaca rows carry 'text', the whole formatted example with its answer: without the prompt field the row fell
    back to '{text}' and trained with the answer inside the prompt."""
    rows = [{"instruction": "add 2 and 2", "text": "### Instruction: add 2 and 2 ### Response: 4", "output": "4"}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(kind="instruction", train=str(path), response_field="output")
    with pytest.raises(TuneguardError, match=r"d\.jsonl:1: missing field 'prompt' \(data\.prompt_field; or set"):
        build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")
    fixed = cfg.model_copy(update={"prompt_field": "instruction"})
    (example,), _ = build_examples(read_rows(path), fixed, tokenizer, is_encoder=False, what="training")
    assert "Response" not in tokenizer.decode(example.input_ids)


def test_instruction_loss_only_on_assistant_turns(tmp_path: Path, tokenizer) -> None:
    msgs = [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": "why"}, {"role": "assistant", "content": "because"}]
    path = jsonl(tmp_path / "d.jsonl", [{"messages": msgs}, {"prompt": "what is two plus two", "response": "four"}])
    cfg = DataConfig(kind="instruction", train=str(path))
    examples, _ = build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")
    learned = tokenizer.decode([t for t in examples[0].labels if t != IGNORE])
    assert learned == "four<|im_end|>\nbecause<|im_end|>\n"
    assert tokenizer.decode([t for t in examples[1].labels if t != IGNORE]) == "four<|im_end|>\n"
    bad = jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TuneguardError, match="no assistant turn"):
        build_examples(read_rows(bad), cfg, tokenizer, is_encoder=False, what="training")


def test_messages_without_a_chat_template_learn_the_last_assistant_turn(tmp_path: Path, tokenizer) -> None:
    """Plain-text rendering: a user turn after the answer is not the answer; the system prompt applies to message
    rows as to prompt/response rows."""
    msgs = [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": "thanks"}]
    path = jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    for template in (False, True):
        cfg = DataConfig(kind="instruction", train=str(path), use_chat_template=template, system_prompt="SYS RULES")
        (example,), _ = build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")
        assert tokenizer.decode([t for t in example.labels if t != IGNORE]).startswith("four")
        assert "SYS RULES" in tokenizer.decode(example.input_ids)


def test_held_out_validation_is_a_sample_not_the_first_rows(tmp_path: Path) -> None:
    """Rows split off the training file keep file order; on a file sorted by label the first N were one class."""
    from tuneguard.data.prepare import read_split

    path = jsonl(tmp_path / "sorted.jsonl", [{"text": f"review {i}", "label": int(i >= 500)} for i in range(1000)])
    _, val = read_split(cls_cfg(path, val_fraction=0.2, max_val_samples=50), seed=0)
    labels = [r.fields["label"] for r in val]
    assert len(labels) == 50 and 15 <= sum(labels) <= 35
    other = jsonl(tmp_path / "val.jsonl", [{"text": f"v {i}", "label": i % 2} for i in range(10)])
    _, first = read_split(cls_cfg(path, validation=str(other), max_val_samples=4), seed=0)
    assert [r.fields["text"] for r in first] == ["v 0", "v 1", "v 2", "v 3"]  # a validation file: its first N


def test_encoder_rows_that_just_fit_are_not_truncated(tmp_path: Path, tokenizer) -> None:
    text = "a b c d"
    fit = len(tokenizer(f"Review: {text}")["input_ids"])
    path = jsonl(tmp_path / "d.jsonl", [{"text": text, "label": 1}])
    for max_length, truncated in ((fit, False), (fit - 1, True)):
        (example,), _ = build_examples(read_rows(path), cls_cfg(path, max_length=max_length), tokenizer,
                                       is_encoder=True, what="training")
        assert example.truncated is truncated


def test_replay_is_refused_for_an_encoder_and_shares_no_passage_with_boolq(tmp_path: Path, tokenizer) -> None:
    from tuneguard.data.prepare import BUNDLED_REPLAY

    path = jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    with pytest.raises(TuneguardError, match="an encoder's classification head has no use for it"):
        prepare_data(cls_cfg(path, replay="bundled:wiki", replay_fraction=0.2), tokenizer, is_encoder=True, seed=0)
    with pytest.raises(TuneguardError, match="data.system_prompt goes before a chat model's prompt; an encoder reads"):
        prepare_data(cls_cfg(path, system_prompt="be fair"), tokenizer, is_encoder=True, seed=0)
    boolq = Path(__file__).parent.parent / "tuneguard" / "eval" / "data" / "boolq.jsonl"
    asked = {json.loads(line)["passage"] for line in boolq.read_text().splitlines()}
    replay = [json.loads(line) for line in BUNDLED_REPLAY["wiki"].read_text().splitlines()]
    assert len(replay) == 788 and not {f"{w['title']} -- {w['text']}" for w in replay} & asked


def test_replay_reads_tables_by_format_and_refuses_nothing_to_replay(tmp_path: Path, tokenizer) -> None:
    """A ``.json`` replay file is a table (its 'text' column), not lines of JSON to train on; an empty one, or
    one key without the other, is one line naming it."""
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"the movie {i}", "label": i % 2} for i in range(8)])
    table = jsonl(tmp_path / "wiki.json", [{"title": "T", "text": "the acting was wonderful"}])
    mixed = prepare_data(cls_cfg(path, val_fraction=0.25, replay=str(table), replay_fraction=0.5), tokenizer,
                         is_encoder=False, seed=1)
    replayed = [e for e in mixed.train if "wonderful" in tokenizer.decode(e.input_ids)]
    assert replayed and not any("title" in tokenizer.decode(e.input_ids) for e in mixed.train)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TuneguardError, match="empty.txt holds no text to replay"):
        prepare_data(cls_cfg(path, replay=str(tmp_path / "empty.txt"), replay_fraction=0.2), tokenizer,
                     is_encoder=False, seed=1)
    (tmp_path / "pretty.json").write_text('[\n {"text": "a"},\n {"text": "b"}\n]\n')  # an array, not JSON Lines
    with pytest.raises(TuneguardError, match=r"data.replay: .*pretty.json:1: invalid JSON .*a replay table is read whole"):
        prepare_data(cls_cfg(path, replay=str(tmp_path / "pretty.json"), replay_fraction=0.2), tokenizer,
                     is_encoder=False, seed=1)
    assert "needs data.replay_fraction, its share" in (cls_cfg(path, replay="bundled:wiki").replay_problem() or "")
    assert "needs data.replay, the text" in (cls_cfg(path, replay_fraction=0.2).replay_problem() or "")
    assert cls_cfg(path, replay="bundled:wiki", replay_fraction=0.2).replay_problem() is None


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM, which made the first column '\\ufeffsentence'."""
    (tmp_path / "d.csv").write_bytes("\ufeffsentence,label\ngood film,1\n".encode())
    (tmp_path / "d.jsonl").write_bytes('\ufeff{"text": "good", "label": 1}\n'.encode())
    assert read_rows(tmp_path / "d.csv")[0].fields == {"sentence": "good film", "label": "1"}
    assert read_rows(tmp_path / "d.jsonl")[0].fields == {"text": "good", "label": 1}


def test_an_image_in_both_splits_is_found_however_its_path_is_spelled(tmp_path: Path) -> None:
    cfg = DataConfig(kind="image_classification", train="t.csv", labels=["0", "1"])
    (tmp_path / "img").mkdir()
    train = [Row("t.csv:2", {"image": str(tmp_path / "img" / "a.png"), "label": "0"})]
    val = [Row("v.csv:2", {"image": str(tmp_path / "img" / ".." / "img" / "a.png"), "label": "0", "id": 7}),
           Row("v.csv:3", {"image": str(tmp_path / "img" / "b.png"), "label": "0"})]
    assert overlapping_rows(train, val, cfg) == ["v.csv:2"]


def test_text_kind_windows_keep_every_token(tmp_path: Path, tokenizer) -> None:
    text = "the movie was great and the acting was wonderful " * 10
    path = jsonl(tmp_path / "d.jsonl", [{"text": text}])
    cfg = DataConfig(kind="text", train=str(path), max_length=16)
    examples, _ = build_examples(read_rows(path), cfg, tokenizer, is_encoder=False, what="training")
    flat = [t for e in examples for t in e.input_ids]
    assert flat == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(e.input_ids) <= 16 for e in examples)


def test_packed_forward_equals_separate_forwards(tiny_llama, tokenizer) -> None:
    """Packing must not let documents see each other: per-document logits are unchanged."""
    model, _ = tiny_llama
    docs = [tokenizer(t)["input_ids"] for t in ["the movie was great", "a dull boring film", "what is two plus two"]]
    from tuneguard.data.examples import Example

    rows = pack([Example(d, d) for d in docs], max_length=64)
    assert len(rows) == 1
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits[0]
        offset = 0
        for d in docs:
            alone = model(input_ids=torch.tensor([d])).logits[0]
            torch.testing.assert_close(packed[offset : offset + len(d)], alone, atol=1e-5, rtol=1e-4)
            offset += len(d)
    # The first token of each document is never a target; padding is never a target.
    assert rows[0].labels[0] == IGNORE and rows[0].labels[len(docs[0])] == IGNORE


def test_pack_respects_max_length_and_pad_segment(tokenizer) -> None:
    from tuneguard.data.examples import Example

    rows = pack([Example([1] * 5, [1] * 5), Example([2] * 4, [2] * 4), Example([3] * 6, [3] * 6)], max_length=10)
    assert [len(r.input_ids) for r in rows] == [9, 6]
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert (batch["labels"][1, 6:] == IGNORE).all()
    assert pack([Example([1] * 3, [1] * 3)] * 2, 10, enabled=False)[0].input_ids == [1, 1, 1]


def test_prepare_splits_with_seed_and_mixes_replay(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": f"the movie {i}", "label": i % 2} for i in range(40)]
    path = jsonl(tmp_path / "d.jsonl", rows)
    cfg = cls_cfg(path, val_fraction=0.25)
    a = prepare_data(cfg, tokenizer, is_encoder=False, seed=1)
    b = prepare_data(cfg, tokenizer, is_encoder=False, seed=1)
    assert a.stats["val_rows"] == 10 and a.stats["train_rows"] == 30
    assert [i.context_ids for i in a.val_items] == [i.context_ids for i in b.val_items]
    replay = tmp_path / "general.txt"
    replay.write_text("the acting was wonderful\nwhat is two plus two\n")
    mixed = prepare_data(cls_cfg(path, val_fraction=0.25, replay=str(replay), replay_fraction=0.2), tokenizer,
                         is_encoder=False, seed=1)
    assert mixed.stats["replay_examples"] == round(30 * 0.2 / 0.8)
    with pytest.raises(TuneguardError, match="encoders train classification only"):
        prepare_data(DataConfig(kind="text", train=str(path)), tokenizer, is_encoder=True, seed=0)


def test_a_repeated_row_is_found_whatever_other_columns_the_files_carry() -> None:
    """Overlap keys read what the prompt reads: an ``id`` in one file only does not hide a repeated review."""
    cfg = DataConfig(train="t.jsonl", prompt_template="Premise: {premise}\nHypothesis: {hypothesis}")
    key = normalized_key(Row("a:1", {"premise": "A dog runs.", "hypothesis": "An animal moves", "label": 0}), cfg)
    assert key == normalized_key(Row("b:7", {"premise": "a dog RUNS", "hypothesis": "an animal moves!", "id": 7,
                                              "label": 1}), cfg)
    assert key != normalized_key(Row("b:8", {"premise": "A dog runs.", "hypothesis": "A cat sleeps", "id": 8}), cfg)
    plain = DataConfig(train="t.jsonl", text_field="sentence")
    assert normalized_key(Row("a:1", {"sentence": "Great film", "idx": 1}), plain) == \
        normalized_key(Row("b:1", {"sentence": "great film.", "source": "web"}), plain)
    chat = DataConfig(kind="instruction", train="t.jsonl")  # other kinds: every field but the label
    assert normalized_key(Row("a:1", {"prompt": "hi", "response": "yo"}), chat) != \
        normalized_key(Row("a:2", {"prompt": "hi", "response": "hello"}), chat)


def test_rows_that_all_lack_a_field_name_the_fields_they_have(tmp_path: Path, tokenizer) -> None:
    """A headerless TSV read with its first row as the header: every row 'misses' the label; say what it holds."""
    path = tmp_path / "d.tsv"
    path.write_text("good film\t1\nbad film\t0\nfine\t1\n")
    with pytest.raises(TuneguardError, match=re.escape("The rows' fields are ['1', 'good film']: name them in the "
                                                       "recipe (data.text_field, data.label_field, ...), or, for a "
                                                       "CSV/TSV whose first line is data, set data.header: false")):
        build_examples(read_rows(path), cls_cfg(path), tokenizer, is_encoder=True, what="training")
