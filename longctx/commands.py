"""What the `longctx` commands that load models do (`longctx.cli` parses the arguments, then calls
`cmd_<name>`): thin wrappers that call the library and print. A `LongctxError` raised here becomes
the command's one-line error with exit status 2 (`cli.main`).

`cli` imports this module only once the arguments of one of these commands have parsed, so
`longctx --help`, a bad argument and the commands that need no model (`sweep`, whose cells run in
child processes, `plot`, `fetch`: in `cli` itself) never wait for torch, transformers and lm-eval.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from longctx.adapters import METHOD_NAMES, get_adapter
from longctx.core.errors import LongctxError
from longctx.core.resources import task_dir
from longctx.core.tables import format_table
from longctx.demo import run_demo
from longctx.engine.bases import load_base, meta_model
from longctx.engine.settings import ASSETS_DIR
from longctx.lmeval.harness import run_cli
from longctx.lmeval.plugin import register
from longctx.pretrain.build import EMBEDDED_NAME, pretrain, recipe_overrides
from longctx.reports import forward_rows, params_rows
from longctx.sweep.run import report_outcome
from longctx.training.config import TrainConfig
from longctx.training.train import train_adapter


def _methods(value: str) -> list[str]:
    """The methods a --method value names ('all': every method, in display order), each checked."""
    names = list(METHOD_NAMES) if value == "all" else value.split(",")
    for name in names:
        get_adapter(name)
    return names


def cmd_params(args: argparse.Namespace) -> None:
    """Per method: insertion points and trainable / total parameters (sdlora's after its
    post-warm-up selection: what trains in the real run)."""
    def build():
        if args.base.startswith("shape:"):
            return meta_model(args.base.removeprefix("shape:"))
        return load_base(args.base)[0]

    print(format_table(params_rows(build, _methods(args.method), args.insertion)))


def cmd_forward(args: argparse.Namespace) -> None:
    """Score a long probe chunk-wise with each method; compare with the unchunked run."""
    rows = forward_rows(args.base, _methods(args.method), args.length, args.chunk_size,
                        adapter=args.adapter, ssm_carry=args.ssm_carry, init=args.init,
                        seed=args.seed, compare=not args.no_compare, dtype=args.dtype)
    print(format_table(rows))


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Build an embedded base model with the project's recipe (or check the committed one)."""
    if not args.verify:
        if not args.out:
            raise LongctxError("pretrain needs --out DIR (or --verify to rebuild and compare the committed base)")
        out = pretrain(Path(args.out), arch=args.arch, steps=args.steps, seed=args.seed, device=args.device,
                       progress=not args.quiet, time_limit_minutes=args.time_limit, **recipe_overrides(args.set))
        print(f"wrote {out}")
        return
    name = EMBEDDED_NAME if args.arch == "llama" else f"{EMBEDDED_NAME}-{args.arch}"
    if not (ASSETS_DIR / name / "manifest.json").is_file():
        raise LongctxError(f"no committed base for --arch {args.arch!r} (committed: {EMBEDDED_NAME}, "
                           f"{EMBEDDED_NAME}-mamba)")
    committed = json.loads((ASSETS_DIR / name / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {**committed["recipe"], "device": args.device}  # the committed base's own recipe
        rebuilt = json.loads((pretrain(Path(tmp) / "rebuilt", progress=True, **recipe) / "manifest.json").read_text())
    same = rebuilt["model_sha256"] == committed["model_sha256"]
    print(f"committed {committed['model_sha256'][:16]}  rebuilt {rebuilt['model_sha256'][:16]}  "
          f"{'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune one adapter on a task's train split."""
    overrides = {k: v for k, v in {"rank": args.rank, "alpha": args.alpha}.items() if v is not None}
    cfg = TrainConfig(method=args.method, task=args.task, train_length=args.train_length, out=args.out,
                      base=args.base, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                      seed=args.seed, overrides=overrides, dtype=args.dtype, chunk_size=args.chunk_size)
    print(f"adapter written to {train_adapter(cfg, progress=not args.quiet)}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main command: a small sweep on each embedded base, then plots and a summary.
    As `longctx sweep`: a line on stderr for each part with cells not ok; exit status 1 when a part
    has no ok cell."""
    parts = run_demo(args.out, quick=args.quick, retry_failed=args.retry_failed)
    if not all([report_outcome(results) for results in parts]):  # a list: every part's line is printed
        raise SystemExit(1)


def cmd_eval(args: argparse.Namespace) -> None:
    """lm-eval's own command line with `--model ssmlora` registered and our tasks included."""
    register()
    forwarded = list(args.args)
    if "--include_path" not in forwarded:
        forwarded += ["--include_path", str(task_dir())]
    run_cli(forwarded)
