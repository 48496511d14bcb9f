"""Text augmentation: what each operation changes and keeps, seeded copies, training rows only, labels kept, the
schema's refusals and ``tuneguard data preview``."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tuneguard.cli import main
from tuneguard.data.augment import OPERATIONS, augmented_copies, synonyms
from tuneguard.data.prepare import prepare_data
from tuneguard.data.preview import augmentation_preview
from tuneguard.errors import TuneguardError
from tuneguard.recipe import AUGMENT_OPS, DataConfig, load_recipe

SENTENCE = ["The", "movie", "was", "wonderful,", "and", "the", "story", "was", "great", "fun!"]
REVIEWS = ["the movie was wonderful and the story was great fun", "a dull story and a boring film",
           "the acting was wonderful", "the plot of this movie was bad", "what a great film", "nothing here works"]


def is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(word in rest for word in short)


def one_typo(new: str, old: str) -> bool:
    """``new`` is ``old`` with two adjacent letters swapped, one letter dropped or one letter doubled."""
    swaps = {old[:i] + old[i + 1] + old[i] + old[i + 2:] for i in range(len(old) - 1)}
    drops = {old[:i] + old[i + 1:] for i in range(len(old))}
    doubles = {old[: i + 1] + old[i:] for i in range(len(old))}
    return new != old and new in swaps | drops | doubles


def write_recipe(tmp_path: Path, model: str = "/no/such/model", rows: list | None = None, **data) -> Path:
    rows = rows if rows is not None else [{"text": REVIEWS[i % 6], "label": int(i % 6 < 3)} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": f"validation review {w} movie story wonderful",
                                                            "label": i % 2}) + "\n"
                                                for i, w in enumerate(["one", "two", "three", "four"])))
    spec = {"model": {"source": model},
            "data": {"kind": "classification", "train": "train.jsonl", "validation": "val.jsonl",
                     "labels": ["negative", "positive"], "prompt_template": "Review: {text}\nSentiment:",
                     "use_chat_template": False, "allow_overlap": True, "max_length": 64, **data}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_recipe_operation_has_one_function() -> None:
    assert set(OPERATIONS) == set(AUGMENT_OPS)


def core(token: str) -> tuple[str, str]:
    """The word and its trailing punctuation (the sample sentence has no leading punctuation)."""
    word = token.rstrip(",!")
    return word, token[len(word):]


def test_synonym_replacement_swaps_listed_words_for_their_synonyms_only() -> None:
    for seed in range(20):
        out = OPERATIONS["synonym"](SENTENCE, 0.3, random.Random(seed))  # n = int(0.3 * 10) = 3 of 5 listed words
        changed = [(old, new) for old, new in zip(SENTENCE, out, strict=True) if old != new]
        assert len(out) == len(SENTENCE) and len(changed) == 3
        for old, new in changed:
            (old_word, old_tail), (new_word, new_tail) = core(old), core(new)
            assert new_word in synonyms()[old_word.lower()] and new_tail == old_tail
    assert OPERATIONS["synonym"](["xyzzy", "plugh"], 0.5, random.Random(0)) == ["xyzzy", "plugh"]
    assert OPERATIONS["synonym"](["Movie"], 1.0, random.Random(0))[0] in {"Film", "Picture"}  # a capital stays


def test_random_insertion_adds_synonyms_of_the_texts_own_words() -> None:
    offered = {s for w in SENTENCE for s in synonyms().get(core(w)[0].lower(), ())}
    for seed in range(20):
        out = OPERATIONS["insert"](SENTENCE, 0.2, random.Random(seed))  # n = 2
        inserted = list((Counter(out) - Counter(SENTENCE)).elements())
        assert len(out) == len(SENTENCE) + 2 and is_subsequence(SENTENCE, out)
        assert len(inserted) == 2 and set(inserted) <= offered
    assert OPERATIONS["insert"](["xyzzy", "plugh"], 0.5, random.Random(0)) == ["xyzzy", "plugh"]


def test_random_swap_moves_words_and_keeps_them_all() -> None:
    for seed in range(20):
        out = OPERATIONS["swap"](SENTENCE, 0.1, random.Random(seed))  # n = 1: one pair
        assert Counter(out) == Counter(SENTENCE)
        assert sum(a != b for a, b in zip(out, SENTENCE, strict=True)) in (0, 2)  # 0: two equal words ("was")
    assert OPERATIONS["swap"](["alone"], 0.5, random.Random(0)) == ["alone"]


def test_random_deletion_drops_each_word_with_alpha_and_keeps_order() -> None:
    kept = []
    for seed in range(200):
        out = OPERATIONS["delete"](SENTENCE, 0.3, random.Random(seed))
        assert out and is_subsequence(out, SENTENCE)
        kept.append(len(out) / len(SENTENCE))
    assert 0.65 < sum(kept) / len(kept) < 0.75
    everything = OPERATIONS["delete"](SENTENCE, 1.0, random.Random(0))
    assert len(everything) == 1 and everything[0] in SENTENCE  # never an empty text
    assert OPERATIONS["delete"](["alone"], 1.0, random.Random(0)) == ["alone"]


def test_char_noise_puts_one_typo_in_n_longer_words() -> None:
    for seed in range(20):
        out = OPERATIONS["char_noise"](SENTENCE, 0.3, random.Random(seed))  # n = 3
        changed = [(old, new) for old, new in zip(SENTENCE, out, strict=True) if old != new]
        assert len(out) == len(SENTENCE) and len(changed) == 3
        for old, new in changed:
            (old_word, old_tail), (new_word, new_tail) = core(old), core(new)
            assert one_typo(new_word, old_word) and new_tail == old_tail
    assert OPERATIONS["char_noise"](["a", "is", "an"], 1.0, random.Random(0)) == ["a", "is", "an"]


def test_copies_are_reproducible_under_a_seed_and_change_with_it() -> None:
    cfg = DataConfig(train="x", labels=["n", "p"], augment=list(AUGMENT_OPS), augment_prob=0.2, augment_copies=3)
    fields = {"text": REVIEWS[0], "label": 1, "id": 7}
    first = augmented_copies(fields, cfg, seed=1, index=0)
    assert first == augmented_copies(fields, cfg, seed=1, index=0)
    assert len(first) == 3 and all(c.fields["label"] == 1 and c.fields["id"] == 7 for c in first)
    assert all(c.op in AUGMENT_OPS and c.fields["text"] != fields["text"] for c in first)
    others = [augmented_copies(fields, cfg, seed=s, index=0) for s in range(2, 6)]
    assert any(o != first for o in others)
    assert augmented_copies({"label": 1}, cfg, seed=1, index=0) == []  # no text: no copies
    assert augmented_copies(fields, DataConfig(train="x", labels=["n", "p"]), seed=1, index=0) == []


def test_prepared_training_data_is_byte_identical_under_a_seed(tmp_path: Path, tokenizer) -> None:
    cfg = load_recipe(write_recipe(tmp_path, augment=["synonym", "swap", "char_noise"], augment_copies=2)).data
    a, b = (prepare_data(cfg, tokenizer, is_encoder=False, seed=3) for _ in range(2))
    assert [(r.input_ids, r.labels) for r in a.train] == [(r.input_ids, r.labels) for r in b.train]
    other = prepare_data(cfg, tokenizer, is_encoder=False, seed=4)
    assert sorted(r.input_ids for r in a.train) != sorted(r.input_ids for r in other.train)


def test_validation_rows_are_never_augmented_and_labels_stay(tmp_path: Path, tokenizer) -> None:
    path = write_recipe(tmp_path)
    plain = prepare_data(load_recipe(path).data, tokenizer, is_encoder=True, seed=0)
    cfg = load_recipe(path, ["data.augment=[synonym,insert,swap,delete,char_noise]", "data.augment_copies=2",
                             "data.augment_prob=0.3"]).data
    aug = prepare_data(cfg, tokenizer, is_encoder=True, seed=0)
    assert [(e.input_ids, e.label) for e in aug.val] == [(e.input_ids, e.label) for e in plain.val]
    assert [(i.context_ids, i.gold, i.prompt) for i in aug.val_items] == [
        (i.context_ids, i.gold, i.prompt) for i in plain.val_items]
    assert not any(e.augmented for e in aug.val)
    assert aug.stats["val_rows"] == 4 and aug.stats["train_rows"] == 24
    assert aug.stats["augmented_examples"] == 48 and plain.stats["augmented_examples"] == 0
    # Every copy keeps its row's label: two copies per row, so twice the originals' count per class.
    originals = Counter(e.label for e in aug.train if not e.augmented)
    assert originals == Counter(e.label for e in plain.train) == Counter({0: 12, 1: 12})
    assert Counter(e.label for e in aug.train if e.augmented) == Counter({0: 24, 1: 24})
    # The originals train unchanged beside their copies.
    assert sorted(e.input_ids for e in aug.train if not e.augmented) == sorted(e.input_ids for e in plain.train)


def test_bad_rows_get_no_copies_and_are_counted_once(tmp_path: Path, tokenizer) -> None:
    rows = [{"text": REVIEWS[i % 6], "label": i % 2} for i in range(9)] + [{"text": "a fine film", "label": "maybe"}]
    cfg = load_recipe(write_recipe(tmp_path, rows=rows, augment="swap", augment_copies=3,
                                   max_bad_fraction=0.2)).data
    prepared = prepare_data(cfg, tokenizer, is_encoder=True, seed=0)
    assert prepared.stats["bad_train_rows"] == 1 and prepared.stats["augmented_examples"] == 27


@pytest.mark.parametrize(("override", "expected"), [
    ("data.augment=synonyms", "'data.augment': unknown operation 'synonyms'; did you mean 'synonym'?"),
    ("data.augment=[swap,none]", "'data.augment': unknown operation 'none'; choose 'none' alone"),
    ("data.augment_prob=0", "'data.augment_prob': Input should be greater than 0"),
    ("data.augment_prob=1.5", "'data.augment_prob': Input should be less than or equal to 1"),
    ("data.augment_copies=0", "'data.augment_copies': Input should be greater than or equal to 1"),
    ("data.augment_copies=33", "'data.augment_copies': Input should be less than or equal to 32"),
])
def test_schema_refuses_unknown_operations_and_bad_values(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(TuneguardError) as err:
        load_recipe(write_recipe(tmp_path), [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_schema_takes_one_operation_a_list_or_the_old_names(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    assert load_recipe(path).data.augment_ops == []
    assert load_recipe(path, ["data.augment=swap"]).data.augment_ops == ["swap"]
    assert load_recipe(path, ["data.augment=word_dropout"]).data.augment_ops == ["delete"]
    assert load_recipe(path, ["data.augment=[synonym,char_noise]"]).data.augment_ops == ["synonym", "char_noise"]


def test_preview_shows_the_copies_training_uses_without_loading_a_model(
    tmp_path: Path, tokenizer, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per cell: the rows can be found in the output
    path = write_recipe(tmp_path, augment=["synonym", "char_noise"], augment_copies=2, max_length=256)
    # model.source names no model: the preview reads the recipe and the data, nothing else.
    assert main(["data", "preview", str(path), "--n", "3", "data.augment_prob=0.3", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    cfg = load_recipe(path, ["data.augment_prob=0.3"]).data
    rows = augmentation_preview(cfg, seed=5, n=3)
    assert [Path(r.where).name for r in rows] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
    assert [r.answer for r in rows] == ["positive"] * 3
    for row in rows:
        assert len(row.copies) == 2 and f"train.jsonl:{rows.index(row) + 1}" in out
        for line in [*row.original.splitlines(), *(t for _, text in row.copies for t in text.splitlines())]:
            assert line in out
        assert all(op in out for op, _ in row.copies)
    # What the preview shows is what a run with that seed trains on.
    trained = {tokenizer.decode(e.input_ids) for e in prepare_data(cfg, tokenizer, is_encoder=True, seed=5).train
               if e.augmented}
    assert {text for r in rows for _, text in r.copies} <= trained


def test_preview_errors_are_one_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_recipe(tmp_path)
    assert main(["data", "preview", str(path)]) == 2
    assert "tuneguard: error: data.augment is 'none'" in capsys.readouterr().err
    assert main(["data", "preview", str(path), "data.augment=[synonym,typo]"]) == 2
    assert "'data.augment': unknown operation 'typo'" in capsys.readouterr().err
    assert main(["data", "preview", str(path), "data.augment=swap", "data.text_field=body"]) == 2
    err = capsys.readouterr().err  # the template reads {text}: augmenting 'body' would copy rows unchanged
    assert "data.augment edits data.text_field ('body'), which the rows' prompt ('Review: {text}" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["data", "preview", str(path), "data.augment=swap", "data.text_field=body",
                 "data.prompt_template='Review: {body}'"]) == 2
    assert "data.text_field: no usable training row has text in the field 'body'" in capsys.readouterr().err
    out = tmp_path / "grid.png"  # a text recipe prints its copies: the image flags are refused, not ignored
    assert main(["data", "preview", str(path), "data.augment=swap", "--out", str(out), "--epochs", "3"]) == 2
    assert "--out, --epochs: for image recipes (a PNG grid)" in capsys.readouterr().err and not out.exists()


def test_a_copy_that_cannot_be_built_is_dropped_and_its_row_still_trains(tmp_path: Path, tokenizer) -> None:
    """An insert that pushes a prompt past data.max_length made the whole row bad (failing the run), while with
    data.max_bad_fraction its original still trained: now the copy alone is dropped, and counted."""
    rows = [{"prompt": "the story of a wonderful movie with great acting and a fine plot", "response": "four"}]
    spec = {"kind": "instruction", "validation": None, "val_fraction": 0.0, "prompt_template": "Q: {prompt}",
            "text_field": "prompt", "use_chat_template": False}
    plain = prepare_data(load_recipe(write_recipe(tmp_path, rows=rows, **spec)).data, tokenizer, is_encoder=False,
                         seed=0, packable=False)
    fits = len(plain.train[0].input_ids)
    cfg = load_recipe(write_recipe(tmp_path, rows=rows, augment="insert", augment_prob=1.0, max_length=fits,
                                   **spec)).data
    prepared = prepare_data(cfg, tokenizer, is_encoder=False, seed=0, packable=False)
    assert prepared.stats["bad_train_rows"] == 0 and prepared.stats["augmented_dropped"] == 1
    assert [r.input_ids for r in prepared.train] == [r.input_ids for r in plain.train]


def test_a_copy_keeps_its_rows_lines() -> None:
    """Copies were joined with single spaces: a multi-line prompt (a question, then its options) became one line."""
    from tuneguard.data.augment import augmented_copies, rejoin

    text = "Which film was better?\nA: the first one\nB: the second one"
    cfg = DataConfig(train="x", labels=["a", "b"], augment=["synonym", "swap", "delete"], augment_copies=8,
                     augment_prob=0.3)
    for copy in augmented_copies({"text": text, "label": 0}, cfg, seed=1, index=0):
        assert copy.fields["text"].count("\n") == 2 and copy.fields["text"].split() != []
    assert rejoin("a b\nc", ["a", "x", "b", "c"]) == "a x\nb c"  # an inserted word moves the rest along
    assert rejoin("one  two\tthree", ["three", "two", "one"]) == "three two one"
