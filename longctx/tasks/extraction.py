"""Aggregation tasks of RULER (Hsieh et al., 2024): common words extraction (`cwe`: a numbered
list in which a few words recur several times and the rest once) and frequent words extraction
(`fwe`: coded words with Zipf-like counts; name the three most frequent).

Unlike RULER's generators these size themselves at any length ≥ 256: the number of common words
and their repeats shrink for short prompts, so a short length never divides by zero or loops.
"""
from __future__ import annotations

import random
import string
from typing import Callable

from longctx.core.errors import LongctxError
from longctx.tasks.common import SPLITS, Example, fit_to_length, split_words, word_pool

# (common words, repeats of each) from most to least demanding; the first that fits is used.
CWE_LADDER = ((10, 6), (5, 4), (3, 3), (2, 2))
FWE_TOP = 3


def _numbered(items: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))


def _rare_words(rng: random.Random, exclude: list[str], n: int) -> list[str]:
    """`n` distinct words, none in `exclude`: the shipped pool shuffled, then coded words."""
    words = [w for w in word_pool() if w not in exclude]
    rng.shuffle(words)
    return words[:n] + _coded(rng, max(0, n - len(words)), taken=set(words) | set(exclude))


def cwe(count: Callable[[str], int], length: int, rng: random.Random, split: str,
        haystack: str, depth: float) -> Example:
    """Common words extraction; the answer lists the common words in order of first appearance."""
    seed = rng.randrange(1 << 30)
    for n_common, repeats in CWE_LADDER:
        common = rng.sample(split_words(split), n_common)
        rare = _rare_words(random.Random(seed), common, length)  # every rare word appears once

        def render(n: int) -> str:
            entries = common * repeats + rare[:n]
            random.Random(seed + n).shuffle(entries)
            return (f"Words:\n{_numbered(entries)}\nQuestion: Which {n_common} words appear most often above, "
                    f"in order of first appearance? Answer:")
        last = (n_common, repeats) == CWE_LADDER[-1]
        try:
            prompt, n_tokens = fit_to_length(render, count, length, "cwe", upper=len(rare))
        except LongctxError:
            if last:
                raise
            continue
        entries = sum(w != "." for w in prompt.split("\n")[1].split()) // 2  # " ." units pad, not entries
        if entries - n_common * repeats < n_common and not last:
            continue  # fewer distractors than common words: a smaller rung leaves room for more
        order = _order_in(prompt, common)
        return Example(task="cwe", split=split, index=0, max_length=length, n_tokens=n_tokens, depth=0.0,
                       input=prompt, target=" " + " ".join(order), outputs=order, seed=0,
                       extra={"common_words": n_common, "repeats": repeats})
    raise AssertionError("unreachable")


def _order_in(prompt: str, words: list[str]) -> list[str]:
    tokens = prompt.split("\n")[1].split()
    return sorted(words, key=tokens.index)


def _coded(rng: random.Random, n: int, taken: set[str] | None = None) -> list[str]:
    """`n` distinct random five-letter lowercase strings, none of them in `taken`."""
    seen, out = set(taken or ()), []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def fwe(count: Callable[[str], int], length: int, rng: random.Random, split: str,
        haystack: str, depth: float) -> Example:
    """Frequent words extraction: the top three coded words, most frequent first."""
    seed = rng.randrange(1 << 30)
    top = [w[:-1] + "xyz"[SPLITS.index(split)] for w in _coded(rng, FWE_TOP)]  # split-disjoint answers

    others = _coded(random.Random(seed), length // 2 + 1, taken=set(top))

    def render(n: int) -> str:
        counts = [max(2, n // (5 * (i + 2))) + FWE_TOP - i for i in range(FWE_TOP)]  # strictly decreasing
        entries = [w for w, c in zip(top, counts) for _ in range(c)]
        entries += [others[i // 2] for i in range(n)]  # every other word at most twice
        random.Random(seed + n).shuffle(entries)
        return (f"Coded text:\n{' '.join(entries)}\nQuestion: Which three coded words appear most often above, "
                "most frequent first? Answer:")

    prompt, n_tokens = fit_to_length(render, count, length, "fwe")
    return Example(task="fwe", split=split, index=0, max_length=length, n_tokens=n_tokens, depth=0.0,
                   input=prompt, target=" " + " ".join(top), outputs=top, seed=0)

