"""The lm-eval model type `ssmlora` (design §7): lm-eval's HF model with an adapter inserted and
every request run through the chunked runner.

The base and adapter are built first and the model object is handed to `HFLM`, so lm-eval's
tokenisation and request plumbing stay its own; `accelerate launch` data parallelism is set up
here (`longctx.lmeval_parallel`), since HFLM runs a model object as one process. Requests run one
at a time (long inputs: batching buys nothing but padding; batch_size/max_batch_size other than 1
are refused), chunked, with logits kept only where a score or next token needs them. Each
request's input tokens, chunks, peak memory, wall time and tokens/s are recorded and aggregated
per requested length into the results (`config.longctx` in lm-eval's results JSON).

A length L means the whole request fits in L tokens (prompt + answer, or prompt + max_gen_toks;
see `longctx.tasks`). With `truncation=refuse` (the default) a length over the position limit is
refused per length: its requests are not run, score NaN under that length's metric, are recorded
with status `refused` in `per_length` and named in one warning line; the other lengths run.
"""
from __future__ import annotations

import array
import math
from typing import Any, Callable

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences
from tqdm import tqdm

from longctx import lmeval_parallel
from longctx.attention import attention_record
from longctx.errors import LongctxError, choice_error, positive_int
from longctx.lmeval_stats import RequestLog
from longctx.runner import CARRY_CHOICES, chunked_forward, greedy_generate
from longctx.tasks.lmeval import REFUSED_GENERATION, flag

TRUNCATION_CHOICES = ("refuse", "left", "middle")
VALID_ARGS = ("pretrained", "adapter", "method", "chunk_size", "ssm_carry", "dtype", "attn_implementation",
              "max_length", "truncation", "seed", "device", "trust_remote_code", "add_bos_token", "batch_size",
              "max_batch_size", "gguf_file", "rope_scaling")


def _optional_chunk(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    return positive_int("chunk_size", value)


def _one_at_a_time(name: str, value: Any) -> None:
    """batch_size / max_batch_size: absent or 1, else a one-line refusal."""
    if value is not None and str(value).strip() != "1":
        raise LongctxError(f"{name}={value} is not supported: ssmlora runs requests one at a time (long inputs "
                           f"gain nothing from padded batches); leave {name} out or set it to 1")


def build_adapted(pretrained: str, adapter: str | None, method: str | None, dtype: str,
                  attn_implementation: str, device: str, seed: int, trust_remote_code: bool = False,
                  gguf_file: str | None = None, rope_scaling: Any = None) -> Any:
    """Load the base and insert the adapter (a saved directory, or a fresh `method`)."""
    from longctx.adapters import ADAPTERS, load_adapter, wrap
    from longctx.models import load_base

    if method is not None and method not in ADAPTERS:
        raise choice_error("method", method, ADAPTERS)
    model, tokenizer = load_base(pretrained, dtype=dtype, attn_implementation=attn_implementation,
                                 device=device, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                                 rope_scaling=rope_scaling)
    adapted = load_adapter(model, adapter) if adapter else wrap(model, method or "base", seed=seed)
    if adapter and method and adapted.method.name != method:
        raise LongctxError(f"adapter {adapter!r} holds method {adapted.method.name!r}, not method={method!r}")
    adapted.model.eval()
    return adapted, tokenizer


def token_tensor(ids: list[int], device: Any) -> torch.Tensor:
    """Token ids (1, N) int64 on `device`, read from a packed buffer: `torch.tensor` walks a Python
    list 7x slower (65,535 ids: 7.3 vs 1.0 ms on this project's CPU), time in which the GPU waits."""
    if not ids:
        return torch.empty(1, 0, dtype=torch.int64, device=device)
    return torch.frombuffer(array.array("q", ids), dtype=torch.int64).view(1, -1).to(device)  # keeps the buffer


class SsmloraLM(HFLM):
    """`lm_eval --model ssmlora --model_args pretrained=…,method=…|adapter=…,chunk_size=…`."""

    def __init__(self, pretrained: str = "longctx-tiny", adapter: str | None = None, method: str | None = None,
                 chunk_size: Any = None, ssm_carry: str = "chunk", dtype: str = "auto",
                 attn_implementation: str = "auto", max_length: Any = None, truncation: str = "refuse",
                 seed: int = 0, device: str | None = None, trust_remote_code: Any = False,
                 add_bos_token: Any = None, batch_size: Any = None, max_batch_size: Any = None,
                 gguf_file: str | None = None, rope_scaling: Any = None, **unknown: Any) -> None:
        if unknown:
            raise LongctxError(f"unknown model_args key {sorted(unknown)[0]!r} for ssmlora "
                               f"(valid: {', '.join(VALID_ARGS)})")
        if ssm_carry not in CARRY_CHOICES:
            raise choice_error("ssm_carry", ssm_carry, CARRY_CHOICES)
        if truncation not in TRUNCATION_CHOICES:
            raise choice_error("truncation", truncation, TRUNCATION_CHOICES)
        _one_at_a_time("batch_size", batch_size)
        _one_at_a_time("max_batch_size", max_batch_size)
        trust, bos = bool(flag("trust_remote_code", trust_remote_code)), flag("add_bos_token", add_bos_token)
        self.chunk_size = _optional_chunk(chunk_size)
        self.ssm_carry, self.truncation_mode = ssm_carry, truncation
        from longctx.lmeval_plugin import requested_device
        from longctx.models import parse_rope_scaling, position_limit

        # --device, else CUDA if present; under accelerate launch, this process's own device
        accelerator, device_ = lmeval_parallel.setup(requested_device(device))
        scaling = parse_rope_scaling(rope_scaling)
        if scaling and scaling["rope_type"] == "dynamic" and self.chunk_size is not None:
            raise LongctxError("rope_scaling=dynamic cannot be chunked: dynamic rope recomputes its frequencies "
                               "from the longest position of each forward, so the cached keys of earlier chunks "
                               "would use other ones; use yarn or linear, or chunk_size=none")
        self.adapted, tokenizer = build_adapted(str(pretrained), adapter, method, dtype, attn_implementation,
                                                str(device_), int(seed), trust, gguf_file or None, scaling)
        if bos is not None:  # as HFLM loads its tokenizer: the tokenizer adds (or not) its BOS
            from longctx.tasks.lmeval import load_tokenizer

            tokenizer = load_tokenizer({"pretrained": str(pretrained), "add_bos_token": bos,
                                        "trust_remote_code": trust, "gguf_file": gguf_file})
        limit = position_limit(self.adapted.model)
        self.position_limit = positive_int("max_length", max_length) if max_length is not None else limit
        with lmeval_parallel.quiet_model_object_warnings():
            super().__init__(pretrained=self._hf_model(), tokenizer=tokenizer, batch_size=1,
                             max_length=self.position_limit or (1 << 62), add_bos_token=bos)
        self.log = RequestLog(torch.device(device_))
        lmeval_parallel.adopt(self, accelerator)
        self.description = {"pretrained": str(pretrained), "gguf_file": gguf_file, "rope_scaling": scaling,
                            "adapter": adapter, "method": self.adapted.method.name,
                            "chunk_size": self.chunk_size, "ssm_carry": ssm_carry, "dtype": dtype,
                            "truncation": truncation, "position_limit": self.position_limit,
                            "add_bos_token": bos, "trust_remote_code": trust, "processes": self.world_size,
                            "trainable_parameters": self.adapted.trainable_parameters(),
                            "total_parameters": self.adapted.total_parameters(),
                            "attention": attention_record(self._hf_model())}
        self._labels: list[Any] = []

    def _hf_model(self) -> Any:
        """The transformers model HFLM wraps (PEFT's wrapper unwrapped; its layers stay inserted)."""
        model = self.adapted.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ---- truncation -----------------------------------------------------------------------------

    def fit_tokens(self, ids: list[int], limit: int | None, protect: int, unfed: int = 0) -> tuple[list[int], int]:
        """(ids whose first len − `unfed` tokens fit `limit`, tokens removed) under the truncation
        policy; the last `protect` tokens (the continuation) are never removed."""
        n = len(ids) - unfed
        if limit is None or n <= limit:
            return ids, 0
        if self.truncation_mode == "refuse" or limit <= protect:
            raise LongctxError(
                f"input of {n} tokens exceeds the limit of {limit} tokens (max_length, by default the "
                f"model's max_position_embeddings); remedies: set rope_scaling in model_args, use a model "
                f"with a longer context, or ask for truncation=left|middle")
        removed = n - limit
        if self.truncation_mode == "left":
            return ids[removed:], removed
        head = (limit - protect) // 2
        return ids[:head] + ids[head + removed:], removed

    def _refused(self, label: Any, request_tokens: int, fed_tokens: int) -> bool:
        """Refuse (and record) a longctx request under truncation=refuse: all requests of a length
        over the limit (a length bounds the whole request), and any request that cannot run."""
        limit = self.position_limit
        if self.truncation_mode != "refuse" or limit is None or not isinstance(label, int):
            return False
        if label <= limit and fed_tokens <= limit:
            return False
        self.log.refuse(label, request_tokens)
        return True

    # ---- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        unique, where = lmeval_parallel.unique_requests(requests)
        self._labels = [self._label(req) for req in unique]
        results = super().loglikelihood(unique, disable_tqdm=disable_tqdm)
        lmeval_parallel.sync_log(self, "loglikelihood")
        return [results[i] for i in where]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        lmeval_parallel.sync_log(self, "loglikelihood_rolling")
        return results

    @staticmethod
    def _label(request: Any) -> Any:
        doc = getattr(request, "doc", None)
        return doc.get("max_length") if isinstance(doc, dict) else None

    def _take_labels(self, n: int) -> list[Any]:
        labels, self._labels = (self._labels if len(self._labels) == n else [None] * n), []
        return labels

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        labels, results = self._take_labels(len(requests)), []
        bar = tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="longctx loglikelihood")
        for (pair, context, continuation), label in zip(bar, labels):
            whole = context + continuation  # the request: prompt + answer
            if self._refused(label, len(whole), len(whole) - 1):  # the last token is never fed
                results.append((math.nan, False))
                continue
            ids, removed = self.fit_tokens(whole, self.position_limit, len(continuation), unfed=1)
            results.append(self._score(ids, len(continuation), label, removed, len(whole)))
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, results[-1])
        return results

    def _score(self, ids: list[int], n_cont: int, label: Any, removed: int, request_tokens: int) -> tuple[float, bool]:
        """log p(last `n_cont` tokens | the rest) and greedy-exactness, from one chunked forward."""
        inputs = token_tensor(ids[:-1], self.device)  # (1, N-1): the last token is never input
        keep = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1)  # positions predicting the continuation
        with self.log.request(label, inputs.shape[1], self._chunks(inputs.shape[1]), removed, request_tokens):
            out = chunked_forward(self.adapted, inputs, chunk_size=self.chunk_size, keep=keep,
                                  ssm_carry=self.ssm_carry)
        logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)  # (n_cont, V)
        target = torch.tensor(ids[-n_cont:], device=logprobs.device)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == target).all())

    def _chunks(self, n: int) -> int:
        return 1 if self.chunk_size is None else math.ceil(n / self.chunk_size)

    # ---- generation -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        unique, where = lmeval_parallel.unique_requests(requests)
        out = []
        for request in tqdm(unique, disable=disable_tqdm or self.rank != 0, desc="longctx generate_until"):
            context, gen_kwargs = request.args
            out.append(self._generate_one(context, dict(gen_kwargs), eos, self._label(request)))
            if out[-1] != REFUSED_GENERATION:
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        lmeval_parallel.sync_log(self, "generate_until")
        return [out[i] for i in where]

    def _generate_one(self, context: str, kwargs: dict[str, Any], eos: str, label: Any) -> str:
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise LongctxError("ssmlora generates greedily: do_sample=true / temperature>0 are not supported")
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        ids = self.tok_encode(context)
        if self._refused(label, len(ids) + max_new, len(ids) + max_new):  # prompt + generation budget
            return REFUSED_GENERATION
        limit = None if self.position_limit is None else self.position_limit - max_new
        ids, removed = self.fit_tokens(ids, limit, 0)
        inputs = token_tensor(ids, self.device)  # (1, N)
        with self.log.request(label, len(ids), self._chunks(len(ids)), removed, len(ids) + max_new):
            new = greedy_generate(self.adapted, inputs, max_new, chunk_size=self.chunk_size,
                                  eos_token_id=self.eot_token_id, ssm_carry=self.ssm_carry,
                                  stop=self._stopper(until))
        text = self.tok_decode(new[0].tolist())
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text

    def _stopper(self, until: list[str]) -> Callable[[torch.Tensor], bool]:
        def stop(new_tokens: torch.Tensor) -> bool:  # (1, t)
            text = self.tok_decode(new_tokens[0].tolist())
            return any(s and s in text for s in until)
        return stop

    # ---- results --------------------------------------------------------------------------------

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval stores under `config` in its results: ours, with per-length aggregates."""
        return {"model_num_parameters": self.description["total_parameters"],
                "model_dtype": str(next(self._model.parameters()).dtype),
                "longctx": {**self.description, "per_length": self.log.per_length(),
                            "memory_method": self.log.memory_method}}
