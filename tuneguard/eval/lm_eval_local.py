"""lm-evaluation-harness's own definition of a built-in task, run offline over tuneguard's vendored items.

tuneguard's built-in tasks re-implement lm-eval's; to check that they agree item by item, and to run
``lm_eval:arc_easy`` without the Hugging Face Hub, lm-eval's shipped task config is taken as it is and
only its dataset is pointed at JSONL files written from the vendored subset, with the fields lm-eval's
prompts and ``process_docs`` read. The one other change is GSM8K's few-shot sampler (see
:func:`local_task_config`).

lm-eval is an optional extra (``tuneguard[lm-eval]``): it is imported only when a config is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneguard.eval.records import Doc
from tuneguard.eval.tasks import TASKS, hellaswag_parts, vendored_rows, wikitext_articles

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

FEWSHOT_SOURCES = {"gsm8k": "gsm8k_train.jsonl"}
"""Vendored few-shot examples, for the tasks whose lm-eval definition has shots by default."""


def _hellaswag(row: dict[str, Any], doc: Doc) -> dict[str, Any]:
    label, ctx_a, ctx_b = hellaswag_parts(row["ctx"])
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": row["endings"], "label": str(doc.gold)}


def _boolq(row: dict[str, Any], doc: Doc) -> dict[str, Any]:
    # The vendored SuperGLUE file has "true"/"false"; lm-eval's dataset has the class index.
    return {**row, "label": doc.gold}


_CONVERT: dict[str, Callable[[dict[str, Any], Doc], dict[str, Any]]] = {"hellaswag": _hellaswag, "boolq": _boolq}
"""Vendored row (and tuneguard's own item, for the gold) to lm-eval's dataset row, where their fields differ."""


def local_rows(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` items of built-in task ``name`` as rows of the dataset lm-eval's config reads."""
    if name == "wikitext":
        return [{"page": page} for page in wikitext_articles()][:limit]
    convert = _CONVERT.get(name)
    rows = vendored_rows(TASKS[name].source)[:limit]
    if convert is None:
        return rows
    return [convert(row, doc) for row, doc in zip(rows, TASKS[name].docs(limit), strict=True)]


@cache
def task_manager() -> TaskManager:
    """lm-eval's task index (several seconds to build: thousands of YAML files), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def local_task_config(name: str, data_dir: str | Path, limit: int | None = None) -> dict[str, Any]:
    """lm-eval's config of built-in task ``name``, reading the first ``limit`` vendored items from ``data_dir``.

    The config is lm-eval's shipped YAML (includes and ``!function`` hooks resolved); only the dataset
    changes: ``dataset_path: json`` over files written to ``data_dir``, under the split lm-eval evaluates
    (its ``test_split``, else ``validation_split``), and the splits not written are unset so lm-eval
    never asks for them. GSM8K's five shots are the vendored first five of the train split, taken in
    order (lm-eval's ``first_n`` sampler): its default draws them at random from the whole 7,473-row
    split, which is not vendored. Pass the returned dict to ``lm_eval.simple_evaluate(tasks=[...])`` or
    ``TaskManager.load``.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    if name not in TASKS:
        raise KeyError(f"'{name}' is not one of tuneguard's built-in tasks")
    entry = task_manager().task_index[name]
    config = load_yaml(entry.yaml_path, resolve_func=True, recursive=True)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    split = config.get("test_split") or config["validation_split"]
    files = {split: _write(data_dir / f"{name}.{split}.jsonl", local_rows(name, limit))}
    if name in FEWSHOT_SOURCES:
        fewshot = config["fewshot_split"]
        files[fewshot] = _write(data_dir / f"{name}.{fewshot}.jsonl", vendored_rows(FEWSHOT_SOURCES[name]))
        config["fewshot_config"] = {**(config.get("fewshot_config") or {}), "sampler": "first_n"}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in files:
            config[key] = None
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": files, "cache_dir": str(data_dir / "datasets-cache")})
    return config
