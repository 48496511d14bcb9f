"""Bad input through the real command: one clear line, a non-zero exit, no traceback, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def tuneguard(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneguard.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def recipe(tmp_path: Path, model_dir: Path, rows: list | None = None, **data) -> Path:
    rows = rows if rows is not None else [{"text": "the movie was great", "label": 1}] * 8
    (tmp_path / "train.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    spec = {
        "model": {"source": str(model_dir)},
        "data": {"kind": "classification", "train": "train.jsonl", "labels": ["negative", "positive"], **data},
        "train": {"max_steps": 1},
        "eval": {"task": False},
        "output": {"dir": str(tmp_path / "runs/{name}")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


CASES = {
    "unknown key": (lambda p: {"overrides": ["adapter.rank=8"]}, "unknown key 'adapter.rank'; did you mean 'adapter.r'"),
    "wrong type": (lambda p: {"overrides": ["train.lr=fast"]}, "'train.lr': Input should be a valid number"),
    "missing file": (lambda p: {"overrides": ["data.validation=nope.jsonl"]}, "data.validation: file not found: nope.jsonl"),
    "broken JSONL row": (lambda p: {"rows": [{"text": "ok", "label": 1}] * 5 + ["{not json"]}, "train.jsonl:6: invalid JSON"),
    "empty dataset": (lambda p: {"rows": []}, "the dataset is empty"),
    "label outside label set": (lambda p: {"rows": [{"text": "ok", "label": 1}] * 5 + [{"text": "x", "label": "neutral"}]},
                                "train.jsonl:6: label 'neutral' is not in the label set"),
    "missing model": (lambda p: {"overrides": ["model.source=/no/such/model"]}, "model.source: directory not found"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_clear_line(tmp_path: Path, tiny_llama_dir: Path, case: str) -> None:
    make, expected = CASES[case]
    spec = make(tmp_path)
    path = recipe(tmp_path, tiny_llama_dir, rows=spec.get("rows"))
    result = tuneguard("train", str(path), *spec.get("overrides", []), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("tuneguard: error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_malformed_recipe_and_debug_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: {train: [oops\n")
    result = tuneguard("train", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "bad.yaml:2:1: malformed YAML" in result.stderr
    for args in (("--debug", "train", str(path)), ("train", str(path), "--debug")):  # before or after the verb
        debug = tuneguard(*args, cwd=tmp_path)
        assert debug.returncode == 2 and "Traceback" in debug.stderr, args  # 1 would read as a regression


def test_offline_hub_id_says_so(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = recipe(tmp_path, tiny_llama_dir)
    env_cmd = [sys.executable, "-c", "import os, sys; os.environ['HF_HUB_OFFLINE'] = '1'; "
               "from tuneguard.cli import main; sys.exit(main(sys.argv[1:]))",
               "train", str(path), "model.source=someone/not-cached-model"]
    result = subprocess.run(env_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "not in the local HF cache" in result.stderr and "HF_HUB_OFFLINE=1 is set" in result.stderr


def test_overrides_go_anywhere_on_the_line() -> None:
    """Before the recipe, between flags or after them: the recipe is the one word that is not section.key=value."""
    import argparse

    from tuneguard.args import with_overrides
    from tuneguard.cli import build_parser

    parser = build_parser()
    for line in (["data", "preview", "--n", "1", "data.augment=swap", "r.yaml"],
                 ["data", "preview", "data.augment=swap", "--n", "1", "r.yaml", "data.augment_prob=0.2"],
                 ["data", "preview", "r.yaml", "--n", "1", "data.augment=swap", "data.augment_prob=0.2"]):
        args, extra = parser.parse_known_args(line)
        args = with_overrides(parser, args, extra)
        assert args.recipe == "r.yaml" and args.n == 1 and args.overrides[0] == "data.augment=swap", line
    args, extra = parser.parse_known_args(["train", "runs/a=b/r.yaml", "train.lr=1e-3"])  # '=' in a path
    assert with_overrides(parser, args, extra).recipe == "runs/a=b/r.yaml"
    for line in (["train", "a.yaml", "b.yaml"], ["train", "train.lr=1"]):
        args, extra = parser.parse_known_args(line)
        with pytest.raises(SystemExit):
            with_overrides(parser, args, extra)
    assert isinstance(args, argparse.Namespace)


def test_flags_that_apply_elsewhere_or_values_that_judge_nothing_are_refused(tmp_path: Path, capsys) -> None:
    """eval RUN dropped --quant, --out, --num-fewshot... silently; a margin of nan crashed with exit 1."""
    from tuneguard.cli import main

    assert main(["eval", "runs/x", "--quant", "int8", "--out", "o.json", "--num-fewshot", "5"]) == 2
    assert "--quant, --out, --num-fewshot apply with --model; a run is scored as its recipe says" in \
        capsys.readouterr().err
    assert main(["eval", "--model", "bundled:smollm2-135m-instruct", "--with-original"]) == 2
    assert "--with-original scores a run's unquantized backbone" in capsys.readouterr().err
    assert main(["eval", "--model", "/no/such/model", "--out", str(tmp_path)]) == 2  # refused before any scoring
    assert f"{tmp_path}: is a folder; name the file to write" in capsys.readouterr().err
    for argv, problem in ((["eval", "--model", "m", "--num-fewshot", "-1"], "must be at least 0, got -1"),
                          (["eval", "--model", "m", "--batch-size", "0"], "must be at least 1, got 0"),
                          (["gate", "r.json", "--margin", "nan"], "must be a finite number, got nan"),
                          (["plan", "--margin", "inf", "--discordance", "0.1"], "must be a finite number, got inf")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and problem in capsys.readouterr().err, argv


def test_an_error_nobody_foresaw_is_one_line_and_never_exit_1(capsys) -> None:
    """Exit 1 means a regression to CI: a bug must not read as one."""
    from tuneguard.errors import INTERNAL_ERROR, guarded

    def broken() -> int:
        raise TypeError("'NoneType' object is not subscriptable\nmore")

    assert guarded(broken) == INTERNAL_ERROR == 70
    assert capsys.readouterr().err == ("tuneguard: internal error: TypeError: 'NoneType' object is not subscriptable "
                                       "(rerun with --debug for the traceback, and report it)\n")
