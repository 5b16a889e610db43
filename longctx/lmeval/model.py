"""The lm-eval model type `ssmlora` (design §7): lm-eval's HF model with an adapter inserted and
every request run through the chunked runner.

The base and adapter are built first and the model object is handed to `HFLM`, so lm-eval's
tokenisation and request plumbing stay its own; `accelerate launch` data parallelism is set up
here (`longctx.lmeval.parallel`), since HFLM runs a model object as one process. Requests run one
at a time (long inputs: batching buys nothing but padding; a batch_size other than 1 or auto is
refused), chunked, with logits kept only where a score or next token needs them. lm-eval `hf`'s
own arguments keep hf's meaning (`longctx.lmeval.args`), parallelize=True included: the model is
split over devices (`longctx.engine.placement`), each layer's KV cache on its own device. Each
request's input tokens, chunks, peak memory, wall time and tokens/s are recorded and aggregated
per requested length into the results (`config.longctx` in lm-eval's results JSON).

A length L means the whole request fits in L tokens (prompt + answer, or prompt + max_gen_toks;
see `longctx.tasks`). With `truncation=refuse` (the default) a length over the position limit is
refused per length: its requests are not run, score NaN under that length's metric, are recorded
with status `refused` in `per_length` and named in one warning line; the other lengths run.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm import tqdm

from longctx.adapters import ADAPTERS, load_adapter, wrap
from longctx.core.errors import LongctxError, choice_error
from longctx.engine.attention import attention_record
from longctx.engine.bases import load_base
from longctx.engine.family import check_length, length_error, position_limit
from longctx.engine.placement import input_device
from longctx.engine.runner import greedy_generate, score_tokens, token_tensor
from longctx.engine.settings import TRUNCATION_CHOICES
from longctx.lmeval import harness, parallel
from longctx.lmeval.args import VALID_ARGS, ModelArgs, parse_model_args
from longctx.lmeval.harness import HFLM
from longctx.lmeval.stats import RequestLog
from longctx.lmeval.tasks.glue import REFUSED_GENERATION, load_tokenizer

__all__ = ["SsmloraLM", "TRUNCATION_CHOICES", "VALID_ARGS", "build_adapted"]


def build_adapted(args: ModelArgs, device: str) -> tuple[Any, Any]:
    """Load the base as the arguments say and insert the adapter (a saved directory, or a fresh
    `method`); returns (adapted model, the base's tokenizer)."""
    if args.method is not None and args.method not in ADAPTERS:
        raise choice_error("method", args.method, ADAPTERS)
    model, tokenizer = load_base(args.pretrained, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                 device=device, trust_remote_code=args.trust_remote_code, gguf_file=args.gguf_file,
                                 rope_scaling=args.rope_scaling, revision=args.revision, subfolder=args.subfolder,
                                 device_map=args.device_map, max_memory=args.max_memory)
    adapted = load_adapter(model, args.adapter) if args.adapter else wrap(model, args.method or "base", seed=args.seed)
    if args.adapter and args.method and adapted.method.name != args.method:
        raise LongctxError(f"adapter {args.adapter!r} holds method {adapted.method.name!r}, not method={args.method!r}")
    adapted.model.eval()
    return adapted, tokenizer


class SsmloraLM(HFLM):
    """`lm_eval --model ssmlora --model_args pretrained=…,method=…|adapter=…,chunk_size=…`, and any
    argument of lm-eval's `hf` model (`longctx.lmeval.args`, docs/lmeval-model-args.md)."""

    def __init__(self, **model_args: Any) -> None:
        args = parse_model_args(model_args)
        self.chunk_size, self.ssm_carry, self.truncation_mode = args.chunk_size, args.ssm_carry, args.truncation
        # --device, else CUDA if present; under accelerate launch, this process's own device; a model
        # split over devices takes its inputs where its dispatch says (`placement.input_device`)
        accelerator, device_ = parallel.setup(None if args.device_map else harness.requested_device(args.device))
        self.adapted, tokenizer = build_adapted(args, str(device_))
        device_ = input_device(self._hf_model()) or device_
        if args.tokenizer or args.use_fast_tokenizer is not None or args.add_bos_token is not None:
            tokenizer = load_tokenizer(args.tokenizer_options())  # as HFLM loads its tokenizer
        self.max_length_given = args.max_length is not None
        self.position_limit = args.max_length if self.max_length_given else position_limit(self.adapted.model)
        with harness.quiet_model_object_warnings():
            super().__init__(pretrained=self._hf_model(), tokenizer=tokenizer, batch_size=1,
                             max_length=self.position_limit or (1 << 62), add_bos_token=args.add_bos_token,
                             **args.hflm)
        harness.set_device(self, torch.device(device_))
        self.log = RequestLog(torch.device(device_))
        parallel.adopt(self, accelerator)
        self.description = self._describe(args)
        self._labels: list[Any] = []

    def _describe(self, args: ModelArgs) -> dict[str, Any]:
        """The run's settings, for lm-eval's results (`config.longctx`)."""
        model = self._hf_model()
        return {"pretrained": args.pretrained, "revision": args.revision, "subfolder": args.subfolder,
                "gguf_file": args.gguf_file, "tokenizer": args.tokenizer, "rope_scaling": args.rope_scaling,
                "adapter": args.adapter, "method": self.adapted.method.name, "chunk_size": self.chunk_size,
                "ssm_carry": self.ssm_carry, "dtype": args.dtype, "truncation": self.truncation_mode,
                "position_limit": self.position_limit, "add_bos_token": args.add_bos_token,
                "trust_remote_code": args.trust_remote_code, "processes": self.world_size,
                "device_map": getattr(model, "hf_device_map", None) if args.device_map else None,
                "trainable_parameters": self.adapted.trainable_parameters(),
                "total_parameters": self.adapted.total_parameters(), "attention": attention_record(model)}

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
            self._refuse_length(n, limit)
        removed = n - limit
        if self.truncation_mode == "left":
            return ids[removed:], removed
        head = (limit - protect) // 2
        return ids[:head] + ids[head + removed:], removed

    def _refuse_length(self, n: int, limit: int) -> None:
        """Raise the position-limit refusal for `n` tokens over `limit` (the position limit, less
        any generation budget): the model's own (`family.check_length`), or the user's max_length."""
        if not self.max_length_given:
            check_length(self.adapted.model, n + self.position_limit - limit)  # prompt + generation budget
        raise length_error(n, limit, f"max_length={self.position_limit}", whose="the limit")

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
        unique, where = parallel.unique_requests(requests)
        self._labels = [self._label(req) for req in unique]
        results = super().loglikelihood(unique, disable_tqdm=disable_tqdm)
        parallel.sync_log(self, "loglikelihood")
        return [results[i] for i in where]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        parallel.sync_log(self, "loglikelihood_rolling")
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
        fed = len(ids) - 1  # the last token is never an input
        with self.log.request(label, fed, self._chunks(fed), removed, request_tokens):
            return score_tokens(self.adapted, ids, n_cont, self.chunk_size, self.ssm_carry, device=self.device)

    def _chunks(self, n: int) -> int:
        return 1 if self.chunk_size is None else math.ceil(n / self.chunk_size)

    # ---- generation -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        unique, where = parallel.unique_requests(requests)
        out = []
        for request in tqdm(unique, disable=disable_tqdm or self.rank != 0, desc="longctx generate_until"):
            context, gen_kwargs = request.args
            out.append(self._generate_one(context, dict(gen_kwargs), eos, self._label(request)))
            if out[-1] != REFUSED_GENERATION:
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        parallel.sync_log(self, "generate_until")
        return [out[i] for i in where]

    def _generate_one(self, context: str, kwargs: dict[str, Any], eos: str, label: Any) -> str:
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise LongctxError("ssmlora generates greedily: do_sample=true / temperature>0 are not supported")
        until = harness.stop_sequences(kwargs.pop("until", None), eos=eos)
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
        tokens, think = new[0].tolist(), harness.think_end_token(self)
        if isinstance(think, int) and think in tokens:  # as hf: after the last one
            tokens = tokens[len(tokens) - tokens[::-1].index(think):]
        text = self.tok_decode(tokens)
        text = text.lstrip() if isinstance(think, int) else text
        return harness.finish_generation(text, until, think if isinstance(think, str) else None)

    def _stopper(self, until: list[str]) -> Callable[[torch.Tensor], bool]:
        def stop(new_tokens: torch.Tensor) -> bool:  # (1, t)
            text = self.tok_decode(new_tokens[0].tolist())
            return any(s and s in text for s in until)
        return stop

    # ---- results --------------------------------------------------------------------------------

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval stores under `config` in its results: ours, with per-length aggregates."""
        return {"model_num_parameters": self.description["total_parameters"],
                "model_dtype": str(next(self._hf_model().parameters()).dtype),
                "longctx": {**self.description, "per_length": self.log.per_length(),
                            "memory_method": self.log.memory_method}}
