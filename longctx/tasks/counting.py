"""Counting a prompt's tokens without tokenizing the whole prompt, where that is exact.

Byte-level BPE (GPT-2-style pre-tokenisation), SentencePiece with whitespace splitting and
character tokenizers never merge across a single space between words, so a prompt built as
`prefix + " w1 w2 … wn" + question` costs count(prefix) + Σ count(" wi") + count(question).
`TokenCounter` checks that property once per tokenizer on a probe text and, when it holds, sizes
haystacks from cached per-word counts — one short tokenization per example instead of several
long ones (benchmark P5). When it does not hold, callers fall back to tokenizing whole prompts.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any

from longctx.core.errors import LongctxError
from longctx.tasks.common import TooShort, haystack_words, needle_cuts, needle_order, pool_words, tolerance


class TokenCounter:
    """`counter(text)` is the exact token count (no special tokens); `.additive` says whether
    space-joined words may be counted word by word for this tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cumulative: dict[str, list[int]] = {}
        self.additive = self._probe()

    def __call__(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def many(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _probe(self) -> bool:
        words = [*pool_words("essay")[:300], "The", "magic", "number", "is", "4821937.", "VAR", "QXZ", "=", "a."]
        head, tail = "Remember this text.\n", "\nWhat is it? It is"
        whole = self(head + "".join(" " + w for w in words) + tail)
        return whole == self(head) + sum(self.many([" " + w for w in words])) + self(tail)

    def cumulative(self, kind: str) -> list[int]:
        """Prefix sums of the haystack pool's per-word counts (each word with its leading space)."""
        if kind not in self._cumulative:
            pool = pool_words(kind)
            unique = sorted(set(pool))
            per_word = dict(zip(unique, self.many([" " + w for w in unique])))
            self._cumulative[kind] = [0, *itertools.accumulate(per_word[w] for w in pool)]
        return self._cumulative[kind]

    def window(self, kind: str, offset: int, n: int) -> int:
        """Tokens of `n` haystack words starting at `offset` (wrapping around the pool)."""
        cum = self.cumulative(kind)
        size = len(cum) - 1
        start = offset % size
        laps, rest = divmod(start + n, size)
        return laps * cum[size] + cum[rest] - cum[start]

    def max_words(self, kind: str, offset: int, budget: int) -> int:
        """The most haystack words from `offset` whose tokens fit in `budget`."""
        cum, size = self.cumulative(kind), len(self.cumulative(kind)) - 1
        start = offset % size
        laps = max(0, budget // max(cum[size], 1) - 1)
        n, used = laps * size, laps * cum[size]
        extended = cum + [cum[size] + c for c in cum[1:]] + [2 * cum[size] + c for c in cum[1:]]
        target = extended[start] + (budget - used)
        return n + bisect.bisect_right(extended, target) - 1 - start


__all__ = ["TokenCounter", "fit_haystack"]


def fit_haystack(counter: TokenCounter, prefix: str, needles: list[str], depths: list[float], question: str,
                 kind: str, offset: int, length: int, task: str) -> tuple[str, int, list[float], int]:
    """(prompt, tokens, depth of each needle, haystack words) for `prefix + " " + haystack-with-needles
    + question` sized by word counts alone (requires `counter.additive`)."""

    head, needle_tokens, tail = counter(prefix), counter.many([" " + n for n in needles]), counter(question)
    fixed = head + sum(needle_tokens) + tail
    if fixed > length:
        raise TooShort(length, task, fixed, fixed + tolerance(fixed))
    n = counter.max_words(kind, offset, length - fixed)
    words = haystack_words(kind, n, offset)
    total = fixed + counter.window(kind, offset, n)
    pad, floor = "", length - tolerance(length)
    if total < floor:  # one word jumps over the band: close the gap with " ." units
        dot = counter(" .")
        units = -(-(floor - total) // dot)
        pad, total = " ." * units, total + units * dot
        if total > length:
            raise LongctxError(f"{task}: cannot size a prompt within {floor}..{length} tokens with this tokenizer")
    cuts = needle_cuts(n, words, depths)
    pieces, last, before, depth = [], 0, head, [0.0] * len(needles)
    for i in needle_order(cuts):
        pieces += words[last:cuts[i]] + [needles[i]]
        before += counter.window(kind, offset + last, cuts[i] - last)
        depth[i] = round(before / total, 4)
        before += needle_tokens[i]
        last = cuts[i]
    body = " ".join(pieces + words[last:])
    return prefix + " " + body + pad + question, total, depth, n
