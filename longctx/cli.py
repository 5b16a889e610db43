"""`longctx` command line: thin wrappers that parse, call the library, and print.

Bad input is reported as one line on stderr (`longctx: error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Sequence

from longctx.errors import LongctxError

METHOD_ORDER = ("base", "dense", "lora", "ssmlora", "ssmlora-scan")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own status)
        self.exit(2, f"longctx: error: {message}\n")


def _methods(value: str) -> list[str]:
    from longctx.adapters import ADAPTERS, get_adapter

    names = [m for m in ADAPTERS if m in METHOD_ORDER] if value == "all" else value.split(",")
    for name in names:
        get_adapter(name)
    return names


def cmd_params(args: argparse.Namespace) -> None:
    """Per method: insertion points and trainable / total parameters."""
    from longctx.models import load_base, meta_model
    from longctx.reports import format_table, params_rows

    def build():
        if args.base.startswith("shape:"):
            return meta_model(args.base.removeprefix("shape:"))
        return load_base(args.base)[0]

    print(format_table(params_rows(build, _methods(args.method), args.insertion)))


def cmd_forward(args: argparse.Namespace) -> None:
    """Score a long probe chunk-wise with each method; compare with the unchunked run."""
    from longctx.reports import forward_rows, format_table

    rows = forward_rows(args.base, _methods(args.method), args.length, args.chunk_size,
                        adapter=args.adapter, ssm_carry=args.ssm_carry, init=args.init,
                        seed=args.seed, compare=not args.no_compare, dtype=args.dtype)
    print(format_table(rows))


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Build an embedded base model with the project's recipe (or check the committed one)."""
    import json
    import tempfile
    from pathlib import Path

    from longctx.models import ASSETS_DIR
    from longctx.pretrain import EMBEDDED_NAME, pretrain

    if not args.verify:
        if not args.out:
            raise LongctxError("pretrain needs --out DIR (or --verify to rebuild and compare the committed base)")
        out = pretrain(Path(args.out), arch=args.arch, steps=args.steps, seed=args.seed)
        print(f"wrote {out}")
        return
    committed = json.loads((ASSETS_DIR / EMBEDDED_NAME / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = json.loads((pretrain(Path(tmp) / "rebuilt", arch=args.arch) / "manifest.json").read_text())
    same = rebuilt["model_sha256"] == committed["model_sha256"]
    print(f"committed {committed['model_sha256'][:16]}  rebuilt {rebuilt['model_sha256'][:16]}  "
          f"{'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="longctx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("params", help="insertion points and trainable/total parameters per method")
    p.add_argument("--base", default="longctx-tiny", help="base model, or shape:llama-2-7b (meta device)")
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
    f.add_argument("--dtype", default="float32")
    f.add_argument("--no-compare", action="store_true", help="skip the unchunked reference run")
    f.set_defaults(run=cmd_forward)
    t = sub.add_parser("pretrain", help="build an embedded base model with the project's recipe")
    t.add_argument("--out", default=None, help="output directory")
    t.add_argument("--verify", action="store_true", help="rebuild the committed base and compare its hash")
    t.add_argument("--arch", default="llama")
    t.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(run=cmd_pretrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
