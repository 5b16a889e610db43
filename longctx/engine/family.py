"""What kind of model a base is and how long an input it admits: the model family (Llama-style
attention or Mamba), the position limit, and the one refusal of an input over it.
"""
from __future__ import annotations

from torch import nn

from longctx.core.errors import LongctxError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")


def model_family(model: nn.Module) -> str:
    """`llama` (q/k/v/o_proj, gate/up/down_proj) or `mamba`; anything else is refused loudly."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in ("mamba", "mamba2"):
        return "mamba"
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise LongctxError(
        f"unsupported model family {model_type!r}: found linear modules {', '.join(names) or 'none'}; "
        f"supported families: {', '.join(LLAMA_FAMILY)}, mamba")


def position_limit(model: nn.Module) -> int | None:
    """Largest number of positions the model supports, or None when it has no such limit."""
    config = getattr(model, "config", None)
    if model_family(model) == "mamba":
        return None
    return getattr(config, "max_position_embeddings", None)


def length_error(n_tokens: int, limit: int, source: str = "max_position_embeddings",
                 whose: str = "the model's position limit") -> LongctxError:
    """The one refusal of an input over a limit: the input's size, the limit and where it comes from
    (the model's `max_position_embeddings`, or the user's `max_length=`), and the remedies."""
    return LongctxError(
        f"input of {n_tokens} tokens exceeds {whose} of {limit} tokens ({source}); remedies: set rope_scaling in "
        f"model_args, use a model with a longer context, or ask for truncation=left|middle")


def check_length(model: nn.Module, n_tokens: int) -> None:
    """Refuse an input longer than the model's position limit (`length_error`)."""
    limit = position_limit(model)
    if limit is not None and n_tokens > limit:
        raise length_error(n_tokens, limit)
