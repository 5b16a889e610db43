"""The glue between the generators and lm-eval's task YAMLs (`longctx/lmeval_tasks/*.yaml`).

lm-eval calls a task's `custom_dataset` with the `--metadata` JSON merged over the
`--model_args` (that is how RULER's tasks find their tokenizer), so `build_dataset` separates the
two: task keys are validated, known model arguments are ignored, anything else is an error.
Examples of all lengths are interleaved (length i mod k), so `--limit` still covers every length.
Per-example metrics are named by the requested length, as lm-eval's RULER tasks do, plus
needle-depth bins and overall accuracy.
"""
from __future__ import annotations

import json
from typing import Any

from longctx.errors import LongctxError, choice_error

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
TASK_KEYS = {"max_seq_lengths", "num_samples", "seed", "haystack", "depths", "split", "tokenizer"}
# Model arguments that reach `custom_dataset` through lm-eval's metadata merge (ours and HFLM's).
MODEL_KEYS = {
    "pretrained", "adapter", "method", "chunk_size", "ssm_carry", "dtype", "attn_implementation",
    "max_length", "truncation", "device", "batch_size", "max_batch_size", "revision", "trust_remote_code",
    "backend", "parallelize", "add_bos_token", "use_fast_tokenizer", "peft", "logits_cache", "model",
    "prefix_token_id", "softmax_dtype", "subfolder", "think_end_token", "enable_thinking",
    "version", "config_source",  # added by lm-eval itself
}
DEPTH_BINS = 5


def depth_bin(depth: float) -> str:
    """Metric name of the depth bin holding `depth`: depth_0-20, …, depth_80-100 (percent)."""
    index = min(int(depth * DEPTH_BINS), DEPTH_BINS - 1)
    width = 100 // DEPTH_BINS
    return f"depth_{index * width}-{(index + 1) * width}"


def _lengths(value: Any) -> list[int]:
    from longctx.tasks import check_length_value

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise LongctxError(f"max_seq_lengths {value!r} is not a JSON list of integers") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise LongctxError(f"max_seq_lengths must be a non-empty list of integers, got {value!r}")
    return [check_length_value(v) for v in value]


def _tokenizer(options: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from longctx.models import resolve_base

    name = options.get("tokenizer") or options.get("pretrained")
    if not name or not isinstance(name, str):
        raise LongctxError("longctx tasks size prompts in the model's tokens: give model_args pretrained=… "
                           "or metadata {\"tokenizer\": …}")
    try:
        return AutoTokenizer.from_pretrained(resolve_base(name))
    except (OSError, ValueError) as err:
        raise LongctxError(f"cannot load tokenizer {name!r}: {str(err).splitlines()[0]}") from None


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validated task options from lm-eval's merged metadata (defaults filled in)."""
    unknown = sorted(k for k in options if k not in TASK_KEYS | MODEL_KEYS)
    if unknown:
        raise LongctxError(f"unknown metadata key {unknown[0]!r} (valid: {', '.join(sorted(TASK_KEYS))})")
    n = options.get("num_samples", 10)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LongctxError(f"num_samples {n!r} is not a positive integer")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LongctxError(f"seed {seed!r} is not an integer")
    split = options.get("split", "test")
    if split not in ("train", "validation", "test"):
        raise choice_error("split", split, ("train", "validation", "test"))
    out = {"lengths": _lengths(options.get("max_seq_lengths", list(DEFAULT_LENGTHS))), "n": n, "seed": seed,
           "split": split, "haystack": options.get("haystack")}
    if "depths" in options:
        out["depths"] = options["depths"]
    return out


def build_dataset(task: str, **options: Any) -> dict[str, Any]:
    """lm-eval `custom_dataset`: {"test": Dataset} of `task`, lengths interleaved."""
    import datasets

    from longctx.tasks import generate

    opts = parse_options(options)
    tokenizer = _tokenizer(options)
    extra = {"depths": opts["depths"]} if "depths" in opts else {}
    per_length = [generate(task, tokenizer, length, opts["n"], seed=opts["seed"], split=opts["split"],
                           haystack=opts["haystack"], **extra) for length in opts["lengths"]]
    rows = [per_length[j][i].to_dict() for i in range(opts["n"]) for j in range(len(per_length))]
    for row in rows:
        row["extra"] = json.dumps(row["extra"], sort_keys=True)
    return {"test": datasets.Dataset.from_list(rows)}


def _metrics(doc: dict[str, Any], score: float) -> dict[str, float]:
    metrics = {"acc": score, str(doc["max_length"]): score}
    if doc["task"] not in ("cwe", "fwe"):
        metrics[depth_bin(doc["depth"])] = score
    return metrics


def process_loglikelihood(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Accuracy = the answer is the model's greedy continuation (one forward pass); plus the
    answer's negative log-likelihood per token (`answer_nll`, nats), which still separates
    models when every accuracy is 0 or 1."""
    logprob, is_greedy = results[0]
    return {**_metrics(doc, float(is_greedy)), "answer_nll": -logprob / max(doc.get("target_tokens") or 1, 1)}


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """RULER's string match: the fraction of expected strings found in the generation."""
    text = results[0].strip().lower()
    score = sum(out.lower() in text for out in doc["outputs"]) / len(doc["outputs"])
    return _metrics(doc, score)


def _task(name: str):
    def custom_dataset(**options: Any) -> dict[str, Any]:
        return build_dataset(name, **options)
    custom_dataset.__name__ = name
    return custom_dataset


passkey = _task("passkey")
niah_single = _task("niah_single")
niah_multikey = _task("niah_multikey")
niah_multivalue = _task("niah_multivalue")
niah_multiquery = _task("niah_multiquery")
vt = _task("vt")
cwe = _task("cwe")
fwe = _task("fwe")
mqar = _task("mqar")
