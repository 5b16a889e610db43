"""Needle-in-a-haystack tasks: `passkey` (Mohtashami & Jaggi's pass-key retrieval) and RULER's
`niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery` (Hsieh et al., 2024).

A needle binds a key word to a number; the prompt ends where the answer starts, so the answer is
both the log-likelihood target and the string the generation form must produce.
"""
from __future__ import annotations

import random
from typing import Callable

from longctx.core.errors import LongctxError
from longctx.tasks.common import (Example, fit_filler, haystack_extra, haystack_words, insert_at_depths,
                                  measured_depth, split_number, split_words)
from longctx.tasks.counting import fit_haystack

NIAH_PREFIX = "Memorize the magic numbers hidden in this text.\n"
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.\n")
# Needles of the multi-needle variants (multikey: 1 + distractors; multivalue: values; multiquery:
# queries), most first; fewer only where the prompt cannot hold more (short lengths, char tokenizers).
NEEDLE_LADDER = (4, 3, 2)


def _needle(key: str, value: str) -> str:
    return f"The magic number for {key} is {value}."


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f" and {keys[-1]}"


def _layout(variant: str, rng: random.Random, split: str, depth: float, n: int) -> dict:
    """Needles, their depths, the queried keys and the answers of one example (`n` needles)."""
    words = split_words(split)
    if variant == "passkey":
        key = split_number(rng, 5, split)
        return {"needles": [f"The pass key is {key}. Remember it. {key} is the pass key."], "depths": [depth],
                "question": "\nWhat is the pass key? The pass key is", "answers": [key], "first": 0}
    if variant == "single":
        keys, values = rng.sample(words, 1), [split_number(rng, 7, split)]
    elif variant == "multivalue":
        keys = rng.sample(words, 1) * n
        values = [split_number(rng, 7, split) for _ in range(n)]
    else:  # multikey, multiquery
        keys, values = rng.sample(words, n), [split_number(rng, 7, split) for _ in range(n)]
    later = [rng.random() for _ in range(len(keys) - 1)]
    if variant == "multivalue":  # the other values follow the first, so the example's depth is `depth`
        later = [depth + (1 - depth) * d for d in later]
    depths = [depth] + later
    needles = [_needle(k, v) for k, v in zip(keys, values)]
    if variant == "multivalue":  # answers in order of appearance; depth of the first one
        order = sorted(range(n), key=lambda i: depths[i])
        answers, first = [values[i] for i in order], order[0]
        question = f"\nWhat are all the magic numbers for {keys[0]}? The magic numbers for {keys[0]} are"
    elif variant == "multiquery":
        asked = rng.sample(range(n), n)
        answers, first = [values[i] for i in asked], asked[0]
        depths[first], depths[0] = depths[0], depths[first]
        names = _join_keys([keys[i] for i in asked])
        question = f"\nWhat are the magic numbers for {names}, in that order? They are"
    else:
        answers, first = [values[0]], 0
        question = f"\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is"
    return {"needles": needles, "depths": depths, "question": question, "answers": answers, "first": first,
            "values": values}


def generate(count: Callable[[str], int], length: int, rng: random.Random, split: str, haystack: str,
             depth: float, variant: str) -> Example:
    """One example of the NIAH `variant` (`passkey`, `single`, `multikey`, `multivalue`, `multiquery`):
    the multi-needle variants step down their needle ladder until the prompt fits `length`."""
    task = "passkey" if variant == "passkey" else f"niah_{variant}"
    ladder = NEEDLE_LADDER if variant in ("multikey", "multivalue", "multiquery") else (1,)
    for n_needles in ladder:
        try:
            return _sized(variant, task, count, length, random.Random(rng.random()), split, haystack,
                          depth, n_needles)
        except LongctxError:
            if n_needles == ladder[-1]:
                raise
    raise AssertionError("unreachable")


def _sized(variant: str, task: str, count: Callable[[str], int], length: int, rng: random.Random,
           split: str, haystack: str, depth: float, n_needles: int) -> Example:
    spec = _layout(variant, rng, split, depth, n_needles)
    prefix = PASSKEY_PREFIX if variant == "passkey" else NIAH_PREFIX
    offset = rng.randrange(1 << 20)
    if getattr(count, "additive", False):  # sized from per-word counts (longctx.tasks.counting)
        prompt, n_tokens, depths, n_words = fit_haystack(count, prefix, spec["needles"], spec["depths"],
                                                         spec["question"], haystack, offset, length, task)
    else:
        def render(n: int) -> str:
            body = insert_at_depths(haystack_words(haystack, n, offset), spec["needles"], spec["depths"])
            return prefix + " " + body + spec["question"]

        prompt, n_tokens, n_words = fit_filler(render, count, length, task)
        depths = [measured_depth(prompt, prompt.index(nd), count, n_tokens) for nd in spec["needles"]]
    if variant == "multivalue":  # answers in order of appearance in the prompt itself
        order = sorted(range(len(spec["needles"])), key=lambda i: prompt.index(spec["needles"][i]))
        spec["answers"], spec["first"] = [spec["values"][i] for i in order], order[0]
    return Example(task=task, split=split, index=0, max_length=length, n_tokens=n_tokens,
                   depth=depths[spec["first"]], input=prompt,
                   target=" " + ", ".join(spec["answers"]), outputs=spec["answers"], seed=0,
                   extra={"needles": len(spec["needles"]), **haystack_extra(haystack, n_words)})
