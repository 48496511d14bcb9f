"""Fuzzing the recipe loader and the data readers: any input is a recipe, rows, or one TuneguardError.

A fixed, derandomized budget keeps CI's time and results stable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneguard.data.readers import read_rows
from tuneguard.errors import TuneguardError
from tuneguard.recipe import Recipe, load_recipe

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SECTIONS = ["model", "quantization", "adapter", "data", "train", "eval", "output"]
KEYS = ["source", "method", "r", "alpha", "train", "validation", "kind", "labels", "lr", "max_steps", "name", "dir",
        "header", "columns", "text_field", "prompt_template", "limit", "format", "max_length", "allow_overlap"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["t.jsonl", "lora", "nf4", "../x", "a/b", "{name}", "{"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=6)
RECIPES = st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5),
                          max_size=5)
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from([f"{s}.{k}" for s in SECTIONS for k in KEYS[:8]]
                                                                        + ["data", "x", "", "a..b", "data.train.x"]),
                               st.text(max_size=10)), max_size=3)


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tg-fuzz-") as tmp:
        folder = Path(tmp)
        (folder / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
        yield folder


def _loads_or_refuses(path: Path, overrides: list[str]) -> None:
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except TuneguardError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@BUDGET
@given(recipe=RECIPES, overrides=OVERRIDES)
def test_structured_recipes_load_or_refuse(recipe: dict, overrides: list[str]) -> None:
    with _workdir() as folder:
        path = folder / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        _loads_or_refuses(path, overrides)


@BUDGET
@given(text=st.text(max_size=200))
def test_arbitrary_recipe_text_loads_or_refuses(text: str) -> None:
    with _workdir() as folder:
        path = folder / "r.yaml"
        path.write_text(text)
        _loads_or_refuses(path, [])


@BUDGET
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       fmt=st.sampled_from(["jsonl", "csv", "tsv", "parquet"]), header=st.booleans())
def test_data_readers_read_or_refuse(data: bytes, fmt: str, header: bool) -> None:
    with _workdir() as folder:
        path = folder / f"d.{fmt}"
        path.write_bytes(data)
        try:
            rows = read_rows(path, header=header, columns=None if header else ["text", "label"])
        except TuneguardError as exc:
            assert str(path) in str(exc)
            return
        assert rows and all(r.where.startswith(str(path)) for r in rows)
        assert all((r.fields is None) != (r.problem is None) for r in rows)
