"""Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology"): a list of key-value
pairs, then several keys whose values must be recalled, in the order asked."""
from __future__ import annotations

import random
import re
from typing import Callable

from longctx.tasks.common import Example, fit_to_length, measured_depth, split_number, split_words, word_pool

QUERIES = 4


def generate(count: Callable[[str], int], length: int, rng: random.Random, split: str,
             haystack: str, depth: float) -> Example:
    asked = rng.sample(split_words(split), QUERIES)
    answers = [split_number(rng, 4, split) for _ in asked]
    fillers = [w for w in word_pool() if w not in asked]
    seed = rng.randrange(1 << 30)

    r = random.Random(seed)
    keys = r.sample(fillers, len(fillers))
    keys += [f"{w}{i}" for i, w in enumerate(r.choices(fillers, k=max(0, length - len(fillers))))]
    values = [str(r.randint(1000, 9999)) for _ in keys]
    spots = [depth] + [r.random() for _ in asked[1:]]

    def render(n: int) -> str:
        pairs = [f"{k}: {v}" for k, v in zip(keys[:n], values[:n])]
        slots = [min(len(pairs), round(d * len(pairs))) for d in spots]
        for slot, key, value in sorted(zip(slots, asked, answers), key=lambda t: -t[0]):
            pairs.insert(slot, f"{key}: {value}")
        names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        return ("Below is a list of key-value pairs. Memorize them.\n" + "; ".join(pairs) +
                f"\nQuestion: What are the values of {names}, in that order? Answer: The values are")

    prompt, n_tokens = fit_to_length(render, count, length, "mqar")
    where = re.search(rf"(?:\n|; ){asked[0]}: {answers[0]}(?:;|\n| \.)", prompt).start() + 1  # " .": padding
    return Example(task="mqar", split=split, index=0, max_length=length, n_tokens=n_tokens,
                   depth=measured_depth(prompt, where, count, n_tokens), input=prompt,
                   target=" " + ", ".join(answers), outputs=answers, seed=0)
