"""Long-input task generators (design §6): pure functions of (tokenizer, length, n, seed, split, …).

`TASKS` is the registry, the one list of tasks: task name -> `TaskSpec` (its generator of one
example, its default haystack, whether it reads one). `generate` builds a task's
examples for one split and one length; `longctx.lmeval.tasks.glue` turns them into lm-eval datasets.
The needle tasks (passkey, niah_*, vt) fill their prompts from a haystack (`HAYSTACKS`: `noise`,
`essay`, or `paul-graham`, fetched with `longctx fetch paul-graham-essays`) and record in each
example's `extra` which one (`haystack`) and whether its filler outran the pool and repeated
(`haystack_repeated`); cwe, fwe and mqar use no haystack and record neither.

A length L means the whole request fits in L tokens: special tokens (a BOS the model's tokenizer
adds) + prompt + answer for the log-likelihood form, + the generation budget (`max_gen_toks`) for
the generation form. A request has between L − max(8, L/200) and L tokens, so every L up to a
model's position limit runs there.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from longctx.core.errors import LongctxError, choice_error
from longctx.tasks import extraction, mqar, niah, vt
from longctx.tasks.common import (
    HAYSTACKS,
    SPLITS,
    Example,
    TooShort,
    check_split,
    example_rng,
    pad_into_band,
    tolerance,
)
from longctx.tasks.counting import TokenCounter


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: `generator(count, budget, rng, split, haystack, depth)` makes one example whose
    prompt fills `budget` tokens; `haystack` is the default filler; `uses_haystack` False for the
    tasks that make their own filler (cwe, fwe, mqar: they ignore the haystack and record none)."""

    name: str
    generator: Callable[..., Example]
    haystack: str = "noise"
    uses_haystack: bool = True


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("passkey", functools.partial(niah.generate, variant="passkey")),
    TaskSpec("niah_single", functools.partial(niah.generate, variant="single"), "essay"),
    TaskSpec("niah_multikey", functools.partial(niah.generate, variant="multikey"), "essay"),
    TaskSpec("niah_multivalue", functools.partial(niah.generate, variant="multivalue"), "essay"),
    TaskSpec("niah_multiquery", functools.partial(niah.generate, variant="multiquery"), "essay"),
    TaskSpec("vt", vt.generate),
    TaskSpec("cwe", extraction.cwe, uses_haystack=False),
    TaskSpec("fwe", extraction.fwe, uses_haystack=False),
    TaskSpec("mqar", mqar.generate, uses_haystack=False),
)}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_LENGTH = 64
SIZING_TRIES = 4  # prompt sizings per example: the answer's size is known after the first


def _check_depths(depths: Any) -> list[float]:
    if not isinstance(depths, (list, tuple)) or not depths:
        raise LongctxError(f"depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise LongctxError(f"depth {d!r} is not a number in [0, 1]")
    return [float(d) for d in depths]


def haystack_for(haystack: str | dict[str, str] | None, task: str) -> str | None:
    """The haystack a sweep asks for `task`: one name for every task, a {task: name} mapping (tasks not
    in it keep their default), or None (each task's default)."""
    return haystack.get(task) if isinstance(haystack, dict) else haystack


def check_length_value(length: Any) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise LongctxError(f"length {length!r} is not an integer >= {MIN_LENGTH}")
    return length


def generate(task: str, tokenizer: Any, length: int, n: int, seed: int = 0, split: str = "test",
             haystack: str | None = None, depths: list[float] | tuple[float, ...] = DEFAULT_DEPTHS,
             max_gen_toks: int | None = None, special_tokens: int = 0) -> list[Example]:
    """`n` examples of `task` whose whole requests have L − max(8, L/200) … L tokens of `tokenizer`.

    The request is `special_tokens` + prompt + answer (`max_gen_toks` None: log-likelihood form)
    or `special_tokens` + prompt + `max_gen_toks` (generation form). Example i uses depth
    `depths[i % len(depths)]` (for needle tasks) and its own random stream, so the first k examples
    do not depend on n. Same arguments, same examples, in any process. `haystack` None is the
    task's default; `paul-graham` raises a one-line error naming `longctx fetch paul-graham-essays`
    when the essays are not fetched.
    """
    if task not in TASKS:
        raise choice_error("task", task, TASKS)
    spec = TASKS[task]
    haystack = haystack or spec.haystack
    if haystack not in HAYSTACKS:
        raise choice_error("haystack", haystack, HAYSTACKS)
    check_split(split)
    check_length_value(length)
    depths = _check_depths(list(depths))
    if max_gen_toks is not None and (isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int)
                                     or max_gen_toks < 1):
        raise LongctxError(f"max_gen_toks {max_gen_toks!r} is not a positive integer")
    count = TokenCounter(tokenizer)
    out, reserve = [], special_tokens + (max_gen_toks or 0)
    for i in range(n):
        def attempt(budget: int, i: int = i) -> Example:
            rng = example_rng(task, split, seed, length, i)
            return spec.generator(count, budget, rng, split, haystack, depths[i % len(depths)])

        example, reserve = _fit_request(attempt, count, task, length, reserve, max_gen_toks, special_tokens)
        out.append(dataclasses.replace(example, index=i, seed=seed))
    return out


def _fit_request(attempt: Callable[[int], Example], count: TokenCounter, task: str, length: int, reserve: int,
                 max_gen_toks: int | None, special: int) -> tuple[Example, int]:
    """(example, tokens of its request beyond the prompt) with the whole request in the band.

    The prompt is sized to L − `reserve` (a guess: the previous example's), then re-sized for its
    own answer. Where the answer itself depends on the room (a task's ladder of fewer needles or
    words) and the guesses alternate, every reserve between the two is tried."""
    floor, seen, short = length - tolerance(length), [], []
    for _ in range(SIZING_TRIES):
        example, rest = _sized_once(attempt, count, task, length, reserve, max_gen_toks, special)
        if floor <= example.request_tokens <= length:
            return example, rest
        short += [(example, rest)] if example.request_tokens < floor else []
        if rest in seen:
            break
        seen.append(rest)
        reserve = rest
    for reserve in range(min(seen), max(seen) + 1):
        example, rest = _sized_once(attempt, count, task, length, reserve, max_gen_toks, special)
        if floor <= example.request_tokens <= length:
            return example, rest
        short += [(example, rest)] if example.request_tokens < floor else []
    if short:  # a coarse tokenizer and a rung change leave a gap: pad the fullest short prompt
        example, rest = max(short, key=lambda pair: pair[0].request_tokens)
        return _padded(example, count, rest, floor, length, task), rest
    raise LongctxError(f"{task}: cannot size a request within {floor}..{length} tokens with this tokenizer")


def _padded(example: Example, count: TokenCounter, rest: int, floor: int, length: int, task: str) -> Example:
    """`example` with " ." units before its question until the request is in the band (the needle
    depth rescaled: the units follow every needle)."""
    prompt, n_tokens = pad_into_band(example.input, count, floor - rest, length - rest, task)
    return dataclasses.replace(example, input=prompt, n_tokens=n_tokens, request_tokens=n_tokens + rest,
                               depth=round(example.depth * example.n_tokens / n_tokens, 4))


def _sized_once(attempt: Callable[[int], Example], count: TokenCounter, task: str, length: int, reserve: int,
                max_gen_toks: int | None, special: int) -> tuple[Example, int]:
    """The example whose prompt fills L − `reserve`, with its request's size; and the tokens its
    request has beyond the prompt (special tokens + answer, or + generation budget)."""
    try:
        example = attempt(length - reserve)
    except TooShort as err:
        raise TooShort(length, task, err.fixed + reserve, err.minimum + reserve) from None
    answer = count(example.target)
    if max_gen_toks is not None:
        rest = special + max_gen_toks
    elif count.additive:  # no token spans the prompt's end and the answer's leading space
        rest = special + answer
    else:
        rest = special + count(example.input + example.target) - example.n_tokens
    form = "loglikelihood" if max_gen_toks is None else "generate_until"
    return dataclasses.replace(example, max_length=length, target_tokens=answer,
                               request_tokens=example.n_tokens + rest, form=form), rest


__all__ = ["TASKS", "SPLITS", "HAYSTACKS", "Example", "TaskSpec", "generate"]
