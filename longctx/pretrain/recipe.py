"""The recipe of the embedded bases (`longctx pretrain`, `longctx.pretrain.build`): its fields and
their per-architecture defaults, the model builders, stage 2's synthetic rows, and the checks of
a requested recipe.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from longctx.core.errors import LongctxError, choice_error
from longctx.pretrain.data import copy_blocks, mqar_blocks, table_blocks

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class PretrainRecipe:
    arch: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 4096
    state_size: int = 16  # Mamba's d_state (N per channel); Zoology's MQAR configs use 8-24
    # stage 1: copy warm-up on random tokens
    induction_steps: int = 5000
    induction_batch: int = 128
    induction_len: int = 256
    induction_copies: int = 3  # spans per block that reappear later
    # stage 0: multi-query associative recall curriculum on random tokens
    recall_steps: int = 0
    recall_batch: int = 64
    recall_len: int = 256
    recall_pairs: int = 32  # the curriculum's last level (4, 8, ... up to this)
    recall_advance: float = 0.0  # > 0: next level once held-out accuracy at this one reaches it; 0: equal shares
    # stage 2: text + synthetic documents + copy blocks
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 1024
    copy_share: float = 0.25  # fraction of stage-2 rows that are synthetic blocks (`mixed_blocks`)
    mixed_blocks: str = "copy"  # the synthetic blocks of stage 2: a key of SYNTHETIC_BLOCKS
    prose_share: float = 0.15  # fraction of documents that are prose windows
    pool_tokens: int = 8_000_000  # the stage-2 document stream, cycled
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
    probe_blocks: int = 64  # held-out blocks per accuracy the log records at each logging step (not trained on)
    device: str = "cpu"
    precision: str = "bf16"  # on CUDA: "bf16" autocast or "fp32" (CPU always trains in float32)


def build_llama(recipe: PretrainRecipe, tokenizer: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def build_mamba(recipe: PretrainRecipe, tokenizer: Any) -> nn.Module:
    """A small Mamba (Gu & Dao, 2023) of the recipe's width and depth, tied embeddings.

    `use_mambapy` selects transformers' pure-PyTorch parallel scan for training when the CUDA
    kernels are absent (the sequential fallback is far slower); inference paths are unchanged.
    """
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_layers,
        state_size=recipe.state_size, expand=2, conv_kernel=4, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_mambapy=True)
    torch.manual_seed(recipe.seed)
    return MambaForCausalLM(config)


# Architecture name -> builder; both embedded bases come from the same recipe.
ARCHS: dict[str, Callable[[PretrainRecipe, Any], nn.Module]] = {"llama": build_llama, "mamba": build_mamba}
# Per-architecture departures from the recipe's defaults; each is the run of its committed base.
# Mamba (d_model 256, 2 layers; one H100, 6 min, fp32): no copy warm-up (2,500 warm-up steps on an
# H100 left its copy accuracy at 0), 700 steps of the MQAR curriculum (it leaves the 1/pairs
# plateau after ~300), then text whose synthetic rows are recall tables in the probes' own words
# (`mixed_blocks=table`): recall as a text skill did not come from token MQAR alone.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mamba": {"hidden_size": 256, "num_layers": 2, "induction_steps": 0, "recall_steps": 700, "recall_advance": 0.8,
              "steps": 4000, "seq_len": 512, "copy_share": 0.6, "mixed_blocks": "table", "pool_tokens": 2_000_000,
              "precision": "fp32"},
}


def _mqar_of_any_size(recipe: PretrainRecipe, vocab: tuple[int, int]) -> Callable:
    def make(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        pairs = int(torch.randint(4, recipe.recall_pairs + 1, (1,), generator=gen))
        return mqar_blocks(n, recipe.seq_len, min(pairs, recipe.seq_len // 4), *vocab, gen)
    return make


# Stage 2's synthetic rows, by `mixed_blocks`: (recipe, token range, words, tokenizer) -> make(n, gen).
SYNTHETIC_BLOCKS: dict[str, Callable[[PretrainRecipe, tuple[int, int], list[str], Any], Callable]] = {
    "copy": lambda r, vocab, words, tok: lambda n, gen: copy_blocks(n, r.seq_len, r.induction_copies, *vocab, gen),
    "mqar": lambda r, vocab, words, tok: _mqar_of_any_size(r, vocab),
    "table": lambda r, vocab, words, tok: lambda n, gen: table_blocks(
        n, r.seq_len, r.recall_pairs, words, tok, random.Random(int(torch.randint(1 << 31, (1,), generator=gen)))),
}


def _require_mambapy() -> None:
    """Training Mamba without mambapy falls back to transformers' per-token loop: refuse up front."""
    try:
        import mambapy  # noqa: F401
    except ImportError:
        raise LongctxError("training Mamba needs mambapy (a longctx dependency: pip install 'mambapy>=1.2,<2'); "
                           "without it transformers falls back to a per-token loop, measured 4x slower at "
                           "128 tokens and 21x at 256 (benchmarks/p6_mamba_training.py)") from None


def resolve_recipe(arch: str, seed: int, device: str, overrides: dict[str, Any]) -> PretrainRecipe:
    if arch not in ARCHS:
        raise choice_error("architecture", arch, ARCHS)
    if device not in DEVICES:
        raise choice_error("device", device, DEVICES)
    if arch == "mamba":
        _require_mambapy()
    if device == "cuda" and not torch.cuda.is_available():
        raise LongctxError("device 'cuda': no CUDA device is visible here; use --device cpu (much slower)")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(PretrainRecipe)})
    if unknown:
        raise choice_error("recipe field", unknown[0], [f.name for f in dataclasses.fields(PretrainRecipe)])
    recipe = dataclasses.replace(PretrainRecipe(arch=arch, seed=seed, device=device),
                                 **{**ARCH_DEFAULTS[arch], **overrides})
    if recipe.mixed_blocks not in SYNTHETIC_BLOCKS:
        raise choice_error("mixed_blocks", recipe.mixed_blocks, tuple(SYNTHETIC_BLOCKS))
    if recipe.precision not in PRECISIONS:
        raise choice_error("precision", recipe.precision, PRECISIONS)
    if not 0.0 <= recipe.recall_advance <= 1.0:
        raise LongctxError(f"recipe field recall_advance: {recipe.recall_advance} is not an accuracy in [0, 1] "
                           "(0: levels in equal shares of the stage)")
    if recipe.state_size < 1:
        raise LongctxError(f"recipe field state_size: {recipe.state_size} is not a positive int")
    return recipe


