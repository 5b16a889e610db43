"""Child process of `longctx sweep`: evaluate one (method, task, seed) through lm-eval at each
given length, in increasing order, appending one results row per length as soon as it is done.

`python -m longctx.sweep_cell JOB_JSON` (the sweep builds the job). A length that fails is
recorded as `error` (or `oom`) and the next length still runs.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from longctx.fileio import atomic_write_text
from longctx.results import append_row


def _row(job: dict[str, Any], length: int, **values: Any) -> dict[str, Any]:
    cfg = job["config"]
    return {"method": job["method"], "base": cfg["base"], "task": job["task"], "length": length,
            "seed": job["seed"], "chunk_size": job["chunk_size"], "train_length": cfg["train_length"],
            "git_commit": job["git_commit"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **values}


def evaluate_length(lm: Any, job: dict[str, Any], length: int) -> dict[str, Any]:
    """One lm-eval run of the task at one length; the row's measured fields."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg, task = job["config"], f"longctx_{job['task']}"
    manager = TaskManager(include_path=job["tasks_dir"], include_defaults=False,
                          metadata={"max_seq_lengths": [length], "num_samples": cfg["num_samples"],
                                    "seed": job["seed"], "tokenizer": cfg["base"]})
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, random_seed=job["seed"],
                                      log_samples=False)
    metrics = results["results"][task]
    chunk = f"chunk{job['chunk_size']}" if job["chunk_size"] else "unchunked"
    out = Path(job["out"]) / "lm_eval" / job["method"] / job["task"] / f"seed{job['seed']}-{chunk}-{length}.json"
    atomic_write_text(out, json.dumps({"results": results["results"], "config": results["config"]},
                                      indent=2, default=str) + "\n")
    record = lm.log.per_length().get(str(length), {})
    depth = {k.split(",")[0]: v for k, v in metrics.items() if k.startswith("depth_") and "stderr" not in k}
    return {"n": int(results["n-samples"][task]["effective"]), "acc": metrics.get("acc,none"),
            "stderr": _number(metrics.get("acc_stderr,none")), "answer_nll": _number(metrics.get("answer_nll,none")), "peak_memory_bytes": record.get("peak_memory_bytes"),
            "tokens_per_s": record.get("tokens_per_s"), "depth_acc": depth or None,
            "lm_eval_output": str(out), "status": "ok", "message": ""}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def run(job: dict[str, Any]) -> None:
    import torch

    from longctx.errors import LongctxError
    from longctx.lmeval_model import SsmloraLM

    cfg = job["config"]
    source = {"adapter": job["adapter"]} if job["adapter"] else {"method": job["method"]}
    lm = SsmloraLM(pretrained=cfg["base"], chunk_size=job["chunk_size"], truncation=cfg["truncation"],
                   seed=job["seed"], **source)
    params = {"trainable_parameters": lm.description["trainable_parameters"],
              "total_parameters": lm.description["total_parameters"]}
    results = Path(job["out"]) / "results.jsonl"
    for length in job["lengths"]:
        try:
            values = evaluate_length(lm, job, length)
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:
            values = {"n": 0, "status": "oom", "message": str(err).splitlines()[0][:500]}
        except (LongctxError, RuntimeError, ValueError) as err:
            values = {"n": 0, "status": "error", "message": f"{type(err).__name__}: {err}"[:500]}
        append_row(results, _row(job, length, **params, **values))


if __name__ == "__main__":
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    run(json.loads(sys.argv[1]))
