"""What every long-input task shares: the example record, exact sizing in the evaluated model's
tokens, haystacks, split-disjoint needles and depth placement (design §6).

Sizing: a task renders its prompt from a filler count `n` (haystack words, list entries, pairs);
`fit_to_length` finds the largest `n` whose prompt has at most B tokens by interpolation search
on the real tokenizer, stopping as soon as the prompt is within the tolerance
B − max(8, B/200) … B. The budget B is the length L less what the rest of the request takes
(`longctx.tasks.generate`: special tokens and the answer, or the generation budget), so that the
whole request has L − max(8, L/200) … L tokens. Filler is added word by word, so one step is a few tokens even for a
character-level tokenizer. Everything is a pure function of (tokenizer, length, seed, split).

Haystacks (the filler of the needle tasks): `noise` (RULER's five sentences, 19 words), `essay`
(Python documentation shipped in `assets/text`, 22K words) and `paul-graham` (the 49 essays of the
original needle-in-a-haystack test and RULER, 112K words, files in name order; fetched once with
`longctx fetch paul-graham-essays`, never shipped, read only when used). Filler longer than its pool
wraps around and repeats text the model has already read; each example records its haystack and
whether it repeated (`haystack_extra`).
"""
from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from longctx.core import fetch
from longctx.core.errors import LongctxError, choice_error
from longctx.core.resources import assets_dir

TEXT_DIR = assets_dir() / "text"
SPLITS = ("train", "validation", "test")
HAYSTACKS = ("noise", "essay", "paul-graham")
# RULER's noise haystack: the same five sentences repeated.
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")


@dataclass
class Example:
    """One prompt: `input` ends where the answer starts; `target` is the log-likelihood form's
    continuation (greedy-exact match), `outputs` the strings the generation form must contain."""

    task: str
    split: str
    index: int
    max_length: int  # the requested length L: the whole request fits in L tokens
    n_tokens: int  # the prompt's (`input`'s) exact length in the evaluated tokenizer, no special tokens
    depth: float  # fraction of the prompt's tokens before the (first queried) needle
    input: str
    target: str
    outputs: list[str]
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)
    target_tokens: int = 0  # the answer's length in the evaluated tokenizer (for per-token NLL)
    # The whole request L bounds: special tokens + prompt + answer (form "loglikelihood") or
    # + the generation budget max_gen_toks (form "generate_until"); L − tolerance(L) ≤ it ≤ L.
    request_tokens: int = 0
    form: str = "loglikelihood"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tolerance(length: int) -> int:
    """How far below L a prompt may fall (design §6): max(8, L/200) tokens."""
    return max(8, length // 200)


class TooShort(LongctxError):
    """A length below what a task's prompt (or request) needs without any filler."""

    def __init__(self, length: int, task: str, fixed: int, minimum: int) -> None:
        self.fixed, self.minimum = fixed, minimum
        super().__init__(f"length {length} is too short for {task}: its request without filler already has "
                         f"{fixed} tokens (use a length of at least {minimum})")


def fit_to_length(render: Callable[[int], str], count: Callable[[str], int], length: int,
                  task: str, upper: int = 1 << 22) -> tuple[str, int]:
    """(prompt, tokens) for a filler count whose prompt has between L − tolerance and L tokens
    (see `fit_filler`)."""
    text, tokens, _ = fit_filler(render, count, length, task, upper)
    return text, tokens


def fit_filler(render: Callable[[int], str], count: Callable[[str], int], length: int,
               task: str, upper: int = 1 << 22) -> tuple[str, int, int]:
    """(prompt, tokens, filler count) for a filler count whose prompt has between L − tolerance and L tokens.

    Interpolation search over `n` (monotone: more filler, more tokens), aiming at the middle of
    the tolerance band; usually two or three tokenizations. Where one filler step jumps over the
    whole band, " ." units before the question close the gap. Raises when even `n = 0` is too long.
    """
    floor = length - tolerance(length)
    aim = (floor + length) / 2
    lo_n, lo_text = 0, render(0)
    lo_c = base = count(lo_text)
    if base > length:
        raise TooShort(length, task, base, base + tolerance(base))
    rate = max((count(render(64)) - base) / 64, 1e-3)  # tokens per filler unit
    hi_n = hi_c = None
    while lo_c < floor:
        if hi_n is None:
            guess = lo_n + max(1, round((aim - lo_c) / rate))
        else:
            guess = lo_n + round((hi_n - lo_n) * (aim - lo_c) / max(hi_c - lo_c, 1))
            guess = min(max(guess, lo_n + 1), hi_n - 1)
        if guess > upper:
            raise LongctxError(f"{task} cannot fill {length} tokens (filler limit {upper} reached)")
        text = render(guess)
        c = count(text)
        if c <= length:
            lo_n, lo_text, lo_c = guess, text, c
            rate = max((c - base) / guess, 1e-3)
        else:
            hi_n, hi_c = guess, c
        if hi_n is not None and hi_n - lo_n <= 1:
            break
    if lo_c < floor:  # one filler step jumps over the band (long words, character tokenizers)
        lo_text, lo_c = pad_into_band(lo_text, count, floor, length, task)
    return lo_text, lo_c, lo_n


def pad_into_band(text: str, count: Callable[[str], int], floor: int, length: int, task: str) -> tuple[str, int]:
    """Insert " ." units before the prompt's last line (the question) until it is in the band."""
    cut = text.rfind("\n")
    for k in range(1, 4 * (length - floor) + 1):
        padded = text[:cut] + " ." * k + text[cut:]
        c = count(padded)
        if floor <= c <= length:
            return padded, c
        if c > length:
            break
    raise LongctxError(f"{task}: cannot size a prompt within {floor}..{length} tokens with this tokenizer")


@functools.lru_cache(maxsize=None)
def word_pool() -> tuple[str, ...]:
    """The project's key words (sorted, shipped in `assets/text/words.txt`)."""
    return tuple((TEXT_DIR / "words.txt").read_text().split())


def split_words(split: str) -> list[str]:
    """Key words of one split: the pool dealt round-robin into three disjoint parts."""
    return list(word_pool()[SPLITS.index(check_split(split))::len(SPLITS)])


def split_number(rng: random.Random, digits: int, split: str) -> str:
    """A `digits`-digit number (no leading zero) whose residue mod 3 is the split's index, so
    no value occurs in two splits."""
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    value = rng.randint(low, high - 3)
    value += (SPLITS.index(split) - value) % 3
    return str(value)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise choice_error("split", split, SPLITS)
    return split


@functools.lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
    return tuple((TEXT_DIR / "essay.txt").read_text().split())


@functools.lru_cache(maxsize=None)
def _noise_words() -> tuple[str, ...]:
    return tuple(NOISE.split())


def _paul_graham_words() -> tuple[str, ...]:
    """The fetched essays' words; `fetch.require` raises the one-line "run `longctx fetch …`" error
    when they are absent (checked on every use, so a changed `$LONGCTX_CACHE` is honoured)."""
    return _essays_in(fetch.require(fetch.ESSAYS.name))


@functools.lru_cache(maxsize=None)
def _essays_in(directory: Path) -> tuple[str, ...]:
    """Words of every `*.txt` in `directory`, files in sorted name order, each split on whitespace."""
    return tuple(word for path in sorted(directory.glob("*.txt")) for word in path.read_text(encoding="utf-8").split())


_POOLS: dict[str, Callable[[], tuple[str, ...]]] = {"noise": _noise_words, "essay": _essay_words,
                                                    "paul-graham": _paul_graham_words}


def pool_words(kind: str) -> tuple[str, ...]:
    """All words of one haystack (`HAYSTACKS`), in order; `paul-graham` is read on first use."""
    if kind not in HAYSTACKS:
        raise choice_error("haystack", kind, HAYSTACKS)
    return _POOLS[kind]()


def haystack_words(kind: str, n: int, offset: int = 0) -> list[str]:
    """`n` words of a haystack, starting at `offset` (wrapping around)."""
    pool = pool_words(kind)
    start = offset % len(pool)
    reps = (start + n) // len(pool) + 1
    return list((pool * reps)[start:start + n])


def haystack_extra(kind: str, n: int) -> dict[str, Any]:
    """What an example records of its filler: the haystack's name and whether its `n` words are more
    than the pool holds (`haystack_repeated`: text the model has already read comes again)."""
    return {"haystack": kind, "haystack_repeated": n > len(pool_words(kind))}


def needle_cuts(n_words: int, words: list[str], depths: list[float]) -> list[int]:
    """Word index before which each needle goes: its depth (a fraction of the words), snapped
    back to the preceding sentence end when one is within 30 words."""
    cuts = []
    for depth in depths:
        cut = round(depth * n_words)
        for back in range(min(30, cut) + 1):
            if cut - back == 0 or words[cut - back - 1].endswith("."):
                cut -= back
                break
        cuts.append(cut)
    return cuts


def needle_order(cuts: list[int]) -> list[int]:
    """Needle indices in the order they appear in the text."""
    return sorted(range(len(cuts)), key=lambda i: (cuts[i], i))


def insert_at_depths(words: list[str], needles: list[str], depths: list[float]) -> str:
    """`words` joined by spaces with each needle inserted at its depth (see `needle_cuts`)."""
    cuts = needle_cuts(len(words), words, depths)
    pieces, last = [], 0
    for i in needle_order(cuts):
        pieces += words[last:cuts[i]] + [needles[i]]
        last = cuts[i]
    return " ".join(pieces + words[last:])


def example_rng(task: str, split: str, seed: int, length: int, index: int) -> random.Random:
    """The random stream of one example: independent of every other example's."""
    return random.Random(f"{task}|{split}|{seed}|{length}|{index}")


def measured_depth(prompt: str, offset: int, count: Callable[[str], int], n_tokens: int) -> float:
    """Fraction of the prompt's tokens before the needle starting at character `offset` (the
    space that precedes a needle counts as the needle's)."""
    return round(count(prompt[:offset].removesuffix(" ")) / max(n_tokens, 1), 4)

