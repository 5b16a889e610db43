"""The glue between the generators and lm-eval's task YAMLs (`longctx/lmeval/tasks/*.yaml`), and
the one module they name: lm-eval loads `!function glue.X` from the file next to the YAML.

Every YAML's `custom_dataset` is `build_dataset`; `LongctxTask` passes it the generator's name,
read off the task's own (`longctx_<task>` or `longctx_<task>_gen`), so no YAML repeats it.

lm-eval calls a task's `custom_dataset` with the `--metadata` JSON merged over the
`--model_args` (that is how RULER's tasks find their tokenizer), so `build_dataset` separates the
two: task keys are validated, known model arguments are ignored, anything else is an error.
Examples of all lengths are interleaved (length i mod k), so `--limit` still covers every length.
Per-example metrics are named by the requested length, as lm-eval's RULER tasks do, plus
needle-depth bins and overall accuracy. Each document carries its example's `extra` as JSON; the
needle tasks' names the haystack and whether the filler repeated it (`haystack`,
`haystack_repeated`), which the sweep's results rows report per length (`longctx.sweep.cell`).

Length L = the whole request fits in L tokens: the model's special tokens (BOS, as its tokenizer
adds them under `add_bos_token`) + prompt + answer (log-likelihood form) or + the generation
budget (generation form: the template's `dataset_kwargs.max_gen_toks`, the same number as its
`generation_kwargs.max_gen_toks`).

Every document of a run reports the same metric names — `acc`, `answer_nll` (log-likelihood
form), each length of the run and each depth bin of the dataset — with None where a name does
not apply (another length, another bin); length and depth metrics average the values present
(`mean_present`, with `longctx.lmeval.tasks.glue.LongctxTask` applying it to lengths the YAML
does not list). Same names on every document is what lm-eval's gathering across processes
(`accelerate launch`) needs: it looks every process's metrics up by rank 0's names.

A request the model refuses (its length is over the position limit, `truncation=refuse`) scores
NaN in every metric it counts in: its length, its depth bin, `acc` and `answer_nll`. So lm-eval's
table shows `nan` for a refused length (and for the run-wide `acc`, which would otherwise average
over fewer lengths than asked for), while every evaluated length shows its score.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

import datasets
from lm_eval.api.task import ConfigurableTask
from transformers import AutoTokenizer

from longctx.core.errors import LongctxError, choice_error
from longctx.engine.settings import base_source
from longctx.lmeval.args import MODEL_KEYS, flag
from longctx.tasks import check_length_value, generate

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
TASK_KEYS = {"max_seq_lengths", "num_samples", "seed", "haystack", "depths", "split", "tokenizer"}
# MODEL_KEYS (`longctx.lmeval.args`): the model arguments that reach `custom_dataset` through lm-eval's
# metadata merge, ours and every keyword of the installed lm-eval's HFLM (so `--model hf` runs them too).
DEPTH_BINS = 5
# What the `ssmlora` model returns for a refused generation request (a log-likelihood request: NaN).
REFUSED_GENERATION = "[longctx: request refused: longer than the model's position limit]"


def depth_bin(depth: float) -> str:
    """Metric name of the depth bin holding `depth`: depth_0-20, …, depth_80-100 (percent)."""
    index = min(int(depth * DEPTH_BINS), DEPTH_BINS - 1)
    width = 100 // DEPTH_BINS
    return f"depth_{index * width}-{(index + 1) * width}"


def _lengths(value: Any) -> list[int]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise LongctxError(f"max_seq_lengths {value!r} is not a JSON list of integers") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise LongctxError(f"max_seq_lengths must be a non-empty list of integers, got {value!r}")
    return [check_length_value(v) for v in value]


def load_tokenizer(options: dict[str, Any]) -> Any:
    """The model's tokenizer as the `ssmlora` (or `hf`) model will load it: `tokenizer` (else
    `pretrained`), with `revision`, `subfolder`, `use_fast_tokenizer`, `add_bos_token` and
    `trust_remote_code` from the model arguments, as lm-eval's `hf` passes them."""
    name = options.get("tokenizer") or options.get("pretrained")
    if not name or not isinstance(name, str):
        raise LongctxError("longctx tasks size prompts in the model's tokens: give model_args pretrained=… "
                           "or metadata {\"tokenizer\": …}")
    kwargs = {"trust_remote_code": bool(flag("trust_remote_code", options.get("trust_remote_code")))}
    bos, fast = flag("add_bos_token", options.get("add_bos_token")), flag("use_fast_tokenizer",
                                                                          options.get("use_fast_tokenizer"))
    if bos is not None:
        kwargs["add_bos_token"] = bos
    gguf = options.get("gguf_file") if not options.get("tokenizer") else None
    if fast is not None and not gguf:  # as hf: a GGUF file's own tokenizer takes no use_fast
        kwargs["use_fast"] = fast
    path, source = base_source(name, gguf, options.get("revision"), options.get("subfolder"))
    try:
        return AutoTokenizer.from_pretrained(path, **source, **kwargs)
    except (OSError, ValueError) as err:
        raise LongctxError(f"cannot load tokenizer {name!r}: {str(err).splitlines()[0]}") from None


def special_tokens(tokenizer: Any, add_bos_token: bool | None) -> int:
    """Tokens lm-eval's HF model adds to every request (`tok_encode`: the tokenizer's special
    tokens unless add_bos_token=False)."""
    if add_bos_token is False:
        return 0
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


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


def build_dataset(task: str, max_gen_toks: Any = None, **options: Any) -> dict[str, Any]:
    """lm-eval `custom_dataset`: {"test": Dataset} of `task`, lengths interleaved; `max_gen_toks`
    (the generation form's `dataset_kwargs`) sizes requests as prompt + generation budget."""
    opts = parse_options(options)
    tokenizer = load_tokenizer(options)
    extra = {"depths": opts["depths"]} if "depths" in opts else {}
    special = special_tokens(tokenizer, flag("add_bos_token", options.get("add_bos_token")))
    per_length = [generate(task, tokenizer, length, opts["n"], seed=opts["seed"], split=opts["split"],
                           haystack=opts["haystack"], max_gen_toks=max_gen_toks, special_tokens=special, **extra)
                  for length in opts["lengths"]]
    rows = [per_length[j][i].to_dict() for i in range(opts["n"]) for j in range(len(per_length))]
    bins = sorted({depth_bin(row["depth"]) for row in rows}, key=lambda b: int(b.split("_")[1].split("-")[0]))
    for row in rows:  # every doc names the run's lengths and depth bins (see the module docstring)
        row["extra"] = json.dumps(row["extra"], sort_keys=True)
        row["lengths"], row["depth_bins"] = list(opts["lengths"]), bins
    return {"test": datasets.Dataset.from_list(rows)}


def mean_present(values: list[Any]) -> Any:
    """Mean of the values that apply (None: another length or bin); NaN (refused) propagates.
    "N/A" when none apply (e.g. `--limit` left no document of that length)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else "N/A"


def _metrics(doc: dict[str, Any], score: float, nll: float | None = None) -> dict[str, Any]:
    """Every metric name of the run: the doc's own length and depth bin get `score`, the others None."""
    metrics: dict[str, Any] = {"acc": score}
    if nll is not None:
        metrics["answer_nll"] = nll
    own = str(doc["max_length"])
    for length in doc.get("lengths") or [doc["max_length"]]:
        metrics[str(length)] = score if str(length) == own else None
    if doc["task"] not in ("cwe", "fwe"):
        here = depth_bin(doc["depth"])
        for name in doc.get("depth_bins") or [here]:
            metrics[name] = score if name == here else None
    return metrics


def process_loglikelihood(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """Accuracy = the answer is the model's greedy continuation (one forward pass); plus the
    answer's negative log-likelihood per token (`answer_nll`, nats), which still separates
    models when every accuracy is 0 or 1. A NaN log-likelihood is a refused request."""
    logprob, is_greedy = results[0]
    if isinstance(logprob, float) and math.isnan(logprob):
        return _metrics(doc, math.nan, math.nan)
    return _metrics(doc, float(is_greedy), -logprob / max(doc.get("target_tokens") or 1, 1))


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """RULER's string match: the fraction of expected strings found in the generation."""
    if results[0] == REFUSED_GENERATION:
        return _metrics(doc, math.nan)
    text = results[0].strip().lower()
    score = sum(out.lower() in text for out in doc["outputs"]) / len(doc["outputs"])
    return _metrics(doc, score)


def generator_name(task_name: str) -> str:
    """The generator behind a YAML task: `longctx_passkey_gen` -> `passkey`."""
    name = task_name.removeprefix("longctx_").removesuffix("_gen")
    if not task_name.startswith("longctx_") or not name:
        raise LongctxError(f"task {task_name!r} is not a longctx task (longctx_<task>[_gen])")
    return name


class _Aggregations(dict):
    """The task's aggregation table; metrics it does not list average their present values."""

    def __missing__(self, metric: str) -> Callable[[list[Any]], Any]:
        return mean_present


class LongctxTask(ConfigurableTask):
    """A `ConfigurableTask` (config from the YAML) that names its generator to `build_dataset` and
    aggregates every metric the YAML does not list (a length such as 300 or 5000) with
    `mean_present`, not with lm-eval's plain mean over the other lengths' None."""

    def __init__(self, data_dir: Any = None, cache_dir: Any = None, download_mode: Any = None,
                 config: dict | None = None) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # lm-eval's routing key
        config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}), "task": generator_name(config["task"])}
        super().__init__(data_dir, cache_dir, download_mode, config)

    def aggregation(self) -> dict[str, Callable[[list[Any]], Any]]:
        return _Aggregations(super().aggregation())
