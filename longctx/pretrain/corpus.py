"""Training text for the embedded base: prose that ships with Python, plus synthetic sequences
that teach copying and retrieval (so adapters fine-tuned on long-input tasks have a base that
can already look things up in its context).

Everything is a pure function of an explicit seed; nothing depends on the environment's order.
The pass-key format of the evaluation tasks is deliberately absent.
"""
from __future__ import annotations

import codecs
import contextlib
import io
import random
import re

# Synthetic document kinds and their shares: copying dominates, since induction (find the
# earlier occurrence, continue from it) is what recall and needle retrieval build on.
SYNTHETIC_KINDS = {"copy": 0.5, "recall": 0.3, "needle": 0.2}


def python_prose() -> str:
    """English prose shipped with CPython: the pydoc topic pages and the Zen of Python."""
    import pydoc_data.topics as topics

    pages = [topics.topics[key] for key in sorted(topics.topics)]
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    return "\n\n".join([zen, *pages])


def word_list(text: str, limit: int = 2000) -> list[str]:
    """The `limit` most frequent lowercase alphabetic words of `text` (ties broken alphabetically)."""
    counts: dict[str, int] = {}
    for word in re.findall(r"\b[a-z]{3,10}\b", text.lower()):
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:limit]


def _number(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def copy_document(rng: random.Random, words: list[str]) -> str:
    """A random span of words and numbers, then the instruction to repeat it, then the span."""
    span = " ".join(rng.choice(words) if rng.random() < 0.6 else _number(rng, rng.randint(2, 5))
                    for _ in range(rng.randint(4, 30)))
    repeats = " ".join(f"Again: {span}." for _ in range(rng.randint(1, 5)))  # most tokens copyable
    return f"Sequence: {span}. Repeat the sequence: {span}. {repeats}".strip()


def recall_document(rng: random.Random, words: list[str]) -> str:
    """Key-value pairs (word -> number), then several queries answered from the list."""
    keys = rng.sample(words, rng.randint(4, 32))
    values = {k: _number(rng, rng.randint(3, 5)) for k in keys}
    pairs = "; ".join(f"{k} = {values[k]}" for k in keys)
    queries = " ".join(f"The value of {k} is {values[k]}." for k in rng.sample(keys, min(len(keys), rng.randint(1, 4))))
    return f"Table: {pairs}. {queries}"


def needle_document(rng: random.Random, words: list[str], prose: str) -> str:
    """A number stated inside a window of prose and asked for after it."""
    start = rng.randrange(0, max(1, len(prose) - 2000))
    window = prose[start:start + rng.randint(200, 1800)]
    label, number = rng.choice(words), _number(rng, rng.randint(4, 6))
    cut = rng.randint(0, len(window))
    return (f"{window[:cut]} Note that the {label} code is {number}. {window[cut:]} "
            f"Question: what is the {label} code? Answer: the {label} code is {number}.")


def synthetic_documents(n: int, seed: int, words: list[str], prose: str) -> list[str]:
    """`n` synthetic documents, kinds drawn by their shares, from `random.Random(seed)`."""
    rng = random.Random(seed)
    makers = {"copy": lambda: copy_document(rng, words), "recall": lambda: recall_document(rng, words),
              "needle": lambda: needle_document(rng, words, prose)}
    kinds = rng.choices(list(SYNTHETIC_KINDS), weights=list(SYNTHETIC_KINDS.values()), k=n)
    return [makers[kind]() for kind in kinds]
