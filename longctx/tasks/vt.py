"""Variable tracking (RULER's `vt`, Hsieh et al., 2024): a chain of assignments
`VAR A = 12345`, `VAR B = VAR A`, … hidden in a haystack; the answer is every name bound to the
value, in the order of the chain."""
from __future__ import annotations

import random
import string
from typing import Callable

from longctx.tasks.common import (Example, fit_filler, haystack_extra, haystack_words, insert_at_depths,
                                  measured_depth, split_number)
from longctx.tasks.counting import fit_haystack

PREFIX = "Track the variable assignments in this text.\n"
HOPS = 4  # assignments after the first: five names in all


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def generate(count: Callable[[str], int], length: int, rng: random.Random, split: str,
             haystack: str, depth: float) -> Example:
    value = split_number(rng, 5, split)
    names = _names(rng, HOPS + 1)
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, HOPS + 1)]
    later = sorted(depth + (1 - depth) * rng.random() for _ in range(HOPS))  # the chain keeps its order
    depths = [depth, *later]
    question = f"\nWhich variables hold the value {value}, in order? They are:"
    offset = rng.randrange(1 << 20)
    if getattr(count, "additive", False):  # sized from per-word counts (longctx.tasks.counting)
        prompt, n_tokens, where, n_words = fit_haystack(count, PREFIX, statements, depths, question, haystack,
                                                        offset, length, "vt")
        depth_first = where[0]
    else:
        def render(n: int) -> str:
            return PREFIX + " " + insert_at_depths(haystack_words(haystack, n, offset), statements, depths) + question

        prompt, n_tokens, n_words = fit_filler(render, count, length, "vt")
        depth_first = measured_depth(prompt, prompt.index(statements[0]), count, n_tokens)
    return Example(task="vt", split=split, index=0, max_length=length, n_tokens=n_tokens, depth=depth_first,
                   input=prompt, target=" " + " ".join(names), outputs=names, seed=0,
                   extra=haystack_extra(haystack, n_words))
