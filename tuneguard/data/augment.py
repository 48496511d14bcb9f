"""Text augmentation of training rows: EDA's four operations (Wei & Zou, EMNLP 2019) and typo-like letter noise.

Each training row keeps its original and gains ``data.augment_copies`` copies, as EDA does; each copy gets one
operation drawn from ``data.augment``, applied to the text field with EDA's alpha (``data.augment_prob``). The
random stream of a copy is seeded by (seed, row index, copy index) alone, so a row's copies do not depend on the
rows around it or on tokenization: the same seed gives byte-identical rows, and ``tuneguard data preview`` shows
exactly the copies a run trains on. Validation rows never pass through here; labels and other fields are kept.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneguard.recipe import DataConfig

SYNONYMS_FILE = Path(__file__).resolve().parent / "synonyms" / "wordnet_synonyms.tsv"
"""Single-word synonyms from Princeton WordNet 3.0 (see synonyms/README.md for source, rules and licence)."""
MIN_NOISY_LETTERS = 3
"""Letter noise leaves shorter words alone: a typo in 'is' or 'an' makes another word, not a misspelling."""
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class Copy:
    op: str
    fields: dict[str, Any]


@functools.cache
def synonyms() -> dict[str, tuple[str, ...]]:
    """Headword -> synonyms, loaded once on first use."""
    table = {}
    for line in SYNONYMS_FILE.read_text(encoding="utf-8").splitlines():
        word, _, alternatives = line.partition("\t")
        table[word] = tuple(alternatives.split())
    return table


def _split(token: str) -> tuple[str, str, str]:
    """Leading punctuation, the word, trailing punctuation (``"great!"`` -> ``("", "great", "!")``)."""
    match = _AFFIXES.match(token)
    assert match is not None  # every string matches
    return match.group(1), match.group(2), match.group(3)


def _synonyms_of(token: str) -> tuple[str, ...]:
    return synonyms().get(_split(token)[1].lower(), ())


def _n_changes(words: list[str], alpha: float) -> int:
    """EDA's count of words an operation changes: alpha of them, at least one."""
    return max(1, int(alpha * len(words)))


def synonym_replacement(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """Replace up to n words that have synonyms by a random synonym, keeping punctuation and a capital."""
    out = list(words)
    positions = [i for i, w in enumerate(words) if _synonyms_of(w)]
    rng.shuffle(positions)
    for i in positions[: _n_changes(words, alpha)]:
        head, word, tail = _split(words[i])
        new = rng.choice(_synonyms_of(words[i]))
        out[i] = head + (new.capitalize() if word[:1].isupper() else new) + tail
    return out


def random_insertion(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """Insert n synonyms of the text's own words at random places (nothing when no word has a synonym)."""
    out = list(words)
    donors = [w for w in words if _synonyms_of(w)]
    for _ in range(_n_changes(words, alpha) if donors else 0):
        out.insert(rng.randint(0, len(out)), rng.choice(_synonyms_of(rng.choice(donors))))
    return out


def random_swap(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """Swap two words at random positions, n times."""
    out = list(words)
    for _ in range(_n_changes(words, alpha) if len(words) > 1 else 0):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """Drop each word with probability alpha; when all would go, one random word stays (EDA's rule)."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= alpha]
    return kept or [rng.choice(words)]


def _typo(word: str, rng: random.Random) -> str:
    """One adjacent-letter swap, dropped letter or doubled letter."""
    kind = rng.choice(("swap", "drop", "double"))
    pairs = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    if kind == "swap" and pairs:
        i = rng.choice(pairs)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1:] if kind == "drop" else word[: i + 1] + word[i:]


def char_noise(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """One typo each in n words of at least MIN_NOISY_LETTERS letters."""
    out = list(words)
    parts = [_split(w) for w in words]
    positions = [i for i, (_, word, _) in enumerate(parts) if word.isalpha() and len(word) >= MIN_NOISY_LETTERS]
    for i in rng.sample(positions, min(len(positions), _n_changes(words, alpha))):
        head, word, tail = parts[i]
        out[i] = head + _typo(word, rng) + tail
    return out


OPERATIONS: dict[str, Callable[[list[str], float, random.Random], list[str]]] = {
    "synonym": synonym_replacement,
    "insert": random_insertion,
    "swap": random_swap,
    "delete": random_deletion,
    "char_noise": char_noise,
}
"""One function per name in ``tuneguard.recipe.AUGMENT_OPS``: words, alpha, the copy's random stream -> words."""


def augmented_copies(fields: dict[str, Any], cfg: DataConfig, seed: int, index: int) -> list[Copy]:
    """The copies of training row ``index``; none when augmentation is off or the row has no text to change."""
    text = fields.get(cfg.text_field)
    ops = cfg.augment_ops
    if not ops or not isinstance(text, str) or not text.split():
        return []
    copies = []
    for copy in range(cfg.augment_copies):
        rng = random.Random(f"augment:{seed}:{index}:{copy}")  # str seeds hash with sha512: stable everywhere
        op = rng.choice(ops)
        words = OPERATIONS[op](text.split(), cfg.augment_prob, rng)
        copies.append(Copy(op, {**fields, cfg.text_field: rejoin(text, words)}))
    return copies


def rejoin(text: str, words: list[str]) -> str:
    """A copy's words laid out in the original's lines (each line takes as many words as it had, the last the rest):
    a multi-line prompt stays multi-line; other runs of whitespace become one space."""
    lines = text.split("\n")
    out, at = [], 0
    for line in lines[:-1]:
        take = len(line.split())
        out.append(" ".join(words[at : at + take]))
        at += take
    out.append(" ".join(words[at:]))
    return "\n".join(out)
