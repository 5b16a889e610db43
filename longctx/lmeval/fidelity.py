"""Equality of the `ssmlora` model type with lm-eval's `hf` model on the same requests.

lm-eval builds the requests itself (its task config, context and any `gen_prefix`), for the first
`n` documents of each length; both models answer them; greedy generations must be identical and
log-likelihoods equal within a tolerance. Used by the real-base tests and by
`benchmarks/fidelity_vs_hf.py` (the comparison at a checkpoint's position limit, run outside the suite).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longctx.core.resources import task_dir
from longctx.lmeval import harness


def task_requests(task: str, tokenizer: str, lengths: list[int], n: int = 1,
                  max_gen_toks: int | None = None) -> list[Any]:
    """lm-eval's own requests for the first `n` documents of each length of `task` (ours, or one of
    lm-eval's own such as RULER's `niah_single_1`); `max_gen_toks` caps a generation budget."""
    metadata = {"max_seq_lengths": list(lengths), "num_samples": n, "tokenizer": tokenizer, "pretrained": tokenizer}
    obj = harness.load_task(task, str(task_dir()), not task.startswith("longctx"), metadata)
    taken: dict[int, int] = {}
    out = []
    for index, doc in enumerate(obj.test_docs()):
        length = doc["max_length"]
        if taken.get(length, 0) >= n:
            continue
        taken[length] = taken.get(length, 0) + 1
        out.extend(harness.doc_requests(obj, task, doc, index, max_gen_toks))
    return out


@dataclass
class Agreement:
    """How two models' answers to the same requests compare."""

    requests: int
    identical: int  # generations identical, or greedy verdicts equal (log-likelihood)
    max_abs_logprob_diff: float  # 0.0 for generations

    def __str__(self) -> str:
        return (f"{self.identical}/{self.requests} identical, max |Δ log-likelihood| "
                f"{self.max_abs_logprob_diff:.2e}")


def agreement(requests: list[Any], ours: list[Any], theirs: list[Any]) -> Agreement:
    """Compare two models' answers (strings, or (logprob, is_greedy) pairs) to `requests`."""
    if requests and requests[0].request_type == "generate_until":
        return Agreement(len(requests), sum(a == b for a, b in zip(ours, theirs)), 0.0)
    same = sum(ga == gb for (_, ga), (_, gb) in zip(ours, theirs))
    diff = max((abs(a - b) for (a, _), (b, _) in zip(ours, theirs)), default=0.0)
    return Agreement(len(requests), same, diff)


def answer(lm: Any, requests: list[Any]) -> list[Any]:
    """The model's answers, by the requests' type (all of one type)."""
    kind = requests[0].request_type
    return lm.generate_until(requests) if kind == "generate_until" else lm.loglikelihood(requests)
