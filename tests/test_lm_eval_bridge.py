"""lm-evaluation-harness through tuneguard's engine: request types, per-item agreement with lm-eval's HF
model, suites in recipes, the offline and missing-extra errors, and a score cache that keeps adapters apart."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from tuneguard.errors import TuneguardError  # noqa: E402
from tuneguard.eval.cache import ScoreCache  # noqa: E402
from tuneguard.eval.harness import evaluate_tasks  # noqa: E402
from tuneguard.eval.lm_eval_bridge import TuneguardLM, load_lm_eval, shots_from_scored_split  # noqa: E402
from tuneguard.eval.suites import get_tasks  # noqa: E402
from tuneguard.lm_eval_model import TuneguardCommandLineLM  # noqa: E402, F401  (registers --model tuneguard)
from tuneguard.recipe import LmEvalConfig  # noqa: E402

QUESTIONS = [
    ("what is two plus two ?", ["four", "five", "the movie", "boring"], 0),
    ("the movie was", ["great", "dull", "science", "sports"], 1),
    ("a dull , boring", ["film", "answer", "world", "choice"], 0),
    ("question answer context", ["choice", "because", "therefore", "positive"], 2),
    ("positive negative world", ["sports", "business", "science", "technology"], 3),
    ("the acting was", ["wonderful", "boring", "four", "context"], 1),
]


def write_tasks(folder: Path) -> dict[str, Path]:
    """Local-data lm-eval tasks of each output type, data paths relative to the YAML (resolved by tuneguard)."""
    rows = [{"question": q, "choices": c, "label": g, "text": f"{q} {c[g]} " * 3} for q, c, g in QUESTIONS]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\ntest_split: test\n"
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
              "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
              "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
              "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        "ll": "output_type: loglikelihood\ndoc_to_text: '{{question}}'\ndoc_to_target: \"{{' ' + choices[label]}}\"\n"
              "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
              "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n",
        "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                   "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "gen": "output_type: generate_until\ndoc_to_text: 'Question: {{question}}\\nAnswer:'\n"
               "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['\\n', '?']\n  do_sample: false\n"
               "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
               "    higher_is_better: true\n",
    }
    paths = {}
    for name, body in specs.items():
        paths[name] = folder / f"tg_{name}.yaml"
        paths[name].write_text(f"task: tg_{name}\n{common}{body}")
    return paths


@pytest.fixture()
def local_tasks(tmp_path: Path) -> dict[str, Path]:
    return write_tasks(tmp_path)


def _logprob(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The direct computation: one full forward pass, log-softmax over the whole vocabulary."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_requests_answered_as_direct_computation(tiny_llama) -> None:
    model, tok = tiny_llama
    lm = TuneguardLM(model, tok, batch_size=3)
    pairs = [("the movie was", " great"), ("the movie was", " dull"), ("", "what is two plus two"),
             ("question answer ", "context")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (logprob, greedy) in zip(pairs, got, strict=True):
        c_ids, t_ids = lm._encode(ctx, cont)
        want = _logprob(model, c_ids, t_ids)
        assert logprob == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    # An empty context starts from the prefix token.
    assert lm._encode("", "the movie")[0] == [tok.bos_token_id]

    text = "the movie was great and the acting was wonderful " * 4
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert rolling == pytest.approx(_logprob(model, [tok.bos_token_id], ids)[0], abs=1e-3)

    (generated,) = lm.generate_until([Instance("generate_until", {}, ("the movie was", {"until": ["wonderful"],
                                                                                       "max_gen_toks": 6}), 0)])
    ctx = tok("the movie was", add_special_tokens=False)["input_ids"]
    direct = model.generate(torch.tensor([ctx]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.decode(direct[0, len(ctx):], skip_special_tokens=True).split("wonderful")[0]
    assert generated == want


def test_sampling_and_lm_eval_cache_are_refused(tiny_llama) -> None:
    model, tok = tiny_llama
    lm = TuneguardLM(model, tok)
    with pytest.raises(TuneguardError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True, "temperature": 1.0}), 0)])
    from lm_eval.api.model import CachingLM

    with pytest.raises(TuneguardError, match="use_cache.*another adapter"):
        CachingLM(lm, str(Path(os.environ["TUNEGUARD_HOME"]) / "lm-eval-cache.db"))


def _samples(result: dict, name: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in result["samples"][name]}


def test_same_per_item_results_as_lm_evals_hf_model(tiny_llama_dir: Path, tiny_llama,
                                                   local_tasks: dict[str, Path]) -> None:
    """simple_evaluate with lm-eval's HF model and with tuneguard's: the same per-document outcomes (fp32)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(next(iter(local_tasks.values())).parent), include_defaults=False)
    names = [f"tg_{k}" for k in local_tasks]
    common = {"tasks": names, "task_manager": manager, "log_samples": True, "bootstrap_iters": 0}
    cwd = os.getcwd()
    os.chdir(next(iter(local_tasks.values())).parent)  # lm-eval itself reads data_files relative to the cwd
    try:
        # A loaded model, not a path: given a path, HFLM starts Accelerate for the whole process.
        model, tok = tiny_llama
        hf = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=2), **common)
        ours = lm_eval.simple_evaluate(model="tuneguard", model_args=f"pretrained={tiny_llama_dir},dtype=float32",
                                       batch_size=3,
                                       **common)
    finally:
        os.chdir(cwd)
    for name in names:
        a, b = _samples(hf, name), _samples(ours, name)
        assert a.keys() == b.keys() == set(range(len(QUESTIONS)))
        for doc_id, sample in a.items():
            for metric in sample["metrics"]:
                x, y = sample[metric], b[doc_id][metric]
                if isinstance(x, tuple):  # (loglikelihood, words or bytes)
                    assert y[0] == pytest.approx(x[0], abs=1e-3) and y[1] == x[1]
                elif isinstance(x, float) and metric == "perplexity":
                    assert y == pytest.approx(x, abs=1e-3)
                else:
                    assert y == x, (name, doc_id, metric)


def test_lm_eval_suite_paired_with_native_tasks(tiny_llama, local_tasks: dict[str, Path], tmp_path: Path) -> None:
    """An lm-eval task through tuneguard's harness: per-item outcomes equal lm-eval's own per-document values."""
    model, tok = tiny_llama
    tasks = get_tasks([f"lm_eval:{local_tasks['mc']}", f"lm_eval:{local_tasks['rolling']}", "piqa"])
    assert [t.name for t in tasks] == ["lm_eval:tg_mc", "lm_eval:tg_rolling", "piqa"]
    results = evaluate_tasks(model, tok, tasks, limit=5)
    mc, rolling, piqa = results
    assert mc.metric == "acc" and mc.n == 5 and len(mc.per_item) == 5 and set(mc.per_item) <= {0.0, 1.0}
    assert mc.setup.startswith(f"lm-eval {lm_eval.__version__} · 0-shot · chat template")  # the tiny tokenizer has one
    assert rolling.metric == "word_perplexity" and not rolling.higher_is_better and rolling.aggregate == "perplexity"
    assert rolling.value == pytest.approx(rolling.metrics["word_perplexity"])
    assert piqa.setup == ""
    plain = evaluate_tasks(model, tok, get_tasks([f"lm_eval:{local_tasks['mc']}"],
                                                 LmEvalConfig(apply_chat_template=False, num_fewshot=2)), limit=5)[0]
    assert plain.setup == f"lm-eval {lm_eval.__version__} · 2-shot from the scored split"  # the YAML has one split
    assert plain.item_hashes == mc.item_hashes  # the same documents, prompted differently


def test_hub_task_offline_is_one_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tuneguard.cli", "eval", "--model", str(tiny_llama_dir), "--tasks",
                           "lm_eval:arc_easy", "--limit", "2"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneguard: error: lm_eval:arc_easy: allenai/ai2_arc lives on the Hugging Face Hub")
    assert "arc_easy.yaml" in last and "dataset_path: json" in last


def test_unknown_lm_eval_task_is_one_line() -> None:
    with pytest.raises(TuneguardError, match="lm_eval:arc_eassy: not a task.*did you mean 'lm_eval:arc_easy'"):
        get_tasks(["lm_eval:arc_eassy"])


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from tuneguard.recipe import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(TuneguardError, match=r"needs lm-evaluation-harness.*pip install 'tuneguard\[lm-eval\]'"):
        get_tasks(["lm_eval:arc_easy"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: x}\ndata: {train: t.jsonl}\neval: {suites: ['lm_eval:arc_easy']}\n")
    with pytest.raises(TuneguardError, match=r"eval.suites.*'lm_eval:arc_easy' needs lm-evaluation-harness"):
        load_recipe(recipe)


def test_cache_keeps_adapters_and_states_apart(tiny_llama, local_tasks: dict[str, Path], tmp_path: Path) -> None:
    """Two adapters on one backbone, each on and off: four entries, and each cached result is that model's own."""
    model, tok = tiny_llama
    tasks = get_tasks(["arc_easy", f"lm_eval:{local_tasks['mc']}"])
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "scores"
    fresh: dict[tuple[str, bool], list] = {}
    for seed, adapter in ((0, "adapter-a"), (1, "adapter-b")):
        torch.manual_seed(seed)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.5)
        cache = ScoreCache(folder, "backbone", adapter)
        for on in (True, False):
            with peft.disable_adapter() if not on else contextlib.nullcontext():
                results = evaluate_tasks(peft, tok, tasks, limit=4, cache=cache, adapter_id=adapter if on else None)
                again = evaluate_tasks(peft, tok, tasks, limit=4, cache=cache, adapter_id=adapter if on else None)
            assert [r.per_item for r in again] == [r.per_item for r in results]
            fresh[adapter, on] = [r.to_dict() for r in results]
    assert len(list(folder.glob("*.json"))) == 2 * 2 * len(tasks)
    assert fresh["adapter-a", True] != fresh["adapter-b", True]
    assert [r["per_item"] for r in fresh["adapter-a", False]] == [r["per_item"] for r in fresh["adapter-b", False]]
    # The same adapter name with other weights is another key only if its hash differs: the hash is the identity.
    other = ScoreCache(folder, "other-backbone", "adapter-a")
    assert other.key(peft, tasks[0], tasks[0].docs(4), True) != cache.key(peft, tasks[0], tasks[0].docs(4), True)


def test_recipe_mixing_native_and_lm_eval_suites(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A run whose eval.suites mixes a native task and an lm-eval YAML: both paired base vs tuned in the report."""
    from tuneguard.run import evaluate

    from .test_evaluation import trained

    yaml_path = write_tasks(tmp_path)["mc"]
    path, recipe, result = trained(tmp_path, tiny_llama_dir, train={"max_steps": 10},
                                   eval={"task": False, "suites": ["arc_easy", f"lm_eval:{yaml_path}"], "limit": 5,
                                         "lm_eval": {"num_fewshot": 1, "apply_chat_template": False}})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [c["task"] for c in report["general"]] == ["arc_easy", "lm_eval:tg_mc"]
    lm = report["general"][1]
    assert lm["metric"] == "acc" and lm["n"] == 5 and lm["test"] == "mcnemar"
    assert report["setups"] == {"lm_eval:tg_mc": f"lm-eval {lm_eval.__version__} · 1-shot from the scored split"}
    assert "How lm-eval tasks were run" in (run_dir / "report.md").read_text()


def test_lm_eval_command_line_scores_a_run_with_adapter_on_and_off(tmp_path: Path, tiny_llama_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """``tuneguard lm-eval --model tuneguard --model_args run=RUN,adapter=on|off``: the run's adapter on or off,
    giving exactly the per-item outcomes tuneguard's own evaluation of that run gives for tuned and base."""
    from tuneguard.cli import main as cli_main
    from tuneguard.run import evaluate

    from .test_evaluation import trained

    yaml_path = write_tasks(tmp_path)["mc"]
    path, recipe, result = trained(tmp_path, tiny_llama_dir, train={"max_steps": 10, "lr": 1e-2},
                                   eval={"task": False, "suites": [f"lm_eval:{yaml_path}"],
                                         "lm_eval": {"apply_chat_template": False}})
    run_dir = recipe.run_dir(path)
    assert evaluate(recipe, run_dir, result) == 0
    ours = json.loads((run_dir / "eval.json").read_text())
    monkeypatch.chdir(tmp_path)  # lm-eval reads a YAML's relative data_files from the working directory
    for side, state in (("tuned", "on"), ("base", "off")):
        out = lm_eval.simple_evaluate(model="tuneguard", model_args=f"run={run_dir},adapter={state}",
                                      tasks=[str(yaml_path)], log_samples=True, bootstrap_iters=0)
        samples = sorted(out["samples"]["tg_mc"], key=lambda s: s["doc_id"])
        assert [float(s["acc"]) for s in samples] == ours[side][0]["per_item"], side
    code = cli_main(["lm-eval", "--model", "tuneguard", "--model_args", f"run={run_dir},adapter=off", "--tasks",
                     str(yaml_path), "--output_path", str(tmp_path / "lm-eval-out")])
    assert code == 0 and list((tmp_path / "lm-eval-out").rglob("results_*.json"))
    capsys.readouterr()
    for model_args, problem in ((f"run={run_dir},adaptor=off", "--model_args: unknown adaptor; tuneguard's model takes"),
                                (f"run={run_dir},adapter=of", "--model_args adapter=of: give on or off")):
        # a misspelt switch scored the adapter (or the base) with no word said
        assert cli_main(["lm-eval", "--model", "tuneguard", "--model_args", model_args, "--tasks", str(yaml_path)]) == 2
        assert problem in capsys.readouterr().err


def test_shots_from_the_scored_split_are_named(tmp_path: Path) -> None:
    """lm-eval falls back to the scored split for few-shot examples when a task has nothing else to draw from."""
    shots = LmEvalConfig(num_fewshot=2)
    arc = load_lm_eval("lm_eval:arc_easy@vendored", shots)  # only the scored items are vendored
    gsm8k = load_lm_eval("lm_eval:gsm8k@vendored", shots)  # its shots come from the vendored train rows
    assert [shots_from_scored_split(t) for t in (*arc.values(), *gsm8k.values())] == [True, False]
    yaml_path = write_tasks(tmp_path)["mc"]
    yaml_path.write_text(yaml_path.read_text().replace("    test: data.jsonl\n", "    test: data.jsonl\n    train: data.jsonl\n")
                         + "training_split: train\n")
    with_train = load_lm_eval(f"lm_eval:{yaml_path}", shots)
    assert [shots_from_scored_split(t) for t in with_train.values()] == [False]


def test_an_item_is_never_its_own_shot_when_shots_come_from_the_scored_split() -> None:
    """lm-eval leaves the scored item out of its shots only when the few-shot split is named; tuneguard names the
    split lm-eval falls back to, so no vendored ARC item is prompted with its own question and answer."""
    (task,) = load_lm_eval("lm_eval:arc_easy@vendored", LmEvalConfig(num_fewshot=5)).values()
    docs = list(task.eval_docs)
    repeated = [i for i, doc in enumerate(docs) if task.fewshot_context(doc, 5).count(task.doc_to_text(doc)) > 1]
    assert len(docs) >= 100 and repeated == []


def test_vendored_lm_eval_task_runs_offline_and_agrees_with_the_native_one(tiny_llama) -> None:
    model, tok = tiny_llama
    plain = LmEvalConfig(apply_chat_template=False)
    vendored, native = evaluate_tasks(model, tok, get_tasks(["lm_eval:arc_easy@vendored", "arc_easy"], plain), limit=12)
    assert vendored.task == "lm_eval:arc_easy@vendored" and vendored.n == native.n == 12
    assert vendored.metrics["acc"] == native.metrics["acc"] and vendored.metrics["acc_norm"] == native.metrics["acc_norm"]
    with pytest.raises(TuneguardError, match="lm_eval:mmlu@vendored: tuneguard vendors data for arc_easy"):
        get_tasks(["lm_eval:mmlu@vendored"])


def test_base_and_tuned_are_shown_the_same_shots(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's shot sampler keeps one generator across items; the same task object scores the base and then the
    tuned model, which must see the same prompts for the comparison to be paired."""
    model, tokenizer = tiny_llama
    seen: list[list[str]] = []

    def record(self: TuneguardLM, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        seen.append([r.args[0] for r in requests])
        return [(-1.0, False)] * len(requests)

    monkeypatch.setattr(TuneguardLM, "loglikelihood", record)
    (task,) = get_tasks(["lm_eval:arc_easy@vendored"], LmEvalConfig(num_fewshot=3, apply_chat_template=False))
    docs = task.docs(4)
    task.external.score(model, tokenizer, docs, 8)
    task.external.score(model, tokenizer, docs, 8)
    assert seen[0] == seen[1] and seen[0][0].count("Answer:") == 4  # three shots and the item


def test_a_template_without_a_system_role_drops_the_system_turn(tiny_llama) -> None:
    """As lm-eval's HF model: a task description or system instruction is dropped where the template refuses it."""
    model, tokenizer = tiny_llama
    tokenizer = copy.deepcopy(tokenizer)  # the fixture's is shared by the session
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    lm = TuneguardLM(model, tokenizer, adapter=False, batch_size=2)
    text = lm.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant:"


def test_whitespace_context_and_empty_continuation(tiny_llama) -> None:
    """A context of only whitespace is an empty one (the whitespace goes to the continuation, scored from the
    prefix token); an empty continuation is one line naming the problem, not a bare ValueError."""
    model, tokenizer = tiny_llama
    lm = TuneguardLM(model, tokenizer, adapter=False, batch_size=2)
    (ws, _), (empty, _) = lm.loglikelihood([Instance("loglikelihood", {}, ("\n", "the movie"), 0),
                                            Instance("loglikelihood", {}, ("", "\nthe movie"), 1)])
    assert ws == pytest.approx(empty)
    with pytest.raises(TuneguardError, match="empty continuation after 'the movie'"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("the movie", ""), 0)])


def test_an_lm_eval_task_is_scored_whole_by_the_first_process() -> None:
    """lm-eval's shot sampler moves on with each document, so a share of the items would get other shots than a
    single process gives them: such a task is not dealt out, native ones are."""
    from tuneguard.eval.harness import share
    from tuneguard.eval.kinds import KINDS

    assert [share(KINDS["lm_eval"], 5, rank, 2) for rank in (0, 1)] == [[0, 1, 2, 3, 4], []]
    assert [share(KINDS["multiple_choice"], 5, rank, 2) for rank in (0, 1)] == [[0, 2, 4], [1, 3]]


def test_lm_evals_own_command_line_gets_advice_that_works_there(capsys: pytest.CaptureFixture) -> None:
    """@vendored names are tuneguard's; offline, lm-eval's command line takes a YAML path, not lm_eval:that.yaml."""
    from tuneguard.cli import main as cli_main
    from tuneguard.eval.lm_eval_bridge import load_error

    for tasks in (["--tasks", "arc_easy@vendored"], ["--tasks=piqa,arc_easy@vendored"], ["-t", "piqa", "arc_easy@vendored"]):
        assert cli_main(["lm-eval", "--model", "tuneguard", *tasks]) == 2
        assert "@vendored names are tuneguard's (tuneguard eval --model M --tasks lm_eval:arc_easy@vendored)" in \
            capsys.readouterr().err
    said = str(load_error("arc_easy", OSError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)"),
                          verb="lm-eval"))
    assert "then pass that YAML's path to --tasks; or use tuneguard eval --model M --tasks lm_eval:arc_easy@vendored" \
        in said and "name lm_eval:that.yaml" not in said
