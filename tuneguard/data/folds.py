"""Cross-validation folds: which rows each fold validates on, seeded and, when asked, stratified by label.

Fold membership is a pure function of the rows, k and the seed, so a fold run re-derives its own validation
rows from its recipe (``tuneguard eval RUN``) and ``tuneguard cv`` can check every fold before a model loads.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from tuneguard.data.examples import class_index, label_index
from tuneguard.data.readers import Row
from tuneguard.errors import TuneguardError
from tuneguard.recipe import DataConfig


def assign_folds(strata: Sequence[int | None], k: int, seed: int) -> list[int]:
    """The fold (0 to k-1) of each row: each stratum's rows shuffled with ``seed``, the strata laid one after
    another, then dealt to the folds in turn. Every row gets one fold, fold sizes differ by at most one, and a
    stratum's count in each fold is within one of its count / k (the rows of one stratum are dealt in a row)."""
    rng = random.Random(seed)
    members: dict[int | None, list[int]] = {}
    for i, stratum in enumerate(strata):
        members.setdefault(stratum, []).append(i)
    folds = [0] * len(strata)
    position = 0
    for stratum in sorted(members, key=lambda s: (s is None, s or 0)):
        rows = members[stratum]
        rng.shuffle(rows)
        for i in rows:
            folds[i] = position % k
            position += 1
    return folds


def label_strata(rows: Sequence[Row], cfg: DataConfig) -> list[int | None]:
    """Each row's class index; None for a row without a known label (the run counts it as a bad row)."""
    mapping, _ = label_index(cfg)
    out: list[int | None] = []
    for row in rows:
        try:
            out.append(class_index(row.fields or {}, cfg, mapping))
        except ValueError:
            out.append(None)
    return out


def _check(rows: Sequence[Row], strata: Sequence[int | None], cfg: DataConfig, k: int) -> None:
    """Every fold must validate on rows, and with stratification on every class: refuse k beyond either."""
    where = "data.train" + (" (after data.max_train_samples)" if cfg.max_train_samples else "")
    if len(rows) < k:
        fewer = f"use at most {len(rows)} folds" if len(rows) >= 2 else "cross-validation needs at least 2 rows"
        raise TuneguardError(f"data.folds={k}: {where} has only {len(rows)} rows, fewer than the folds; {fewer}")
    counts = Counter(s for s in strata if s is not None)
    if counts and min(counts.values()) < k:
        label, count = min(counts.items(), key=lambda kv: (kv[1], kv[0]))  # the rarest; ties: the first label
        name = label_index(cfg)[1][label]
        fewer = f"use at most {count} folds, or do not stratify" if count >= 2 else "do not stratify"  # 1 fold is none
        raise TuneguardError(f"data.stratify: label '{name}' has only {count} rows in {where}, fewer than "
                             f"data.folds={k}, so a fold would validate without it; {fewer}")


def fold_split(rows: list[Row], cfg: DataConfig, seed: int) -> tuple[list[Row], list[Row]]:
    """(training, validation) rows of fold ``cfg.fold`` of ``cfg.folds``, both in file order: the fold validates,
    the other folds train."""
    assert cfg.folds is not None and cfg.fold is not None, "a fold run's recipe sets both"
    strata = label_strata(rows, cfg) if cfg.stratify else [None] * len(rows)
    _check(rows, strata, cfg, cfg.folds)
    folds = assign_folds(strata, cfg.folds, seed)
    train = [r for r, f in zip(rows, folds, strict=True) if f != cfg.fold]
    val = [r for r, f in zip(rows, folds, strict=True) if f == cfg.fold]
    return train, val
