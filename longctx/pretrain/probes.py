"""Held-out measurements of the embedded bases' recipe (`longctx.pretrain.build`): next-token accuracy
on synthetic blocks (logged during training) and greedy exact match on text probes (the
capability recorded in each base's manifest and re-measured by the tests)."""
from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

from longctx.engine.runner import greedy_generate
from longctx.tasks.common import word_pool


def token_accuracy(model: nn.Module, ids: Tensor, labels: Tensor) -> float:
    """Greedy next-token accuracy on the labelled positions of held-out blocks (copied tokens,
    recalled values). Called during training, so the model stays in train mode (no gradients):
    neither base has dropout, and in eval mode transformers' Mamba would take its per-token loop
    instead of the parallel scan (not timed separately; it is the loop training avoids)."""
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits[:, :-1]  # (n, T-1, V)
        predicted = logits.argmax(-1).cpu()  # (n, T-1)
    target = labels[:, 1:]
    hit = (predicted == target) & (target >= 0)
    return round(hit.sum().item() / max(1, (target >= 0).sum().item()), 4)


def _recall_probe(rng: random.Random, words: list[str], pairs: int) -> tuple[str, str]:
    keys = rng.sample(words, pairs)
    values = {k: "".join(rng.choice("0123456789") for _ in range(4)) for k in keys}
    query = rng.choice(keys)
    table = "; ".join(f"{k} = {values[k]}" for k in keys)
    return f"Table: {table}. The value of {query} is", f" {values[query]}"


def _copy_probe(rng: random.Random, words: list[str], length: int) -> tuple[str, str]:
    span = " ".join(rng.choice(words) for _ in range(length))
    return f"Sequence: {span}. Repeat the sequence:", f" {span}"


PROBE_SAMPLES = 100  # per probe: a 95% interval of about +-0.1 (n = 30 read one base's 0.47 as 0.23)


def evaluate_capability(model: nn.Module, tokenizer: Any, seed: int = 1234, n: int = PROBE_SAMPLES) -> dict[str, float]:
    """Greedy exact-match accuracy on held-out associative-recall and copy probes (`n` each)."""

    # The project's own word list, so the probes do not change with the Python version.
    words, rng, scores = list(word_pool()), random.Random(seed), {}
    probes = {"recall_8_pairs": lambda: _recall_probe(rng, words, 8),
              "recall_24_pairs": lambda: _recall_probe(rng, words, 24),
              "copy_12_words": lambda: _copy_probe(rng, words, 12)}
    model.eval()
    for name, make in probes.items():
        hits = 0
        for _ in range(n):
            prompt, answer = make()  # answers start with a space, as in training text
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            target = tokenizer(answer, add_special_tokens=False)["input_ids"]
            out = greedy_generate(model, ids, len(target))
            hits += out[0].tolist() == target
        scores[name] = hits / n
    return scores
