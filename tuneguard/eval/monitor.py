"""Monitoring a trained adapter over time: new data scored against what the run stored.

Labelled data: the tuned model's accuracy on the new items against its stored validation outcomes
(eval.json). Items whose content hash is also in the stored result are the same items scored again,
so they are compared pair by pair (McNemar's score test, Tango's interval); the other items are a new
sample, compared with the stored one as two independent proportions (the pooled score test and the
interval that inverts it). Each test is one-sided (did it drop?), Holm-corrected when both run, and
its interval is drawn at ``1 - 2 * level`` so that the interval's upper end is the one-sided bound:
it is below zero exactly when the test flags a drop.

Unlabelled data has no accuracy, but the model's own outputs can still move: the predicted-label
distribution (chi-square test of homogeneity against the validation set's) and the confidence, the
largest class probability (two-sample Kolmogorov-Smirnov), Holm-corrected across the two. Class
probabilities are the softmax over the verbalized labels' log-likelihoods (decoders) or the head's
logits (encoders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2_contingency, ks_2samp, norm
from transformers import PreTrainedTokenizerBase

from tuneguard.data.examples import ChoiceItem, Problems, build_examples, label_index
from tuneguard.data.readers import Row, detect_format, read_rows
from tuneguard.errors import TuneguardError
from tuneguard.eval.kinds import KINDS, has_classification_head
from tuneguard.eval.records import Doc, Task, TaskResult
from tuneguard.eval.scoring import head_logits
from tuneguard.eval.stats import (
    adjust,
    discordant,
    tango_interval,
    tango_z,
    two_sample_interval,
    two_sample_z,
    wilson_interval,
)
from tuneguard.progress import phase
from tuneguard.recipe import DataConfig

__all__ = ["accuracy_check", "check_items", "choice_probabilities", "drift_check", "read_check_rows"]


def _has_label(fields: dict[str, Any], cfg: DataConfig) -> bool:
    return fields.get(cfg.label_field) not in (None, "")


def read_check_rows(path: Path, cfg: DataConfig) -> tuple[list[Row], bool]:
    """The rows of a check's data file, read as the recipe reads its own, and whether they are labelled.

    The format comes from the file's suffix (the recipe's ``data.format`` when the suffix says none), so a
    JSONL file can check a run trained from TSV. Every row is labelled or none is: a mixed file is refused.
    """
    try:
        fmt = detect_format(path, "auto")
    except TuneguardError:  # no known suffix: the recipe's format, or read_rows names the problem
        fmt = cfg.format
    rows = read_rows(path, fmt, header=cfg.header, columns=cfg.columns)
    bad = next((r for r in rows if r.problem), None)
    if bad is not None:
        raise TuneguardError(f"{bad.where}: {bad.problem}")
    with_label = [r for r in rows if _has_label(r.fields or {}, cfg)]
    if with_label and len(with_label) < len(rows):
        without = next(r for r in rows if not _has_label(r.fields or {}, cfg))
        raise TuneguardError(
            f"{without.where}: no '{cfg.label_field}' field, but {with_label[0].where} has one; a check's data is "
            "either all labelled (scored against the stored result) or all unlabelled (a drift check)")
    return rows, bool(with_label)


def check_items(rows: list[Row], labelled: bool, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                is_encoder: bool) -> list[ChoiceItem]:
    """Rows -> scoring items through the recipe's own template and labels; any bad row is refused, naming it.

    Unlabelled rows get class 0 as a placeholder gold label: building the item needs one, and a drift check
    reads only the model's probabilities, never the gold label.
    """
    if not labelled:
        mapping, _ = label_index(cfg)
        placeholder = next(raw for raw, index in mapping.items() if index == 0)
        rows = [Row(r.where, {**(r.fields or {}), cfg.label_field: placeholder}) for r in rows]
    problems = Problems()
    with contextlib.suppress(TuneguardError):  # past data.max_bad_fraction; any bad row is refused below
        _, items = build_examples(rows, cfg, tokenizer, is_encoder=is_encoder, what="check", problems=problems)
    if problems.total:
        more = f" ({problems.total} of {len(rows)} rows are bad)" if problems.total > 1 else ""
        raise TuneguardError(f"{problems.named[0]}{more}; a check scores every row: fix or remove it")
    return items


def choice_probabilities(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
                         docs: Sequence[Doc], batch_size: int, label: str = "") -> np.ndarray:
    """Class probabilities per item (items x classes): the softmax over each verbalized label's log-likelihood
    after the item's context, or over a classification head's logits; their argmax is the scored prediction."""
    with phase(f"{label} · {task.name}" if label else task.name, len(docs)) as advance:
        if has_classification_head(model):
            logits = head_logits(model, tokenizer, [str(d.context) for d in docs], batch_size=batch_size,
                                 max_length=task.max_length, advance=advance)
        else:
            outcomes = KINDS[task.kind].score(model, tokenizer, task, docs, batch_size, advance)
            logits = torch.tensor([[s.logprob for s in options] for options in outcomes], dtype=torch.float64)
    return torch.softmax(logits.double(), dim=-1).numpy()


def _paired(fresh: np.ndarray, stored: np.ndarray) -> dict[str, Any]:
    """Fresh outcomes of items the stored result also scored, against their stored outcomes."""
    won, lost = discordant(stored, fresh)
    # One-sided (a drop): Tango's statistic at a difference of 0 is McNemar's.
    p = float(norm.cdf(tango_z(won, lost, len(fresh), 0.0))) if won + lost else 1.0
    return {"test": "paired", "items": "shared with validation", "n_fresh": len(fresh), "n_stored": len(stored),
            "fresh": float(fresh.mean()), "stored": float(stored.mean()), "delta": (won - lost) / len(fresh),
            "won": won, "lost": lost, "p_value": p}


def _two_sample(fresh: np.ndarray, stored: np.ndarray) -> dict[str, Any]:
    """Fresh outcomes of new items against every stored outcome, as two independent samples."""
    x1, n1, x2, n2 = int(fresh.sum()), len(fresh), int(stored.sum()), len(stored)
    return {"test": "two-sample", "items": "new", "n_fresh": n1, "n_stored": n2, "fresh": x1 / n1, "stored": x2 / n2,
            "delta": x1 / n1 - x2 / n2, "correct": [x1, x2], "p_value": float(norm.cdf(two_sample_z(x1, n1, x2, n2)))}


def _interval(t: dict[str, Any], alpha: float) -> tuple[float, float]:
    if t["test"] == "paired":
        return tango_interval(t["won"], t["lost"], t["n_fresh"], alpha)
    return two_sample_interval(t["correct"][0], t["n_fresh"], t["correct"][1], t["n_stored"], alpha)


def accuracy_check(stored: TaskResult, fresh: TaskResult, alpha: float) -> dict[str, Any]:
    """Did the tuned model's accuracy drop on new labelled items, against its stored validation outcomes?

    Fresh items whose hash the stored result holds are paired with their stored outcome; the rest are compared
    with every stored item as an independent sample. ``flagged``: some test's Holm-adjusted one-sided p < alpha.
    """
    outcome = dict(zip(stored.item_hashes, stored.per_item, strict=True)) if stored.item_hashes else {}
    hashes = fresh.item_hashes or [""] * fresh.n
    shared = [i for i, h in enumerate(hashes) if h in outcome]
    new = [i for i, h in enumerate(hashes) if h not in outcome]
    values = np.asarray(fresh.per_item, float)
    tests = []
    if new:
        tests.append(_two_sample(values[new], np.asarray(stored.per_item, float)))
    if shared:
        tests.append(_paired(values[shared], np.asarray([outcome[hashes[i]] for i in shared], float)))
    adjusted, levels = adjust([t["p_value"] for t in tests], "holm", alpha)
    for t, p, level in zip(tests, adjusted, levels, strict=True):
        # At 1 - 2 * level the interval's upper end is the one-sided bound the test used.
        t["ci_low"], t["ci_high"] = _interval(t, 2 * level)
        t.update(p_adjusted=p, ci_level=1 - 2 * level, flagged=p < alpha)
    low, high = wilson_interval(round(sum(fresh.per_item)), fresh.n, alpha)
    return {"metric": fresh.metric, "fresh": fresh.value, "fresh_ci": [low, high], "n": fresh.n,
            "stored": stored.value, "stored_n": stored.n, "shared_items": len(shared), "tests": tests,
            "flagged": any(t["flagged"] for t in tests)}


PERMUTATIONS = 4000
"""Resamples of the permutation test where a chi-square table has sparse cells."""


def _homogeneity(table: np.ndarray) -> dict[str, Any]:
    """Chi-square test of homogeneity of a 2 x classes table; where an expected count is under 5 (a rare class, a
    small fresh set) its p-value comes from permuting the items between the two sets instead: the chi-square
    approximation rejected 7.6% of same-distribution pairs at 5% there (6 classes, 200 vs 20 items)."""
    chi = chi2_contingency(table, correction=False)
    out = {"method": "chi-square", "statistic": float(chi.statistic), "dof": int(chi.dof), "p_value": float(chi.pvalue)}
    if chi.expected_freq.min() >= 5:
        return out
    k, n_fresh, totals = table.shape[1], int(table[0].sum()), table.sum(axis=0)
    pooled = np.repeat(np.arange(k), totals)
    expected = chi.expected_freq
    rng = np.random.default_rng(0)
    exceed = 0
    for start in range(0, PERMUTATIONS, 500):
        rows = min(500, PERMUTATIONS - start)
        fresh_counts = np.stack([np.bincount(rng.permutation(pooled)[:n_fresh], minlength=k) for _ in range(rows)])
        both = np.stack([fresh_counts, totals - fresh_counts], axis=1)
        stats = ((both - expected) ** 2 / expected).sum(axis=(1, 2))
        exceed += int(np.sum(stats >= chi.statistic - 1e-9))
    return {**out, "method": "chi-square, permutation p (sparse cells)", "p_value": (exceed + 1) / (PERMUTATIONS + 1)}


def drift_check(validation: np.ndarray, fresh: np.ndarray, labels: Sequence[str], alpha: float) -> dict[str, Any]:
    """Did the model's outputs move on new unlabelled items, against the validation set's?

    ``validation`` and ``fresh`` are class probabilities (items x classes). Two tests, Holm-corrected: the
    predicted-label counts (chi-square test of homogeneity on the 2 x classes table, classes neither set
    predicts left out) and the confidence, each item's largest probability (two-sample Kolmogorov-Smirnov).
    """
    k = len(labels)
    counts_val = np.bincount(validation.argmax(axis=1), minlength=k)
    counts_fresh = np.bincount(fresh.argmax(axis=1), minlength=k)
    table = np.stack([counts_fresh, counts_val])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] > 1:
        label_test = _homogeneity(table)
    else:  # both sets predict one and the same class
        label_test = {"method": "chi-square", "statistic": 0.0, "dof": 0, "p_value": 1.0}
    conf_val, conf_fresh = validation.max(axis=1), fresh.max(axis=1)
    ks = ks_2samp(conf_fresh, conf_val)
    tests = [
        {"test": "predicted labels", **label_test},
        {"test": "confidence", "method": "Kolmogorov-Smirnov", "statistic": float(ks.statistic),
         "p_value": float(ks.pvalue)},
    ]
    adjusted, _ = adjust([t["p_value"] for t in tests], "holm", alpha)
    for t, p in zip(tests, adjusted, strict=True):
        t.update(p_adjusted=p, flagged=p < alpha)
    return {
        "labels": list(labels), "n": len(fresh), "validation_n": len(validation),
        "fresh_counts": counts_fresh.tolist(), "validation_counts": counts_val.tolist(),
        "fresh_confidence": float(np.median(conf_fresh)), "validation_confidence": float(np.median(conf_val)),
        "tests": tests, "flagged": any(t["flagged"] for t in tests),
    }
