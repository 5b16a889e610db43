"""Tables the CLI prints: parameter report per method, and chunked-vs-unchunked probe runs."""
from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import nn

from longctx.adapters import applicable, load_adapter, wrap
from longctx.core.errors import choice_error, positive_int
from longctx.engine.bases import load_base
from longctx.engine.family import check_length
from longctx.engine.measure import TimedRegion
from longctx.engine.runner import greedy_generate, score_continuation
from longctx.engine.settings import CARRY_CHOICES

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def params_rows(build_base: Callable[[], nn.Module], methods: list[str],
                insertion: str | None = None) -> list[dict[str, Any]]:
    """Insertion points and trainable/total parameters of each method on a fresh base. A method
    that selects what trains after a warm-up (sdlora) is counted after selection: a selection of
    the same sizes is applied without training (what trains in the real run, not the warm-up)."""
    rows, lora_trainable = [], None
    for method in applicable(methods, build_base()):
        overrides = {"insertion": insertion} if insertion and method not in ("base", "dense") else {}
        adapted = wrap(build_base(), method, **overrides)
        select = getattr(adapted.method, "select_dimensions", None)
        if select is not None:
            select(adapted.model, from_updates=False)
        trainable, total = adapted.trainable_parameters(), adapted.total_parameters()
        if method == "lora":
            lora_trainable = trainable
        points = adapted.insertion_points
        rows.append({"method": method, "insertion": _describe_points(adapted.recipe, points),
                     "points": len(points) if method != "dense" else 0, "trainable": trainable,
                     "total": total, "trainable %": 100.0 * trainable / total})
    if lora_trainable:
        for row in rows:
            row["vs lora"] = row["trainable"] / lora_trainable
    return rows


def _describe_points(recipe: Any, points: list[str]) -> str:
    if recipe.method in ("base", "dense"):
        return "-" if recipe.method == "base" else "all weights"
    leaves = sorted({p.rsplit(".", 1)[-1] for p in points})
    preset = recipe.insertion if isinstance(recipe.insertion, str) else "custom"
    return f"{preset}: {'/'.join(leaves)}"


def passkey_probe(tokenizer: Any, length: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(context, answer) token ids: a 5-digit key at mid depth in filler; context has `length` tokens."""
    key = f"{random.Random(seed).randint(10000, 99999)}"
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question, answer = enc(" What is the pass key? The pass key is"), enc(f" {key}")
    unit = enc(FILLER)
    room = length - len(needle) - len(question)
    if room < 2:
        raise ValueError(f"probe length {length} is too short (needs > {len(needle) + len(question)} tokens)")
    filler = (unit * (room // len(unit) + 1))[:room]
    context = filler[: room // 2] + needle + filler[room // 2:] + question
    return context, answer


def forward_rows(base: str, methods: list[str], length: int, chunk_size: Any, adapter: str | None = None,
                 ssm_carry: str = "chunk", init: str = "zero", seed: int = 0, compare: bool = True,
                 dtype: str = "auto") -> list[dict[str, Any]]:
    """Chunked scoring of a passkey probe per method, with timing, peak memory and the
    largest log-prob difference from the unchunked run."""
    if init not in ("zero", "random"):
        raise choice_error("init", init, ("zero", "random"))
    if ssm_carry not in CARRY_CHOICES:
        raise choice_error("ssm_carry", ssm_carry, CARRY_CHOICES)
    size = positive_int("chunk_size", chunk_size)
    positive_int("length", length)
    rows = []
    for method in ([None] if adapter else applicable(methods, load_base(base, dtype=dtype)[0])):
        model, tok = load_base(base, dtype=dtype)
        check_length(model, length)
        adapted = _adapted(model, method, adapter, init, seed)
        context, answer = passkey_probe(tok, length, seed)
        rows.append(_probe_row(adapted, tok, context, answer, size, ssm_carry, compare))
    return rows


def _adapted(model: nn.Module, method: str | None, adapter: str | None, init: str, seed: int) -> Any:
    if adapter:
        return load_adapter(model, adapter)
    adapted = wrap(model, method, seed=seed)
    if init == "random" and method not in ("base", "dense"):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapted.model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p))
    return adapted


def _probe_row(adapted: Any, tok: Any, context: list[int], answer: list[int], size: int,
               ssm_carry: str, compare: bool) -> dict[str, Any]:
    device = next(adapted.model.parameters()).device
    with TimedRegion(device) as region:
        logprob, _ = score_continuation(adapted, context, answer, size, ssm_carry)
    ids = torch.tensor([context], device=device)
    generated = greedy_generate(adapted, ids, len(answer), chunk_size=size, ssm_carry=ssm_carry)
    row = {"method": adapted.method.name, "trainable": adapted.trainable_parameters(),
           "tokens": len(context) + len(answer), "chunks": -(-(len(context) + len(answer)) // size),
           "logp(answer)": logprob, "greedy": repr(tok.decode(generated[0]).strip()),
           "expected": repr(tok.decode(answer).strip()), "peak MiB": region.peak_bytes / 2**20,
           "tok/s": (len(context) + len(answer)) / region.seconds}
    if compare:
        unchunked, _ = score_continuation(adapted, context, answer, None, ssm_carry)
        row["|Δ| vs unchunked"] = abs(unchunked - logprob)
    return row
