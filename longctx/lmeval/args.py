"""The `ssmlora` model type's model_args: its own, and every argument of lm-eval's `hf` in hf's meaning.

Users move from `--model hf` to `--model ssmlora` keeping their model_args, so each keyword of the
installed lm-eval's `HFLM.__init__` (read off its signature, plus `device_map`, which hf hands to
from_pretrained) is applied with hf's meaning (`APPLIED`), ignored where hf ignores it too
(`IGNORED`), or refused in one line that says why it cannot apply to a chunked run (`REFUSED`).
A keyword lm-eval adds that is in none of the three is not accepted until it is classified
(tests/lmeval/test_args.py fails on it). docs/lmeval-model-args.md tables them all.

`ModelArgs` is the one validated, frozen record of them that the model type loads by, and
`MODEL_KEYS` every key lm-eval may merge from model_args into a task's metadata.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from longctx.core.errors import LongctxError, choice_error, positive_int
from longctx.engine.placement import hf_device_map_args
from longctx.engine.settings import CARRY_CHOICES, TRUNCATION_CHOICES, parse_rope_scaling
from longctx.lmeval import harness
from longctx.lmeval.parallel import launched_processes

LOGGER = logging.getLogger(harness.MODEL_LOGGER)
OWN_ARGS = ("adapter", "method", "chunk_size", "ssm_carry", "seed", "rope_scaling", "attn_implementation")
# the installed lm-eval's HFLM.__init__ keywords, then `device_map` (hf passes it on to from_pretrained)
HF_ARGS = (*harness.hflm_parameters(), "device_map")
_GPTQ = "a GPTQ model's linear layers are quantised kernels, not the layers adapters go into; give a float checkpoint"
# hf argument -> (values that change nothing, why any other cannot apply to ssmlora)
REFUSED = {
    "tp_plan": ((None,), "tensor parallelism shards every layer over processes (DTensor), which the chunked "
                         "runner's KV cache and adapter state do not follow; use parallelize=True (layers split "
                         "over devices) or accelerate launch (data parallel)"),
    "delta": ((None,), "ssmlora does not add delta weights to the base: merge them into a checkpoint and give "
                       "it as pretrained"),
    "autogptq": ((None, False), _GPTQ),
    "gptqmodel": ((None, False), _GPTQ),
    "mixed_precision_dtype": ((None,), "ssmlora runs the model in one dtype: its chunked attention picks its "
                                      "kernel by that dtype, which autocast would change under it; set "
                                      "dtype=bfloat16 or float16 instead"),
    "backend": ((None, "default", "causal"), "ssmlora runs decoder-only (causal) models; valid: default, causal"),
    "softmax_dtype": ((None, "float32", "fp32", "float", torch.float32),
                      "ssmlora's log-softmax runs in float32 (the kept logits are float32); leave it out or "
                      "give float32"),
}
# hf arguments that change nothing here, as in hf: logits_cache (ssmlora runs each request),
# offload_folder (a map that needs the disk is refused), max_batch_size (bounds only batch_size=auto)
IGNORED = ("logits_cache", "offload_folder", "max_batch_size")
# hf arguments applied with hf's meaning (`parse_model_args`)
APPLIED = ("pretrained", "revision", "subfolder", "tokenizer", "truncation", "max_length", "device", "dtype",
           "batch_size", "trust_remote_code", "use_fast_tokenizer", "add_bos_token", "prefix_token_id",
           "parallelize", "max_memory_per_gpu", "max_cpu_memory", "peft", "gguf_file", "think_end_token",
           "enable_thinking", "chat_template_args", "device_map")
UNCLASSIFIED = tuple(a for a in HF_ARGS if a not in (*APPLIED, *IGNORED, *REFUSED))  # empty, or a new hf keyword
VALID_ARGS = ("pretrained", *OWN_ARGS, *(a for a in HF_ARGS if a != "pretrained" and a not in UNCLASSIFIED))
# Every key lm-eval may merge from model_args into a task's metadata: ours and all of hf's.
MODEL_KEYS = frozenset((*VALID_ARGS, *HF_ARGS, *harness.METADATA_ADDED_KEYS))


def flag(name: str, value: Any) -> bool | None:
    """A boolean model argument (True/False, or lm-eval's strings), or None when not given."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise LongctxError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ModelArgs:
    """Validated model_args: what loading, the runner and `HFLM.__init__` each take."""

    pretrained: str = "longctx-tiny"
    adapter: str | None = None
    method: str | None = None
    chunk_size: int | None = None
    ssm_carry: str = "chunk"
    dtype: str = "auto"
    attn_implementation: str = "auto"
    max_length: int | None = None
    truncation: str = "refuse"
    seed: int = 0
    device: str | None = None
    rope_scaling: dict[str, Any] | None = None  # `engine.settings.parse_rope_scaling`'s form
    gguf_file: str | None = None
    trust_remote_code: bool = False
    add_bos_token: bool | None = None
    revision: str | None = None
    subfolder: str | None = None
    tokenizer: str | None = None
    use_fast_tokenizer: bool | None = None
    device_map: Any = None  # None: one device (`device`); else hf's map, with `max_memory`
    max_memory: dict[Any, int] | None = None
    hflm: dict[str, Any] = field(default_factory=dict)  # HFLM.__init__'s own: prefix_token_id, thinking, chat

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            positive_int("chunk_size", self.chunk_size)
        if self.max_length is not None:
            positive_int("max_length", self.max_length)
        if self.truncation not in TRUNCATION_CHOICES:
            raise choice_error("truncation", self.truncation, TRUNCATION_CHOICES)
        if self.ssm_carry not in CARRY_CHOICES:
            raise choice_error("ssm_carry", self.ssm_carry, CARRY_CHOICES)
        if self.rope_scaling and self.rope_scaling["rope_type"] == "dynamic" and self.chunk_size is not None:
            raise LongctxError("rope_scaling=dynamic cannot be chunked: dynamic rope recomputes its frequencies "
                               "from the longest position of each forward, so the cached keys of earlier chunks "
                               "would use other ones; use yarn or linear, or chunk_size=none")

    def tokenizer_options(self) -> dict[str, Any]:
        """`tasks.glue.load_tokenizer`'s options: the tokenizer as hf loads it for these arguments."""
        return {"pretrained": self.pretrained, "tokenizer": self.tokenizer, "revision": self.revision,
                "subfolder": self.subfolder, "use_fast_tokenizer": self.use_fast_tokenizer,
                "add_bos_token": self.add_bos_token, "trust_remote_code": self.trust_remote_code,
                "gguf_file": self.gguf_file}


def parse_model_args(given: dict[str, Any]) -> ModelArgs:
    """`ModelArgs` from `--model_args` (lm-eval's parsed values), or a one-line `LongctxError`."""
    unknown = sorted(k for k in given if k not in VALID_ARGS)
    if unknown:
        raise LongctxError(f"unknown model_args key {unknown[0]!r} for ssmlora (valid: {', '.join(VALID_ARGS)})")
    for key, (harmless, why) in REFUSED.items():
        if given.get(key) not in harmless:
            raise LongctxError(f"{key}={given[key]!r} is not supported by ssmlora: {why}")
    _one_at_a_time(given.get("batch_size"), given.get("max_batch_size"))
    fields = {k: given[k] for k in ("pretrained", "method", "ssm_carry", "dtype", "attn_implementation", "device")
              if given.get(k) is not None}
    fields["pretrained"] = str(fields.get("pretrained", ModelArgs.pretrained))
    fields.update({k: None if given.get(k) in (None, "") else str(given[k])
                   for k in ("gguf_file", "revision", "subfolder", "tokenizer")})
    device_map, max_memory = _placement(given)
    return ModelArgs(
        **fields, seed=int(given.get("seed") or 0),
        adapter=_adapter(given.get("adapter"), given.get("peft")), chunk_size=_optional_chunk(given.get("chunk_size")),
        max_length=None if given.get("max_length") is None else positive_int("max_length", given["max_length"]),
        truncation=_truncation(given.get("truncation")), rope_scaling=parse_rope_scaling(given.get("rope_scaling")),
        trust_remote_code=bool(flag("trust_remote_code", given.get("trust_remote_code"))),
        add_bos_token=flag("add_bos_token", given.get("add_bos_token")),
        use_fast_tokenizer=flag("use_fast_tokenizer", given.get("use_fast_tokenizer")),
        device_map=device_map, max_memory=max_memory, hflm=_hflm_own(given))


def _optional_chunk(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    return positive_int("chunk_size", value)


def _one_at_a_time(batch_size: Any, max_batch_size: Any) -> None:
    """batch_size: absent, 1, or `auto` (hf's largest batch that fits, up to max_batch_size: one
    request is what ssmlora runs, so auto is 1 here); max_batch_size bounds only `auto`, as in hf."""
    text = "1" if batch_size is None else str(batch_size).strip()
    if text.startswith("auto"):
        if max_batch_size is not None:
            positive_int("max_batch_size", max_batch_size)
        return
    if text != "1":
        raise LongctxError(f"batch_size={batch_size} is not supported: ssmlora runs requests one at a time (long "
                           f"inputs gain nothing from padded batches); leave batch_size out or set it to 1 or auto")


def _adapter(adapter: Any, peft: Any) -> str | None:
    """`peft=DIR` is lm-eval hf's name for `adapter=DIR`; both at once is ambiguous."""
    if adapter and peft:
        raise LongctxError(f"peft={peft!r} and adapter={adapter!r} both name the adapter (peft is lm-eval hf's "
                           f"name for adapter): give one")
    return str(adapter or peft) if (adapter or peft) else None


def _truncation(value: Any) -> str:
    """ssmlora's policy (refuse | left | middle); hf's booleans: true -> left, false -> refuse."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return "left" if flag("truncation", value) else "refuse"
    if value is None:
        return "refuse"
    if value not in TRUNCATION_CHOICES:
        raise LongctxError(f"unknown truncation {value!r}; valid choices: {', '.join(TRUNCATION_CHOICES)} "
                           f"(or hf's true = left, false = refuse)")
    return str(value)


def _placement(given: dict[str, Any]) -> tuple[Any, dict[Any, int] | None]:
    """(device_map, max_memory) as hf derives them (`placement.hf_device_map_args`)."""
    parallelize = bool(flag("parallelize", given.get("parallelize")))
    limits = ("device_map", "max_memory_per_gpu", "max_cpu_memory")
    if not parallelize:
        ignored = [k for k in limits if given.get(k) is not None]
        if ignored:
            LOGGER.warning("ssmlora: %s ignored without parallelize=True, as lm-eval's hf ignores it; the model "
                           "runs on one device", ", ".join(ignored))
        return None, None
    if launched_processes() > 1:
        raise LongctxError(f"parallelize=True under {launched_processes()} launched processes is not supported: "
                           f"ssmlora runs one process per device there (data parallel); launch one process to "
                           f"split the model over devices")
    return hf_device_map_args(True, given.get("device_map"), given.get("max_memory_per_gpu"),
                              given.get("max_cpu_memory"))


def _hflm_own(given: dict[str, Any]) -> dict[str, Any]:
    """The arguments `HFLM.__init__` itself applies (empty-context prefix, thinking, chat template)."""
    own = {k: given[k] for k in ("prefix_token_id", "think_end_token", "chat_template_args") if given.get(k) is not None}
    thinking = flag("enable_thinking", given.get("enable_thinking"))
    if thinking is not None:
        own["enable_thinking"] = thinking
    if thinking and given.get("think_end_token") is None:
        raise LongctxError("enable_thinking=True needs think_end_token (the token or text that ends the thinking, "
                           "as lm-eval's hf requires)")
    return own
