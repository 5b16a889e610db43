"""Helpers shared by the benchmarks: a benchmark-sized random Llama and a timer."""
from __future__ import annotations

from typing import Callable

import torch

from longctx.engine.measure import TimedRegion


def bench_llama(layers: int = 4, hidden: int = 256, vocab: int = 32000, heads: int = 8,
                max_positions: int = 65536, seed: int = 0, device: str = "cpu", attn: str = "auto",
                kv_heads: int | None = None):
    """A randomly initialised Llama of benchmark size (fp32, eval mode); `attn` as in load_base;
    `kv_heads` < `heads` for grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.engine.bases import choose_attn_implementation

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=max_positions,
                         attn_implementation=choose_attn_implementation(attn))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().to(device)


def kv_cache_bytes(model, n_tokens: int) -> int:
    """Bytes of the KV cache for `n_tokens` tokens: 2 (K,V) × layers × kv_heads × head_dim × N."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * n_tokens * itemsize


def default_device() -> str:
    """The device the benchmarks' tensors land on by default: cuda where there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def best_time(fn: Callable[[], object], repeats: int = 3, device: str | None = None) -> float:
    """Best seconds of `repeats` calls (after one warm-up call), each a `TimedRegion` on `device`
    (default: `default_device()`), so a GPU's queued work is inside the time."""
    fn()
    times = []
    for _ in range(repeats):
        with TimedRegion(device or default_device()) as region:
            fn()
        times.append(region.seconds)
    return min(times)


def operations(fn: Callable[[], object]) -> int:
    """How many aten operations one call of fn issues (torch.profiler, nested ones included): on
    a GPU, where small kernels are launched faster than the host can issue them, the host's cost."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))
