"""``tuneguard select``: candidate backbones ranked on a recipe's validation data, with tiny local models."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from tuneguard.cli import main as cli_main
from tuneguard.errors import TuneguardError
from tuneguard.select import _fine_tune, plan_candidates, rank

from .test_probe import bert_dir  # noqa: F401  (a tiny BERT whose features tell sentences apart)
from .test_train import make_run


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    return make_run(tmp_path, model_dir, eval={"task": True, "suites": ["arc_easy"]},
                    train={"max_steps": 30, "lr": 1e-2})


def _select(tmp_path: Path, recipe: Path, *candidates: Path, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "select"
    assert cli_main(["select", str(recipe), "--candidates", *map(str, candidates), "--limit", "6",
                     "--out", str(out), *extra]) == 0
    assert (out / "select.md").exists()
    return json.loads((out / "select.json").read_text())


def test_select_ranks_a_decoder_and_an_encoder(tmp_path: Path, tiny_llama_dir: Path, bert_dir: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture) -> None:
    summary = _select(tmp_path, _recipe(tmp_path, tiny_llama_dir), tiny_llama_dir, bert_dir)
    rows = summary["candidates"]
    assert [r["rank"] for r in rows] == [1, 2] and summary["ranked_by"] == "score"
    assert rows[0]["score"] >= rows[1]["score"]  # best first
    by_kind = {r["kind"]: r for r in rows}
    decoder, encoder = by_kind["decoder"], by_kind["encoder"]
    assert decoder["source"] == str(tiny_llama_dir) and decoder["how"] == "zero-shot"
    assert set(decoder["general"]) == {"arc_easy"} and encoder["general"] == {}
    # The encoder's untuned score is a linear probe with the recipe's budget, not its random head.
    assert encoder["how"] == "linear probe" and encoder["probe"]["steps"] == 30
    assert encoder["score"] == 1.0  # four distinct reviews: the probe separates them
    for r in rows:
        assert r["n"] == 6 and len(r["score_per_item"]) == 6 and r["score"] == sum(r["score_per_item"]) / 6
        assert r["footprint_mb"] > 0 and r["peak_rss_mb"] > 0 and r["items_per_s"] > 0
    # Both scored the same six validation rows, so the second is compared with the leader pair by pair.
    assert rows[0]["rows"] == rows[1]["rows"]
    assert rows[1]["versus_leader"]["delta"] == pytest.approx(rows[1]["score"] - rows[0]["score"])
    printed = capsys.readouterr().out
    assert "n/a (encoder)" in printed and "linear probe" in printed and "zero-shot" in printed
    md = (tmp_path / "select" / "select.md").read_text()
    assert f"| 1 | {rows[0]['source']} |" in md and f"| 2 | {rows[1]['source']} |" in md


def test_select_with_steps_fine_tunes_into_an_ordinary_run(tmp_path: Path, tiny_llama_dir: Path,
                                                            bert_dir: Path) -> None:  # noqa: F811
    recipe = _recipe(tmp_path, tiny_llama_dir)
    summary = _select(tmp_path, recipe, bert_dir, extra=("--steps", "3"))
    assert summary["ranked_by"] == "tuned"
    (row,) = summary["candidates"]
    run = Path(row["run"])
    assert run.parent == tmp_path / "select" and row["steps"] == 3 and row["train_tokens_per_s"] > 0
    assert json.loads((run / "run.json").read_text())["steps"] == 3
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["source"] == str(bert_dir)
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["tuned"][0]["value"] == row["tuned"] and evaluated["tuned"][0]["n"] == 6
    assert evaluated["baseline"]["kind"] == "linear_probe"  # the run's own report compares with the probe too
    # Measuring again reuses the finished run of the same recipe instead of refusing or training again.
    args = argparse.Namespace(recipe=str(recipe), overrides=[], out=str(tmp_path / "select"), steps=3, limit=6,
                              candidates=[str(bert_dir)])
    before = (run / "run.json").stat().st_mtime_ns
    assert not row["reused"]
    again = _fine_tune(plan_candidates(args)[2][0], args)
    assert again["reused"] and again["tuned"] == row["tuned"]
    assert (run / "run.json").stat().st_mtime_ns == before


def test_rank_orders_by_score_and_puts_failures_last() -> None:
    rows = [{"source": "a", "score": 0.6, "tuned": 0.95}, {"source": "b", "error": "boom"},
            {"source": "c", "score": 0.9, "tuned": 0.7}, {"source": "d", "score": 0.8, "tune_error": "diverged"}]
    summary = rank("x", [dict(r) for r in rows], {"steps": None})
    assert [(r["source"], r["rank"]) for r in summary["candidates"]] == [("c", 1), ("d", 2), ("a", 3), ("b", None)]
    summary = rank("x", [dict(r) for r in rows], {"steps": 5})  # with --steps: by the fine-tuned score
    assert [(r["source"], r["rank"]) for r in summary["candidates"]] == [("a", 1), ("c", 2), ("b", None), ("d", None)]


def test_select_refuses_a_missing_candidate_before_loading(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir)
    with pytest.raises(TuneguardError, match="--candidates .*nowhere: model.source: directory not found"):
        plan_candidates(argparse.Namespace(recipe=str(recipe), overrides=[], out=str(tmp_path / "o"), steps=None,
                                           limit=None, candidates=[str(tiny_llama_dir), str(tmp_path / "nowhere")]))
    assert cli_main(["select", str(recipe), "--candidates", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_one_model_under_two_spellings_or_an_image_model_is_refused_and_folders_never_collide(
        tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = _recipe(tmp_path, tiny_llama_dir)

    def plan(*sources: str) -> list:
        return plan_candidates(argparse.Namespace(recipe=str(recipe), overrides=[], out=str(tmp_path / "o"), steps=None,
                                                  limit=None, candidates=list(sources)))[2]

    with pytest.raises(TuneguardError, match=r"--candidates .*/\./?: the same model as"):
        plan(str(tiny_llama_dir), f"{tiny_llama_dir}/./")
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "models" / "resnet-tiny-random"
    with pytest.raises(TuneguardError, match="resnet-tiny-random: an image classifier; this recipe's data are text"):
        plan(str(shipped))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "llama").symlink_to(tiny_llama_dir)
    with pytest.raises(TuneguardError, match="the same model as"):  # links to one folder are one model
        plan(str(tmp_path / "a" / "llama"), str(tmp_path / "b" / "llama"))
    import shutil

    copies = [tmp_path / "c" / "llama", tmp_path / "d" / "llama", tmp_path / "e" / "llama-2"]
    for copy in copies:  # three models whose names would have given two of them one run folder
        shutil.copytree(tiny_llama_dir, copy)
    names = [c.run_recipe.output.name for c in plan(*map(str, copies))]
    assert len(set(names)) == 3 and names[2].endswith("llama-2-2"), names


def test_a_fine_tune_picked_among_validations_is_marked_optimistic() -> None:
    """select ranked by the kept step's score, picked on the rows the table scores, and called it 'after N steps'."""
    from tuneguard.report.select import select_lines, select_row

    picked = {"rule": "best_task", "metric": "accuracy", "val_accuracy": 0.4, "step": 1, "validations": 3}
    row = {"rank": 1, "source": "bert", "kind": "encoder", "score": 0.5, "how": "linear probe", "tuned": 0.4,
           "tuned_n": 10, "selection": picked}
    assert select_row(row, 3)[4] == ("40.0%, step 1 of 3 validations", "inconclusive")
    summary = {"settings": {"steps": 3, "adapter": "lora", "quantization": "none"}, "candidates": [row]}
    assert any("bert: the fine-tune kept the step train.select picked" in str(line) for line in select_lines(summary))
    plain = {**row, "selection": {"rule": "last", "step": 3, "validations": 3}}
    assert select_row(plain, 3)[4] == "40.0%"
