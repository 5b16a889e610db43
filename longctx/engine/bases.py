"""Base models: load one (named as `engine.settings` resolves it), pick the attention backend,
know its limits.

`longctx-tiny` (the embedded base built by `longctx pretrain`) is accepted wherever a base is
named; everything else is an ordinary HuggingFace causal LM loaded through the same code.
Adapter insertion points are resolved by module-name patterns per model family (design §3).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from longctx.core.errors import LongctxError, choice_error
from longctx.engine.attention import register
from longctx.engine.gguf import REAL_BASES
from longctx.engine.mamba import use_parallel_scan
from longctx.engine.placement import dispatch, full_device_map
from longctx.engine.settings import DTYPE_ALIASES, EMBEDDED_BASES, base_source, check_dtype, parse_rope_scaling

ATTN_CHOICES = ("auto", "longctx_sdpa", "sdpa", "eager", "flash_attention_2")
DTYPES = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}  # name -> torch dtype
# Weight shapes of well-known models, built on the meta device for parameter tables.
META_SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096),
}


def choose_attn_implementation(requested: str = "auto", on_cpu: bool = False) -> str:
    """`auto`: flash_attention_2 when flash-attn imports and CUDA is present (and no layer runs on
    the CPU, `on_cpu`), else `longctx_sdpa` (SDPA whose chunked prefill needs no mask; see
    `longctx.engine.attention`)."""
    if requested not in ATTN_CHOICES:
        raise choice_error("attn_implementation", requested, ATTN_CHOICES)
    if requested == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None and not on_cpu
        requested = "flash_attention_2" if has_flash and torch.cuda.is_available() else "longctx_sdpa"
    if requested == "longctx_sdpa":
        register()
    return requested


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype from its name, or "auto" (the checkpoint's own dtype, as lm-eval's `hf`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return "auto" if check_dtype(dtype) == "auto" else DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: None means CUDA when present, else CPU (as lm-eval's `hf`); asking for
    a CUDA device that is not there is an error, never a silent fall back to the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LongctxError(f"unknown device {str(device)!r} (valid: cpu, cuda, cuda:N, auto)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LongctxError(f"device {str(device)!r} asked for, but this machine has no CUDA device "
                               f"(torch {torch.__version__}); use device=cpu")
        if resolved.index is not None and resolved.index >= count:
            raise LongctxError(f"device {str(device)!r} asked for, but this machine has {count} CUDA "
                               f"device(s): cuda:0 to cuda:{count - 1}")
    elif resolved.type != "cpu":
        raise LongctxError(f"unsupported device {str(device)!r} (valid: cpu, cuda, cuda:N, auto)")
    return resolved


def scale_rope(config: Any, scaling: dict[str, Any]) -> None:
    """Set `scaling` on a config the way transformers reads it: the new rope type and factor over the
    checkpoint's own rope parameters, the original limit kept, the position limit multiplied."""
    if config.model_type in ("mamba", "mamba2"):
        raise LongctxError("rope_scaling does not apply to a Mamba base: it has no positions (and no limit)")
    original = int(config.max_position_embeddings)
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(scaling, original_max_position_embeddings=original)
    config.rope_parameters = params
    config.max_position_embeddings = int(original * scaling["factor"])


def load_base(name_or_path: str, dtype: str | torch.dtype = "auto",
              attn_implementation: str = "auto", device: str | torch.device | None = "cpu",
              trust_remote_code: bool = False, gguf_file: str | None = None,
              rope_scaling: Any = None, revision: str | None = None, subfolder: str | None = None,
              device_map: Any = None, max_memory: dict[Any, int] | None = None) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) in eval mode, straight onto `device` in `dtype` (no float32 copy in
    host memory first). dtype "auto": the checkpoint's own (a GGUF base's: its dequantised float32).
    Hub ids load only from the local cache offline. `rope_scaling`: see `parse_rope_scaling`;
    `revision`/`subfolder`: see `base_source`. `device_map` (with `max_memory`, as lm-eval's `hf`
    passes them under parallelize=True): the model is split over devices instead of put on `device`
    (loaded on the CPU, then dispatched: `longctx.engine.placement`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    scaling = parse_rope_scaling(rope_scaling)
    path, source = base_source(name_or_path, gguf_file, revision, subfolder)
    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device) if device_map is None else torch.device("cpu")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **source)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **source)
        if scaling:
            scale_rope(config, scaling)
        mapping = None if device_map is None else _device_map(config, device_map, max_memory, torch_dtype,
                                                               trust_remote_code)
        attn = choose_attn_implementation(attn_implementation, on_cpu=target.type == "cpu" and (
            mapping is None or "cpu" in mapping.values()))
        attention = {} if config.model_type in ("mamba", "mamba2") else {"attn_implementation": attn}  # no attention
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype, device_map={"": target}, trust_remote_code=trust_remote_code,
            **attention, **source)
    except (OSError, ValueError) as err:
        if isinstance(err, LongctxError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongctxError(
            f"cannot load base model {name_or_path!r}: {first} (give a local HF directory, a cached hub "
            f"id, a .gguf file, or one of: {', '.join([*EMBEDDED_BASES, *REAL_BASES])})") from None
    if mapping is not None:
        dispatch(model, mapping)
    if config.model_type == "mamba":
        use_parallel_scan(model)
    model.eval()
    make_resident(model)  # the weights left on the CPU, if any
    parts = [str(name_or_path), subfolder, gguf_file]
    model.config.longctx_base_name = "/".join(str(p).strip("/") for p in parts if p) + (
        f"@{source['revision']}" if "revision" in source else "")
    return model, tok


def _device_map(config: Any, device_map: Any, max_memory: dict[Any, int] | None, dtype: Any,
                trust_remote_code: bool) -> dict[str, str]:
    """The map of every module (`placement.full_device_map`), each device checked to be here."""
    mapping = full_device_map(config, device_map, max_memory, dtype, trust_remote_code)
    for name in set(mapping.values()):
        resolve_device(name)
    return mapping


def make_resident(model: nn.Module) -> None:
    """Read every weight once. Safetensors weights loaded onto the CPU are memory-mapped and become
    resident only when first touched, which would count them in the first request's memory."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.reshape(-1).sum()


def meta_model(shape: str) -> nn.Module:
    """A model with the weight shapes of a well-known checkpoint, on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in META_SHAPES:
        raise choice_error("model shape", shape, META_SHAPES)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**META_SHAPES[shape]))
    model.config.longctx_base_name = f"shape:{shape}"
    return model
