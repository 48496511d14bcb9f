import re
from pathlib import Path

import pytest

from tuneguard.errors import TuneguardError
from tuneguard.recipe import apply_overrides, dump_recipe, load_recipe, parse_override

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "a b", "label": 0}\n')
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert Path(recipe.data.train).exists()  # a file, or a folder of class folders (images)
    assert recipe.output.name == path.stem


def test_unknown_key_names_path_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\nadapter: {rank: 8}\n")
    with pytest.raises(TuneguardError, match=r"unknown key 'adapter.rank'; did you mean 'adapter.r'"):
        load_recipe(path)


def test_a_misspelt_section_is_named_before_the_missing_one(tmp_path: Path) -> None:
    path = write(tmp_path, "dta: {train: train.jsonl, labels: [a, b]}\n")
    with pytest.raises(TuneguardError, match=r"unknown key 'dta'; did you mean 'data'\? \(and 1 more problem"):
        load_recipe(path)


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\ntrian: {lr: 1}\n")
    with pytest.raises(TuneguardError, match=r"unknown key 'trian'; did you mean 'train'"):
        load_recipe(path)


def test_wrong_type_names_path_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\ntrain: {batch_size: many}\n")
    with pytest.raises(TuneguardError, match=r"'train.batch_size': Input should be a valid integer"):
        load_recipe(path)
    with pytest.raises(TuneguardError, match=r"'train.batch_size': expected a number, got the boolean true"):
        load_recipe(path, ["train.batch_size=true"])  # pydantic alone would read it as 1
    assert load_recipe(path, ["train.batch_size=2", "model.trust_remote_code=true"]).model.trust_remote_code


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: nowhere.jsonl, labels: [a, b]}\n")
    with pytest.raises(TuneguardError, match=r"data.train: file not found: nowhere.jsonl"):
        load_recipe(path)


def test_missing_recipe_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(TuneguardError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    path = write(tmp_path, "data: {train: [unclosed\n")
    with pytest.raises(TuneguardError, match=r"r.yaml:\d+:\d+: malformed YAML"):
        load_recipe(path)


def test_a_key_given_twice_is_named_with_its_line(tmp_path: Path) -> None:
    """PyYAML keeps the last of two ``train:`` sections silently; the first one's settings would be lost."""
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\ntrain: {max_steps: 2}\ntrain: {lr: 1e-3}\n")
    with pytest.raises(TuneguardError, match=r"r.yaml:3:1: malformed YAML: duplicate key 'train'"):
        load_recipe(path)


def test_anchors_and_merge_keys_read_as_yaml_reads_them(tmp_path: Path) -> None:
    """A merged key a mapping overrides is not a duplicate; the duplicate check must not break ``<<``."""
    import yaml

    from tuneguard.io import read_yaml

    text = "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\nlisted:\n  <<: [*b, {z: 4}]\n  y: 5\n"
    (tmp_path / "m.yaml").write_text(text)
    assert read_yaml(tmp_path / "m.yaml") == yaml.safe_load(text) == {
        "base": {"x": 1, "y": 2}, "d": {"x": 3, "y": 2}, "listed": {"x": 1, "y": 5, "z": 4}}


@pytest.mark.parametrize(("labels", "problem"), [
    ('["1", "2", "3", "4", "5"]', "'1', the name of class 0, is also the raw label of class 1 (the list's indices)"),
    ("[1, 2]", "'1', the name of class 0, is also the raw label of class 1"),
    ('{"1": "0", "0": "1"}', "'0', the name of class 0, is also the raw label of class 1 (the mapping's keys)"),
    ("[neg, pos, neg]", "'neg' names two classes; list each class once (a mapping may give several raw labels one"),
    ('{"0": "0", "1": "0", "2": "1"}', "'1', the name of class 1, is also the raw label of class 0 (the mapping's keys)"),
])
def test_labels_that_read_as_another_class_are_refused(tmp_path: Path, labels: str, problem: str) -> None:
    """Star ratings listed as names would shift every class by one (raw 1 read as index 1, i.e. "2")."""
    path = write(tmp_path, f"data: {{train: train.jsonl, labels: {labels}}}\n")
    with pytest.raises(TuneguardError, match=re.escape(problem)):
        load_recipe(path)


def test_raw_labels_may_share_a_name_that_is_one_of_them(tmp_path: Path) -> None:
    """{positive: positive, pos: positive, ...}: every reading of 'positive' is the same class, so nothing is ambiguous."""
    path = write(tmp_path, "data: {train: train.jsonl, labels: {positive: positive, pos: positive, negative: negative, "
                           "neg: negative}}\n")
    assert load_recipe(path).data.classes == ["positive", "negative"]


def test_labels_are_text_whatever_yaml_made_of_them(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: {0: negative, 1: positive}}\n")
    assert load_recipe(path).data.labels == {"0": "negative", "1": "positive"}
    assert load_recipe(path, ['data.labels=["0", "1"]']).data.labels == ["0", "1"]  # each its own index: fine
    assert load_recipe(path, ["data.labels={0.0: neg, 1.0: pos}"]).data.labels == {"0": "neg", "1": "pos"}  # as rows read
    with pytest.raises(TuneguardError, match=r"read a label as the boolean False; quote it"):
        load_recipe(path, ["data.labels=[no, yes]"])


@pytest.mark.parametrize("seed", ["-5", "4294967296"])
def test_a_seed_out_of_range_is_one_line(tmp_path: Path, seed: str) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\n")
    with pytest.raises(TuneguardError, match=r"'train.seed': Input should be (greater|less) than or equal to"):
        load_recipe(path, [f"train.seed={seed}"])


@pytest.mark.parametrize(("data", "problem"), [
    ("{train: train.jsonl, labels: [a, b], prompt_template: 'Review: {sentence}', augment: synonym}",
     "data.augment edits data.text_field ('text'), which the rows' prompt ('Review: {sentence}') does not read"),
    ("{kind: instruction, train: train.jsonl, augment: swap}", "(the prompt field 'prompt' as written) does not read"),
])
def test_augmenting_a_field_the_prompt_does_not_read_is_refused(tmp_path: Path, data: str, problem: str) -> None:
    with pytest.raises(TuneguardError, match=re.escape(problem)):
        load_recipe(write(tmp_path, f"data: {data}\n"))
    fixed = load_recipe(write(tmp_path, f"data: {data}\n"), ["data.text_field=sentence"] if "sentence" in data else
                        ["data.prompt_template='Q: {text}'"])
    assert fixed.data.augment_ops


def test_classification_needs_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl}\n")
    with pytest.raises(TuneguardError, match="data.labels is required"):
        load_recipe(path)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_lokr_on_4bit_refused_before_loading(tmp_path: Path, method: str) -> None:
    # PEFT would fail mid-forward with a shape error; the recipe check names the combination instead.
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\nquantization: {method: nf4}\n")
    with pytest.raises(TuneguardError, match=f"adapter.method '{method}' does not work on a 4-bit backbone"):
        load_recipe(path, [f"adapter.method={method}"])
    assert load_recipe(path, [f"adapter.method={method}", "quantization.method=int8"]).adapter.method == method


def test_missing_tracker_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\ntrain: {trackers: [wandb]}\n")
    with pytest.raises(TuneguardError, match=r"'train.trackers': tracker \['wandb'\] is not installed"):
        load_recipe(path)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "adapter.r=8", "adapter.target_modules=[q_proj, v_proj]"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.adapter.r == 8
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(TuneguardError, match="unknown key 'adapter.rr'"):
        load_recipe(path, ["adapter.rr=8"])
    with pytest.raises(TuneguardError, match="not of the form"):
        parse_override("adapter.r")
    with pytest.raises(TuneguardError, match="'r' is not a section"):
        apply_overrides({"adapter": {"r": 4}}, ["adapter.r.x=1"])


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\n"), ["train.seed=7"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again).model_dump() == {**recipe.model_dump(), "output": {**recipe.model_dump()["output"]}}


def test_a_bare_no_is_no_mixed_precision() -> None:
    """``train.mixed_precision=no`` reaches the recipe as YAML's false; it means "no", as in Accelerate's configs."""
    from tuneguard.recipe import TrainConfig

    assert TrainConfig(mixed_precision=False).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision=True)


@pytest.mark.parametrize(("template", "problem"), [
    ("Review: {} {text}", "{} in 'Review: {} {text}' is not a field name"),
    ("Question {0}", "{0} in 'Question {0}' is not a field name"),
    ("Text {row.text}", "{row.text} in 'Text {row.text}' is not a field name"),
    ("Review: {text", "expected '}' before end of string in 'Review: {text'; write a literal brace twice"),
])
def test_a_template_that_fails_every_row_is_refused_at_load(tmp_path: Path, template: str, problem: str) -> None:
    """A positional or dotted field raised IndexError (a traceback, exit 1) or called every row bad."""
    path = write(tmp_path, "data: {train: train.jsonl, labels: [a, b]}\n")
    with pytest.raises(TuneguardError, match=re.escape(problem)):
        load_recipe(path, [f"data.prompt_template={template}"])
    assert load_recipe(path, ["data.prompt_template=Text {text} {{braced}}"]).data.template == "Text {text} {{braced}}"
    assert load_recipe(path, ["data.prompt_template=Text {review text}"]).data.template == "Text {review text}"  # a CSV column


@pytest.mark.parametrize(("data", "problem"), [
    ("{kind: text, train: train.jsonl, prompt_template: 'Q {text}'}", "data.prompt_template shapes prompts; data.kind 'text'"),
    ("{kind: text, train: train.jsonl, system_prompt: be brief}", "data.system_prompt shapes prompts; data.kind 'text'"),
    ("{train: train.jsonl, labels: [a, b], columns: [text, label]}", "data.columns names CSV/TSV columns; a JSONL file"),
    ("{train: train.jsonl, labels: [a, b], replay: bundled:wiki}", "data.replay (bundled:wiki) needs data.replay_fraction"),
    ("{train: train.jsonl, labels: [a, b], replay_fraction: 0.2}", "data.replay_fraction needs data.replay"),
    ("{train: train.jsonl, labels: [a, b]}\nquantization: {method: int8, compute_dtype: bfloat16}",
     "quantization.compute_dtype applies to 4-bit methods (nf4, fp4); method 'int8' has none"),
])
def test_keys_the_data_never_reads_are_refused(tmp_path: Path, data: str, problem: str) -> None:
    """Each was accepted and silently did nothing."""
    with pytest.raises(TuneguardError, match=re.escape(problem)):
        load_recipe(write(tmp_path, f"data: {data}\n"))


def test_keys_a_method_does_not_read_are_named() -> None:
    """IA3 has no rank, prompt tuning no target modules: set anyway, they are said at the start (not refused, so one
    override switches a recipe's method)."""
    from tuneguard.adapters.capabilities import CAPABILITIES
    from tuneguard.recipe import AdapterConfig

    assert AdapterConfig(method="ia3", r=64, alpha=1, dropout=0.5).unused_keys() == [
        "adapter.alpha", "adapter.dropout", "adapter.r"]
    assert AdapterConfig(method="prompt_tuning", target_modules=["q_proj"]).unused_keys() == ["adapter.target_modules"]
    assert AdapterConfig(method="lora", num_virtual_tokens=4).unused_keys() == ["adapter.num_virtual_tokens"]
    assert AdapterConfig(method="lora", r=8, target_modules="mlp").unused_keys() == []
    stored = AdapterConfig(**AdapterConfig().model_dump())  # a run's recipe.yaml names every key at its default
    assert stored.model_copy(update={"method": "ia3"}).unused_keys() == []
    assert set(CAPABILITIES) == set(AdapterConfig.model_fields["method"].annotation.__args__)
    assert all(caps.keys <= set(AdapterConfig.model_fields) for caps in CAPABILITIES.values())
