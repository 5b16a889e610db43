"""Run several `longctx pretrain --arch mamba` recipes side by side on one GPU within a time budget.

Why: a borrowed GPU comes for minutes, and how fast transformers' mambapy scan trains on it
depends on how many runs share the card. Every variant is first run briefly, all at once (the
same sharing as the real runs); the seconds between its 5th and last log entry of each stage give
the cost of a step. Then each runs with as many steps as fit (or the steps of `--plan`), under
`longctx pretrain --time-limit`, so a run that is slower than planned still saves its model.
Each variant's model directory (model, tokenizer, manifest.json with the loss / probe log and
capability) and its JSON-line log land in OUT/<variant>/; a summary is printed at the end.

    python benchmarks/gpu/mamba_recipes.py OUT --until EPOCH_SECONDS [--only NAME ...] [--plan NAME=R,T ...]

Measured on an H100 with four variants sharing it (2026-11-26): a step took 0.24 s at d_model 256
and 0.14-0.15 s at 128, in both stages (64 x 256 and 32 x 512 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Shared by every variant: fp32 (the tiny model is launch-bound; bf16 buys nothing and risks the
# scan's precision), Zoology-style MQAR curriculum on tokens (stage 0, adaptive), then text with
# recall in the probes' own words (`mixed_blocks=table`) for 60% of its rows.
COMMON = ["precision=fp32", "recall_len=256", "recall_batch=64", "recall_pairs=32", "recall_advance=0.8",
          "seq_len=512", "batch_size=32", "mixed_blocks=table", "copy_share=0.6", "pool_tokens=2000000",
          "threads=2"]
# name -> (share of the training time given to the token MQAR stage, recipe fields)
VARIANTS: dict[str, tuple[float, list[str]]] = {
    "d128x2": (0.3, ["hidden_size=128", "num_layers=2", "learning_rate=3e-3"]),
    "d256x2": (0.2, ["hidden_size=256", "num_layers=2", "learning_rate=2e-3"]),
    "d192x3": (0.2, ["hidden_size=192", "num_layers=3", "learning_rate=2e-3"]),
    "d256x2-text-only": (0.0, ["hidden_size=256", "num_layers=2", "learning_rate=2e-3"]),
}
CALIBRATION_STEPS = 100  # per stage: 20 log entries, every 5 steps
STAGES = {"recall curriculum": "recall", "mixed": "text"}
SAVE_SECONDS = 60  # after training: the capability probes on CPU and the atomic save
EXTRA: list[str] = []  # --extra: fields set after the variant's (e.g. small shapes for a CPU dry run)
PRETRAIN = "import sys; from longctx.cli import main; sys.exit(main(sys.argv[1:]))"


def command(out: Path, recall_steps: int, text_steps: int, fields: list[str], device: str, until: float) -> list[str]:
    """The pretrain command line; its --time-limit ends training in time to probe and save by `until`."""
    fields = [*COMMON, *fields, *EXTRA, f"recall_steps={recall_steps}"]
    sets = [arg for field in fields for arg in ("--set", field)]
    minutes = max(0.1, (until - time.time() - SAVE_SECONDS) / 60)
    return [sys.executable, "-c", PRETRAIN, "pretrain", "--arch", "mamba", "--device", device, "--quiet",
            "--time-limit", f"{minutes:.2f}",
            "--out", str(out), "--steps", str(text_steps), *sets]


def step_seconds(log: Path) -> dict[str, float]:
    """Per stage: seconds per step between its 5th and last log entry (start-up and warm-up excluded)."""
    entries: dict[str, list[tuple[int, float]]] = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "seconds" in entry:
                entries.setdefault(STAGES[entry["stage"]], []).append((entry["step"], entry["seconds"]))
    return {stage: (e[-1][1] - e[4][1]) / (e[-1][0] - e[4][0]) for stage, e in entries.items() if len(e) > 5}


def launch(runs: dict[str, list[str]], logs: dict[str, Path], until: float) -> dict[str, float]:
    """Start every command at once; wait (killing what is still running at `until`); wall seconds each."""
    started = time.time()
    procs = {name: subprocess.Popen(cmd, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)
             for name, cmd in runs.items()}
    walls: dict[str, float] = {}
    while len(walls) < len(procs):
        for name, proc in procs.items():
            if name not in walls and proc.poll() is not None:
                walls[name] = time.time() - started
                print(f"  {name}: exit {proc.returncode} after {walls[name]:.0f} s", flush=True)
        if time.time() > until:
            for name, proc in procs.items():
                if name not in walls:
                    proc.kill()
                    walls[name] = float("inf")
                    print(f"  {name}: killed at the deadline", flush=True)
        time.sleep(1)
    return walls


def calibrate(names: list[str], until: float, device: str, steps: int) -> dict[str, dict[str, float]]:
    """Per variant: seconds per step of each stage, and the fixed seconds (start-up, probes, saving)."""
    scratch = Path(tempfile.mkdtemp(prefix="calibrate-"))
    runs = {name: command(scratch / name, steps if VARIANTS[name][0] else 0, steps, VARIANTS[name][1], device, until)
            for name in names}
    logs = {name: scratch / f"{name}.log" for name in names}
    walls = launch(runs, logs, until)
    costs = {}
    for name in names:
        per_step = step_seconds(logs[name])
        if walls[name] == float("inf") or "text" not in per_step or (VARIANTS[name][0] and "recall" not in per_step):
            print(f"  {name}: its calibration run failed or did not finish; dropped (log: {logs[name]})", flush=True)
            continue
        fixed = walls[name] - sum(per_step[stage] * steps for stage in per_step)
        costs[name] = {**{f"{s}_step_seconds": round(v, 4) for s, v in per_step.items()}, "fixed_seconds": round(fixed, 1)}
        print(f"  {name}: {costs[name]}", flush=True)
    return costs


def sized_steps(share: float, cost: dict[str, float], seconds: float) -> tuple[int, int]:
    """(recall steps, text steps) that fill `seconds` with the variant's stage costs, 15% spare."""
    train = 0.85 * (seconds - cost["fixed_seconds"] - SAVE_SECONDS)
    recall = int(share * train / cost["recall_step_seconds"]) if share else 0
    return recall, max(100, int((1 - share) * train / cost["text_step_seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--until", type=float, required=True, help="epoch seconds by which all must be done")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    parser.add_argument("--plan", nargs="*", default=[], metavar="NAME=RECALL,TEXT",
                        help="step counts per variant instead of calibrating")
    parser.add_argument("--extra", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--calibration", type=int, default=CALIBRATION_STEPS, metavar="STEPS")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"calibrating {len(args.only)} variants, {time.strftime('%X')}", flush=True)
    EXTRA.extend(args.extra)
    if args.plan:  # steps given (from an earlier calibration): no calibration runs
        plan = {name: tuple(int(n) for n in steps.split(",")) for name, steps in
                (item.split("=") for item in args.plan)}
        args.only, costs = list(plan), {name: "given" for name in plan}
    else:
        costs = calibrate(args.only, args.until, args.device, args.calibration)
        args.only = [name for name in args.only if name in costs]
        plan = {name: sized_steps(VARIANTS[name][0], costs[name], args.until - time.time()) for name in args.only}
    seconds = args.until - time.time()
    print(f"training with {seconds:.0f} s left: {plan}", flush=True)
    runs = {name: command(args.out / name / "model", *plan[name], VARIANTS[name][1], args.device, args.until)
            for name in args.only}
    for name in args.only:
        (args.out / name).mkdir(exist_ok=True)
    walls = launch(runs, {name: args.out / name / "log.jsonl" for name in args.only}, args.until)
    summary = {}
    for name in args.only:
        manifest = args.out / name / "model" / "manifest.json"
        done = json.loads(manifest.read_text()) if manifest.is_file() else {}
        summary[name] = {"steps": plan[name], "wall": walls[name], "calibration": costs[name],
                         "capability": done.get("capability"), "stopped_early": done.get("stopped_early"),
                         "last": (done.get("loss_log") or [None])[-1]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
