"""Training rows of the embedded bases' recipe (`longctx.pretrain.build`): synthetic blocks on random
tokens (copying, multi-query associative recall), associative recall in the words of the recall
probe, the text document pool, and the datasets that interleave them in a fixed, seeded order
(iterable, so HF Trainer does not reshuffle them)."""
from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from longctx.pretrain.corpus import synthetic_documents


def copy_blocks(n: int, length: int, copies: int, low: int, high: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` blocks of random tokens in [low, high) where `copies` spans reappear at random later offsets.

    Returns (input_ids, labels), both (n, length); labels are -100 except on copied tokens after
    a span's first (the only positions an induction circuit can predict).
    """
    ids = torch.randint(low, high, (n, length), generator=gen)  # (n, T)
    labels = torch.full_like(ids, -100)
    pos = torch.arange(length).expand(n, length)  # (n, T)
    for _ in range(copies):
        span = torch.randint(8, max(9, length // 8), (n, 1), generator=gen)  # (n, 1)
        src = (torch.rand(n, 1, generator=gen) * (length - 2 * span)).long()  # (n, 1)
        dst = src + span + (torch.rand(n, 1, generator=gen) * (length - 2 * span - src + 1)).long()
        inside = (pos >= dst) & (pos < dst + span)  # (n, T)
        ids = ids.gather(1, torch.where(inside, pos - dst + src, pos))
        labels = torch.where(inside & (pos > dst), ids, torch.where(inside, -100, labels))
    return ids, torch.where(labels >= 0, ids, -100)


def mqar_blocks(n: int, length: int, pairs: int, low: int, high: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` MQAR blocks (Zoology): `pairs` distinct keys from [low, mid) each followed by its value
    from [mid, high), then (key, value) queries drawn from them until `length`; labels only on the
    queried values (the one thing recall predicts). Returns (input_ids, labels), both (n, length)."""
    mid = (low + high) // 2
    keys = torch.rand(n, mid - low, generator=gen).argsort(-1)[:, :pairs] + low  # (n, P) distinct per row
    values = torch.randint(mid, high, (n, pairs), generator=gen)  # (n, P)
    asked = torch.randint(0, pairs, (n, (length - 2 * pairs + 1) // 2), generator=gen)  # (n, Q)
    table = torch.stack([keys, values], -1).reshape(n, 2 * pairs)  # (n, 2P): k1 v1 k2 v2 ...
    queries = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).reshape(n, -1)  # (n, 2Q)
    ids = torch.cat([table, queries], 1)[:, :length]  # (n, T)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * pairs + 1::2] = ids[:, 2 * pairs + 1::2]
    return ids, labels


TABLE_PAIR_TOKENS = 11  # an upper bound on the tokens of one "key = 1234;" entry


def table_blocks(n: int, length: int, top: int, words: list[str], tokenizer: Any,
                 rng: random.Random) -> tuple[Tensor, Tensor]:
    """`n` rows of associative recall in words, the recall probe's format (`longctx.pretrain.probes`):
    "Table: k1 = 1234; ... kP = 5678. The value of kq is 1234. The value of ..." with P drawn from
    4..`top` (capped so the table leaves room for queries), queries drawn from the table until the
    row is full. Labels only on each answer (the space and the four digits after "is"): MQAR's
    training signal (Zoology) on the tokens the text probes ask for. Returns (ids, labels), (n, T).

    Rows are assembled from separately tokenized pieces (each word, digit and punctuation mark is
    its own pre-token, so this equals tokenizing the whole text; the tests check it): 0.16 s per
    512 rows of 512 tokens on this project's CPU against 0.55 s tokenizing the text with offsets,
    work that sits on the training step's path (the rows are made in the trainer's process).
    """
    cache: dict[str, list[int]] = {}
    piece = lambda text: cache.get(text) or cache.setdefault(  # noqa: E731
        text, tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)  # (n, T)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for row in range(n):
        pairs = rng.randint(4, max(4, min(top, (length - 4 * TABLE_PAIR_TOKENS) // TABLE_PAIR_TOKENS)))
        keys = rng.sample(words, pairs)
        values = {k: [piece(" ")[0], *(piece(d)[0] for d in rng.choices("0123456789", k=4))] for k in keys}
        tokens = list(piece("Table:"))
        for i, key in enumerate(keys):
            tokens = tokens + piece(" " + key) + piece(" =") + values[key] + piece(";" if i < pairs - 1 else ".")
        mask = [False] * len(tokens)
        while len(tokens) < length:
            key = rng.choice(keys)
            asked = piece(" The value of") + piece(" " + key) + piece(" is")
            tokens += asked + values[key] + piece(".")
            mask += [False] * len(asked) + [True] * 5 + [False]
        row_ids = torch.tensor(tokens[:length])  # (T,)
        ids[row] = row_ids
        labels[row] = torch.where(torch.tensor(mask[:length]), row_ids, -100)
    return ids, labels


def curriculum_levels(top: int) -> list[int]:
    """The curriculum's pair counts: 4, 8, ... doubling, ending at `top`."""
    levels = [4]
    while levels[-1] * 2 < top:
        levels.append(levels[-1] * 2)
    return levels + [top] if top > 4 else [top]


class RecallCurriculum(torch.utils.data.IterableDataset):
    """Stage 0's rows in a fixed order: MQAR blocks whose pair count grows level by level; each
    group of rows draws its count uniformly up to the current level, so the short tables are not
    forgotten. Levels take equal shares of the stage, or (`adaptive`) the trainer moves
    `level_index` on when held-out recall at the current level is good enough: MQAR is learned in
    a sudden phase change whose step is not known in advance (Zoology, arXiv 2312.04927)."""

    def __init__(self, rows: int, length: int, top: int, vocab: tuple[int, int], seed: int,
                 adaptive: bool = False) -> None:
        self.rows, self.length, self.levels, self.vocab, self.seed = rows, length, curriculum_levels(top), vocab, seed
        self.adaptive, self.level_index = adaptive, 0  # adaptive: raised by the trainer (one sequence of levels)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen, group = torch.Generator().manual_seed(self.seed), 64
        for start in range(0, self.rows, group):
            share = start * len(self.levels) // self.rows  # equal shares of the stage
            level = self.levels[self.level_index if self.adaptive else min(len(self.levels) - 1, share)]
            pairs = int(torch.randint(min(4, level), level + 1, (1,), generator=gen))
            ids, labels = mqar_blocks(min(group, self.rows - start), self.length, pairs, *self.vocab, gen)
            yield from ({"input_ids": i, "labels": l} for i, l in zip(ids, labels))


def document_pool(pool_tokens: int, prose_share: float, seed: int, prose: str, words: list[str],
                  tokenizer: Any) -> Tensor:
    """Token stream (documents joined by EOS) of `pool_tokens`, deterministic in the seed: synthetic
    documents (`longctx.pretrain.corpus`), a `prose_share` of them replaced by windows of prose."""

    rng = random.Random(seed + 1)
    stream: list[int] = []
    batch_seed = seed * 1000
    while len(stream) < pool_tokens:
        docs = synthetic_documents(256, batch_seed, words, prose)
        batch_seed += 1
        for i in range(len(docs)):
            if rng.random() < prose_share:
                start = rng.randrange(0, len(prose) - 4000)
                docs[i] = prose[start:start + rng.randint(500, 4000)]
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids + [tokenizer.eos_token_id])
    return torch.tensor(stream[:pool_tokens], dtype=torch.long)


class MixedBlocks(torch.utils.data.IterableDataset):
    """Training rows in a fixed order (iterable, so Trainer does not reshuffle them).

    Each row is a synthetic block (`make_blocks(n, gen)` -> (ids, labels), both (n, length)) with
    probability `synthetic_share`, else the next `length` tokens of the (cycled) document pool.
    Generated lazily in groups, from one seeded generator.
    """

    def __init__(self, rows: int, length: int, synthetic_share: float,
                 make_blocks: Callable[[int, torch.Generator], tuple[Tensor, Tensor]], pool: Tensor | None,
                 seed: int) -> None:
        self.rows, self.length, self.synthetic_share = rows, length, synthetic_share
        self.make_blocks, self.pool, self.seed = make_blocks, pool, seed

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen, offset, group = torch.Generator().manual_seed(self.seed), 0, 512
        for start in range(0, self.rows, group):
            n = min(group, self.rows - start)
            ids, labels = self.make_blocks(n, gen)  # (n, T) each
            use_text = torch.rand(n, generator=gen) >= self.synthetic_share  # (n,)
            for i in range(n):
                if self.pool is not None and bool(use_text[i]):
                    if offset + self.length > len(self.pool):
                        offset = 0
                    text = self.pool[offset:offset + self.length]
                    offset += self.length
                    yield {"input_ids": text, "labels": text}
                else:
                    yield {"input_ids": ids[i], "labels": labels[i]}
