"""Child process of `longctx sweep`: for one cell group (`GroupPlan`) it trains the adapter
if it is not cached yet — and exits, so that a fresh child measures the evaluation's memory —
or evaluates the given cells (lengths) through lm-eval in increasing order, appending one
results row per cell as soon as it is measured.

`python -m longctx.sweep.cell JOB.json` (the sweep writes the job next to the log). Its stdout
and stderr are the cell log (warnings and logging on); before each phase it prints a marker line
(`longctx-sweep-cell: begin train|trained|load|length=L`) by which the driver enforces time limits and
knows which cell was in flight. A cell that fails is recorded as `error`, or `oom` for
out-of-memory (CUDA or CPU), and the next cell still runs; a failed training records every cell.
Ctrl-C ends the child by SIGINT, which the driver reads as cancelled: no row for the cell in flight.
The protocol (phases, rows, failures) is `longctx.sweep.child`, run here with the real training,
loading and evaluation; the driver's side (starting, watching and timing children) is
`longctx.sweep.supervisor`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager

from longctx.core.fileio import atomic_write_text
from longctx.lmeval.model import SsmloraLM
from longctx.sweep import child
from longctx.sweep.group import GroupPlan
from longctx.tasks import haystack_for
from longctx.training.config import TrainConfig
from longctx.training.train import train_adapter


def evaluate_length(lm: Any, job: GroupPlan, length: int, cell_id: str) -> dict[str, Any]:
    """One lm-eval run of the task at one length; the row's measured fields. The haystack fields come
    from the evaluated documents' `extra` (samples logged for that, not written out): its name, and
    whether any example's filler outran it and repeated."""
    cfg, group, task = job.config, job.group, f"longctx_{job.group.task}"
    metadata = {"max_seq_lengths": [length], "num_samples": cfg["num_samples"], "seed": group.seed,
                "tokenizer": cfg["base"]}
    if cfg.get("depths") is not None:
        metadata["depths"] = cfg["depths"]
    if haystack_for(cfg.get("haystack"), group.task) is not None:
        metadata["haystack"] = haystack_for(cfg["haystack"], group.task)
    manager = TaskManager(include_path=job.tasks_dir, include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, random_seed=group.seed,
                                      log_samples=True)
    metrics = results["results"][task]
    extras = [json.loads(sample["doc"].get("extra") or "{}") for sample in results.pop("samples")[task]]
    haystacks = sorted({e["haystack"] for e in extras if e.get("haystack")})
    out = (Path(job.out) / "lm_eval" / group.method / group.task
           / f"seed{group.seed}-{group.chunk_label}-{length}-{cell_id}.json")
    atomic_write_text(out, json.dumps({"results": results["results"], "config": results["config"]},
                                      indent=2, default=str) + "\n")
    record = lm.log.per_length().get(str(length), {})
    depth = {k.split(",")[0]: v for k, v in metrics.items() if k.startswith("depth_") and "stderr" not in k}
    return {"n": int(results["n-samples"][task]["effective"]), "acc": metrics.get("acc,none"),
            "stderr": _number(metrics.get("acc_stderr,none")), "answer_nll": _number(metrics.get("answer_nll,none")),
            "peak_memory_bytes": record.get("peak_memory_bytes"),
            "request_memory_bytes": record.get("peak_memory_delta_bytes"), "tokens_per_s": record.get("tokens_per_s"),
            "depth_acc": depth or None, "haystack": ",".join(haystacks) or None,
            "haystack_repeated": any(e.get("haystack_repeated", False) for e in extras), "lm_eval_output": str(out),
            **_status(lm, length, record)}


def _status(lm: Any, length: int, record: dict[str, Any]) -> dict[str, str]:
    """`ok`, or `error` naming the limit when the model refused requests of this length (they score NaN)."""
    refused = record.get("refused") or 0
    if not refused and record.get("status") not in ("refused", "partial"):
        return {"status": "ok", "message": ""}
    return {"status": "error", "message": f"length {length} refused ({refused} of {record.get('requests')} "
                                          f"requests): requests of up to {record.get('max_request_tokens')} tokens "
                                          f"do not fit the limit of {getattr(lm, 'position_limit', None)} tokens"}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def load_lm(job: GroupPlan) -> Any:
    """The lm-eval model of the job: its trained adapter, or the untrained method (`base`)."""
    cfg, group = job.config, job.group
    source = {"adapter": job.adapter} if job.adapter else {"method": group.method}
    return SsmloraLM(pretrained=cfg["base"], chunk_size=group.chunk_size, ssm_carry=cfg["ssm_carry"],
                     dtype=cfg["dtype"], truncation=cfg["truncation"], seed=group.seed,
                     rope_scaling=cfg.get("rope_scaling"), **source)


def train(job: GroupPlan) -> None:
    """Train the job's adapter into its cache directory (atomic; resumes from checkpoints)."""
    train_adapter(TrainConfig(**job.train), progress=False)
    child.release_memory()


def main(argv: list[str] | None = None) -> None:
    """`python -m longctx.sweep.cell JOB.json`: the child protocol with the real work."""
    child.main(argv, evaluate=evaluate_length, load=load_lm, trainer=train)


if __name__ == "__main__":
    main()
