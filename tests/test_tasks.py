"""Task loaders, user YAML tasks, metrics from raw scores, and the harness (also split over 2 processes)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

from tuneguard.data.examples import ChoiceItem
from tuneguard.errors import TuneguardError
from tuneguard.eval.harness import evaluate_tasks, task_result
from tuneguard.eval.kinds import KINDS
from tuneguard.eval.records import Doc, SpecKind, Task, aggregate
from tuneguard.eval.scoring import RollingScore, Score, head_logits
from tuneguard.eval.suites import get_tasks
from tuneguard.eval.tasks import (
    DATA_DIR,
    SUITES,
    TASKS,
    classification_task_from_items,
    hellaswag_parts,
    load_task_yaml,
    vendored_rows,
    wikitext_detokenize,
)

SIZES = {"arc_easy": 500, "arc_challenge": 500, "hellaswag": 500, "piqa": 500, "winogrande": 500, "boolq": 300,
         "lambada_openai": 500, "wikitext": 26, "gsm8k": 100}


def test_every_vendored_file_loads_with_known_answers() -> None:
    docs = {name: task.docs() for name, task in TASKS.items()}
    assert {name: len(d) for name, d in docs.items()} == SIZES
    sources = {t.source for t in TASKS.values()} | {"gsm8k_train.jsonl"}  # GSM8K's few-shot examples
    assert {p.name for p in DATA_DIR.iterdir() if p.suffix in (".jsonl", ".txt")} == sources
    arc = docs["arc_easy"][0]
    assert arc.context.startswith("Question: Which statement best explains why photosynthesis")
    assert arc.context.endswith("\nAnswer:") and arc.choices[arc.gold].startswith("Sunlight is the source")
    assert docs["arc_easy"][14].choices[docs["arc_easy"][14].gold] == "elements"  # answerKey "2" among labels "1"-"4"
    assert docs["arc_challenge"][0].gold == 2  # Mercury_7175875, answer C
    hella = docs["hellaswag"][0]
    assert hella.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalized, as lm-eval
    assert hella.choices[hella.gold] == "starts pulling up roofing on a roof."
    assert docs["piqa"][0].gold == 0 and docs["piqa"][0].context.startswith("Question: How do I ready a guinea pig")
    wino = docs["winogrande"][0]
    assert wino.gold == 1 and wino.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"
    ]
    assert wino.choices == ["always got the easier cases."]
    boolq = docs["boolq"][0]
    assert boolq.choices == ["no", "yes"] and boolq.gold == 0
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert sum(d.gold for d in docs["boolq"]) > 150  # "true" labels are read as 1
    lam = docs["lambada_openai"][0]
    assert lam.choices == ["signs"] and lam.context.endswith("I don't care about")
    gsm = docs["gsm8k"][0]
    # Five shots (the train split's first five, with their worked answers), then the question.
    assert gsm.context.startswith("Question: Natalia sold clips") and gsm.context.count("\nAnswer:") == 6
    assert "#### 624\n\nQuestion: Janet’s ducks lay 16 eggs" in gsm.context and gsm.context.endswith("market?\nAnswer:")
    assert gsm.target.endswith("#### 18")
    wiki = docs["wikitext"]  # articles shortest first, so general-small's 16 are the cheapest 16
    assert [len(d.raw) for d in wiki] == sorted(len(d.raw) for d in wiki)
    assert wiki[0].raw.startswith(" = New York State Route <unk> = ") and len(wiki[0].raw.split()) == 461
    assert any(d.raw.startswith(" = Robert <unk> = ") for d in wiki)  # the split's first article, as before
    assert "@-@" not in "".join(d.text for d in wiki) and "@-@" in "".join(d.raw for d in wiki)
    assert max(len(d.raw.split()) for d in wiki[:16]) == 1554 and SUITES["general-small"]["wikitext"] == 16


def test_hellaswag_ctx_b_is_recovered_where_it_can_be() -> None:
    assert hellaswag_parts("Roof shingle removal: A man is sitting on a roof. he") == (
        "Roof shingle removal", "A man is sitting on a roof.", "he")
    assert all(hellaswag_parts(row["ctx"])[2][:1].islower() for row in vendored_rows("hellaswag.jsonl"))
    # Nothing to recover: one sentence, or a fragment that starts upper case (an empty ctx_b).
    assert hellaswag_parts("Health: How to stay fit") == ("Health", "How to stay fit", "")
    assert hellaswag_parts("Health: How to stay fit. Eat well.") == ("Health", "How to stay fit. Eat well.", "")


def test_gsm8k_scores_the_strict_and_the_flexible_answer(tokenizer) -> None:
    docs = [Doc(target="She makes 9 * 2 = $<<9*2=18>>18.\n#### 18")] * 3
    result = task_result(TASKS["gsm8k"], docs, ["So $18.\n#### 18", "She makes 9 * 2 = $18.", "#### 81"], tokenizer)
    assert result.metric == "exact_match,strict-match" and result.per_item == [1.0, 0.0, 0.0]
    # The last number, "$18.", matches once "$" and a final "." are ignored (lm-eval's regexes_to_ignore).
    assert result.metrics["exact_match,flexible-extract"] == pytest.approx(2 / 3) and result.higher_is_better


def test_wikitext_detokenizer() -> None:
    assert wikitext_detokenize("a 1 @,@ 000 @-@ year ( the \" best \" ) , ok") == 'a 1,000-year (the "best"), ok'


def test_limit_takes_the_first_items_in_order() -> None:
    task = TASKS["piqa"]
    assert task.docs(3) == task.docs()[:3]
    small = get_tasks(["general-small"])
    assert [t.name for t in small] == list(SUITES["general-small"])
    assert all(len(t.docs()) == SUITES["general-small"][t.name] for t in small)
    assert len(small[0].docs(5)) == 5 and len(small[0].docs(10_000)) == SUITES["general-small"]["arc_easy"]
    assert [t.name for t in get_tasks(["general"])] == list(TASKS)


def test_unknown_task_names_suggest_the_closest() -> None:
    with pytest.raises(TuneguardError, match="unknown task or suite 'arc_esay'; did you mean 'arc_easy'"):
        get_tasks(["arc_esay"])


def _score(logprob: float, greedy: bool = False) -> Score:
    return Score(logprob, greedy, 1)


def test_multiple_choice_metrics_from_raw_scores(tokenizer) -> None:
    task = Task("mc", "multiple_choice", list, "acc_norm")
    docs = [Doc("q", ["a", "bbbb"], gold=1), Doc("q", ["aa", "b"], gold=0), Doc("q", ["x", "y"], gold=1)]
    outcomes = [[_score(-1.0), _score(-2.0)], [_score(-3.0), _score(-2.0)], [_score(-1.0), _score(-1.0)]]
    result = task_result(task, docs, outcomes, tokenizer)
    # acc: argmax of the log-likelihoods (ties -> first option); acc_norm: divided by the option's characters.
    assert result.metrics["acc"] == pytest.approx(0.0)
    assert result.per_item == [1.0, 1.0, 0.0] and result.value == pytest.approx(2 / 3)
    assert result.metric == "acc_norm" and result.higher_is_better and result.n == 3


def test_perplexity_and_loglikelihood_metrics_from_raw_scores(tokenizer) -> None:
    docs = [Doc(text="a b", raw="a b"), Doc(text="c", raw="c")]
    outcomes = [RollingScore(6.0, 3, 3), RollingScore(2.0, 1, 1)]
    result = task_result(Task("ppl", "perplexity", list, "perplexity"), docs, outcomes, tokenizer)
    assert result.value == pytest.approx(math.exp(8 / 4)) and result.weights == [3.0, 1.0]
    assert result.metrics["word_perplexity"] == pytest.approx(math.exp(8 / 3))
    assert result.metrics["bits_per_byte"] == pytest.approx(8 / 4 / math.log(2))
    assert not result.higher_is_better and result.aggregate == "perplexity"
    lam = task_result(Task("lam", "loglikelihood", list, "acc"), [Doc("c", ["w"])] * 2,
                      [[_score(-1.0, True)], [_score(-3.0)]], tokenizer)
    assert lam.per_item == [1.0, 0.0] and lam.metrics["perplexity"] == pytest.approx(math.exp(2.0))


def test_every_kind_yields_the_metrics_it_declares(tokenizer) -> None:
    # Small outcome lists on which each declared metric has a different value.
    synthetic: dict[str, tuple[list[Doc], list[Any]]] = {
        "multiple_choice": ([Doc("q", ["a", "bbbb"], gold=1), Doc("q", ["aa", "b"], gold=0), Doc("q", ["x", "y"], gold=1)],
                            [[_score(-1.0), _score(-2.0)], [_score(-3.0), _score(-2.0)], [_score(-1.0), _score(-1.0)]]),
        # The second outcome is a classification head's predicted class.
        "classification": ([Doc("q", ["neg", "pos"], gold=1), Doc("q", ["neg", "pos"], gold=0)],
                           [[_score(-2.0), _score(-1.0)], 1]),
        "loglikelihood": ([Doc("c", ["w"])] * 2, [[_score(-1.0, True)], [_score(-3.0)]]),
        "generation": ([Doc("q", target="Paris"), Doc("q", target="two words")], ["Paris", "two"]),
        "perplexity": ([Doc(text="a b", raw="a  b"), Doc(text="c")], [RollingScore(6.0, 3, 3), RollingScore(2.0, 1, 1)]),
        # An image classifier's head predicts the class of each image.
        "image_classification": ([Doc(ref=0, gold=1), Doc(ref=1, gold=0)], [1, 1]),
    }
    # lm_eval's metrics are each lm-eval task's own (tests/test_lm_eval_bridge.py).
    assert set(KINDS) == {*get_args(SpecKind), "lm_eval", "image_classification"}
    assert {*get_args(SpecKind), "image_classification"} == set(synthetic)
    for name, (docs, outcomes) in synthetic.items():
        kind = KINDS[name]
        values = set()
        for metric in kind.metrics:
            per_item, metrics, weights, how = kind.result(Task("t", name, list, metric, labels=["neg", "pos"]),
                                                          docs, outcomes, tokenizer)
            assert set(kind.metrics) <= set(metrics), name
            # The primary metric's per-item outcomes aggregate to the value the kind reports for it.
            assert metrics[metric] == pytest.approx(aggregate(per_item, weights, how)), (name, metric)
            assert len(per_item) == len(docs)
            values.add(metrics[metric])
        assert len(values) == len(kind.metrics), name


def _check(result: Any) -> None:
    assert result.value == pytest.approx(aggregate(result.per_item, result.weights, result.aggregate))
    assert result.metrics[result.metric] == pytest.approx(result.value)
    assert len(result.per_item) == result.n and result.seconds >= 0
    json.dumps(result.to_dict())


def test_every_builtin_task_runs(tiny_llama) -> None:
    model, tok = tiny_llama
    results = evaluate_tasks(model, tok, ["general"], limit=2, batch_size=4, fingerprint="fp", adapter_id="a1")
    assert [r.task for r in results] == list(TASKS)
    for r in results:
        _check(r)
        assert r.fingerprint == "fp" and r.adapter == "a1"
        assert r.n == 2
    by = {r.task: r for r in results}
    assert set(by["arc_easy"].metrics) == {"acc", "acc_norm"}
    assert set(by["winogrande"].metrics) == set(by["boolq"].metrics) == {"acc"}
    assert by["wikitext"].metrics["tokens"] > 1000 and by["wikitext"].value > 1


class FakeAccelerator:
    """Stands in for a 2-process ``accelerate.Accelerator``; each "process" is a thread named ``rank<i>``."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world


def test_two_process_split_gives_the_single_process_numbers(tiny_llama, monkeypatch) -> None:
    model, tok = tiny_llama
    items = [ChoiceItem(tok("the movie was great")["input_ids"], [[5], [6, 7]], i % 2) for i in range(5)]
    texts = [Doc(text=" ".join(["the movie was great"] * (i + 1)), raw="x") for i in range(5)]
    tasks: list[Task | str] = ["arc_easy", "winogrande", "lambada_openai", Task("ppl", "perplexity", lambda: texts, "perplexity"),
                               classification_task_from_items("own", items, ["neg", "pos"])]
    single = evaluate_tasks(model, tok, tasks, limit=5, batch_size=2)
    barrier, store, shards = threading.Barrier(2), {}, {}

    def gather_object(obj: list[Any]) -> list[Any]:
        """accelerate's gather_object: every process gets all processes' lists, concatenated in rank order."""
        store[threading.current_thread().name] = obj
        barrier.wait()
        out = [x for rank in range(2) for x in store[f"rank{rank}"]]
        barrier.wait()
        return out

    monkeypatch.setattr("accelerate.utils.gather_object", gather_object)

    def run(rank: int) -> None:
        shards[rank] = evaluate_tasks(model, tok, tasks, limit=5, batch_size=2, accelerator=FakeAccelerator(rank, 2))

    threads = [threading.Thread(target=run, args=(rank,), name=f"rank{rank}") for rank in range(2)]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two "processes" on a shared CPU: avoid oversubscribing the cores
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        torch.set_num_threads(n_threads)
    for split in (shards[0], shards[1]):
        for a, b in zip(single, split, strict=True):
            assert (a.task, a.n, a.weights) == (b.task, b.n, b.weights)
            assert b.per_item == pytest.approx(a.per_item, rel=1e-5) and b.value == pytest.approx(a.value, rel=1e-5)


def _write(tmp_path: Path, spec: dict[str, Any], rows: list[dict[str, Any]], name: str = "task.yaml") -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / name
    path.write_text(json.dumps({"data": "data.jsonl", **spec}))  # JSON is YAML
    return path


def test_user_yaml_tasks_of_every_kind(tmp_path: Path, tiny_llama) -> None:
    model, tok = tiny_llama
    rows = [{"q": "what is two plus two ?", "options": ["four", "five"], "answer": "four", "label": "pos",
             "text": "the movie was great"},
            {"q": "the movie was", "options": ["great", "dull", "boring"], "answer": 2, "label": "neg",
             "text": "a dull , boring film"}]
    specs = {
        "mc": {"kind": "multiple_choice", "context": "Question: {q}\nAnswer:", "choices_field": "options",
               "gold_field": "answer", "metric": "acc_norm"},
        "cls": {"kind": "classification", "context": "{text}\nSentiment:", "choices": ["neg", "pos"],
                "gold_field": "label"},
        "gen": {"kind": "generation", "context": "Question: {q}\nAnswer:", "target_field": "text",
                "max_new_tokens": 4, "metric": "token_f1"},
        "ll": {"kind": "loglikelihood", "context": "{q}", "target_field": "text"},
        "ppl": {"kind": "perplexity", "text_field": "text", "metric": "bits_per_byte"},
    }
    tasks = []
    for name, spec in specs.items():
        sub = tmp_path / name
        sub.mkdir()
        tasks.append(str(_write(sub, {"name": name, **spec}, rows)))
    results = evaluate_tasks(model, tok, tasks, batch_size=2)
    by = {r.task: r for r in results}
    assert list(by) == list(specs)
    for r in results:
        _check(r)
    mc = load_task_yaml(tasks[0]).docs()
    assert [d.gold for d in mc] == [0, 2] and mc[0].context == "Question: what is two plus two ?\nAnswer:"
    assert by["cls"].metrics["labels"] == ["neg", "pos"] and len(by["cls"].metrics["confusion_matrix"]) == 2
    assert by["gen"].metric == "token_f1" and set(by["gen"].metrics) == {"exact_match", "token_f1"}
    assert by["ppl"].aggregate == "bits_per_byte" and by["ppl"].weights == [19.0, 20.0]


def test_classification_with_an_encoder_head(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_bert_dir)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["the movie was great", "a dull film", "four", "world"])]
    path = _write(tmp_path, {"name": "enc", "kind": "classification", "context": "{text}", "choices": ["neg", "pos"],
                             "gold_field": "label"}, rows)
    result = evaluate_tasks(model, tok, [str(path)], batch_size=2)[0]
    preds = head_logits(model, tok, [r["text"] for r in rows]).argmax(-1).tolist()
    assert result.per_item == [float(p == r["label"]) for p, r in zip(preds, rows, strict=True)]


def test_recipe_items_are_scored_by_verbalizer(tiny_llama) -> None:
    model, tok = tiny_llama
    verbalizers = ["negative", "positive"]
    items = [
        ChoiceItem(tok(text + "\n")["input_ids"], [tok(v)["input_ids"] for v in verbalizers], gold, f"f:{i}")
        for i, (text, gold) in enumerate([("the movie was great", 1), ("a dull , boring film", 0)])
    ]
    result = evaluate_tasks(model, tok, [classification_task_from_items("own", items, verbalizers)])[0]
    _check(result)
    assert result.metrics["labels"] == verbalizers and "f1_macro" in result.metrics
    with torch.no_grad():
        expected = []
        for it in items:
            lls = []
            for choice in it.choices:
                logp = torch.log_softmax(model(torch.tensor([it.context_ids + choice])).logits[0].double(), -1)
                lls.append(sum(float(logp[len(it.context_ids) - 1 + t, c]) for t, c in enumerate(choice)))
            expected.append(float(max(range(2), key=lambda i, lls=lls: lls[i]) == it.gold))
    assert result.per_item == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "t", "kind": "multiple_choice", "choices": ["a"], "gold_field": "g", "promt": "x"},
         "unknown key 'promt'"),
        ({"kind": "generation", "target_field": "a"}, "missing required key 'name'"),
        ({"name": "t", "kind": "generation"}, "'target_field' is required"),
        ({"name": "t", "kind": "multiple_choice", "gold_field": "g"}, "exactly one of 'choices' and 'choices_field'"),
        ({"name": "t", "kind": "ranking"}, "'kind'"),
        ({"name": "t", "kind": "perplexity", "metric": "acc"}, "'metric' must be one of perplexity"),
        ({"name": "t", "kind": "generation", "target_field": "a", "max_new_tokens": 0}, "'max_new_tokens'"),
        ({"name": "t", "kind": "multiple_choice", "choices": ["a"], "gold_field": "g"}, "at least two options"),
        ({"name": "t", "kind": "classification", "choices": [True, False], "gold_field": "g"},
         r"as booleans; quote them \("),
    ],
)
def test_bad_task_yaml_names_the_file_and_key(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    path = _write(tmp_path, spec, [{"a": 1}])
    with pytest.raises(TuneguardError, match=message) as err:
        load_task_yaml(path)
    assert str(path) in str(err.value)


def test_bad_task_data_names_the_row(tmp_path: Path) -> None:
    spec = {"name": "t", "kind": "multiple_choice", "choices": ["a", "b"], "gold_field": "g", "context": "{q}"}
    with pytest.raises(TuneguardError, match=r"data.jsonl:2: 'g' value 'c' is neither one of the options"):
        load_task_yaml(_write(tmp_path, spec, [{"q": "x", "g": "a"}, {"q": "y", "g": "c"}])).docs()
    with pytest.raises(TuneguardError, match=r"data.jsonl:1: 'context' uses field 'q'"):
        load_task_yaml(_write(tmp_path, spec, [{"g": 1}])).docs()
    with pytest.raises(TuneguardError, match=r"data.jsonl:1: 'g' index 5 is out of range"):
        load_task_yaml(_write(tmp_path, spec, [{"q": "x", "g": 5}])).docs()
    own = {"name": "t", "kind": "multiple_choice", "choices_field": "o", "gold_field": "g"}
    with pytest.raises(TuneguardError, match=r"data.jsonl:1: 'o' must be a list of at least two options"):
        load_task_yaml(_write(tmp_path, own, [{"o": ["only"], "g": 0}])).docs()  # one option is always right
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(TuneguardError, match=r"bad.yaml:\d+:\d+: malformed YAML"):
        load_task_yaml(tmp_path / "bad.yaml")
    (tmp_path / "nodata.yaml").write_text("name: t\nkind: perplexity\ndata: missing.jsonl\n")
    with pytest.raises(TuneguardError, match=r"nodata.yaml: 'data': file not found: missing.jsonl"):
        load_task_yaml(tmp_path / "nodata.yaml")
