"""Long-input task generators (SPEC §6): pure functions of (tokenizer, length, n, seed, split, …).

`TASKS` is the registry: task name -> generator of one example. `generate` builds a task's
examples for one split and one length; `longctx.tasks.lmeval` turns them into lm-eval datasets.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from longctx.errors import LongctxError, choice_error
from longctx.tasks import extraction, mqar, niah, vt
from longctx.tasks.common import HAYSTACKS, SPLITS, Example, check_split, example_rng
from longctx.tasks.counting import TokenCounter

# name -> (generator, default haystack)
TASKS: dict[str, tuple[Callable[..., Example], str]] = {
    "passkey": (niah.make("passkey"), "noise"),
    "niah_single": (niah.make("single"), "essay"),
    "niah_multikey": (niah.make("multikey"), "essay"),
    "niah_multivalue": (niah.make("multivalue"), "essay"),
    "niah_multiquery": (niah.make("multiquery"), "essay"),
    "vt": (vt.generate, "noise"),
    "cwe": (extraction.cwe, "noise"),
    "fwe": (extraction.fwe, "noise"),
    "mqar": (mqar.generate, "noise"),
}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_LENGTH = 64


def _check_depths(depths: Any) -> list[float]:
    if not isinstance(depths, (list, tuple)) or not depths:
        raise LongctxError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise LongctxError(f"depth {d!r} is not a number in [0, 1]")
    return [float(d) for d in depths]


def check_length_value(length: Any) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise LongctxError(f"length {length!r} is not an integer >= {MIN_LENGTH}")
    return length


def generate(task: str, tokenizer: Any, length: int, n: int, seed: int = 0, split: str = "test",
             haystack: str | None = None, depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS) -> list[Example]:
    """`n` examples of `task` whose prompts have L − max(8, L/200) … L tokens of `tokenizer`.

    Example i uses depth `depths[i % len(depths)]` (for needle tasks) and its own random stream,
    so the first k examples do not depend on n. Same arguments, same examples, in any process.
    """
    if task not in TASKS:
        raise choice_error("task", task, TASKS)
    make, default_haystack = TASKS[task]
    haystack = haystack or default_haystack
    if haystack not in HAYSTACKS:
        raise choice_error("haystack", haystack, HAYSTACKS)
    check_split(split)
    check_length_value(length)
    depths = _check_depths(list(depths))
    count = TokenCounter(tokenizer)
    out = []
    for i in range(n):
        rng = example_rng(task, split, seed, length, i)
        example = make(count, length, rng, split, haystack, depths[i % len(depths)])
        out.append(dataclasses.replace(example, index=i, seed=seed, target_tokens=count(example.target)))
    return out


__all__ = ["TASKS", "SPLITS", "HAYSTACKS", "Example", "generate"]
