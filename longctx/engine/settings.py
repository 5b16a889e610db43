"""What a user names for a base and its runs, checked and resolved without importing torch: the
base (embedded, real GGUF, local directory or hub id), the dtype, rope scaling, how the adapters'
state crosses chunk boundaries and what happens to a request over the position limit.

Kept apart from `engine.bases` (which loads models) so the sweep's driver, its config and the
command line validate and resolve these in a process that never imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from longctx.core.errors import LongctxError, choice_error
from longctx.core.fetch import cache_root
from longctx.core.resources import assets_dir
from longctx.engine.gguf import converted_dir, is_gguf

EMBEDDED_BASES = {"longctx-tiny": "llama", "longctx-tiny-mamba": "mamba"}  # name -> architecture of the recipe
ASSETS_DIR = assets_dir()
ROPE_TYPES = ("linear", "dynamic", "yarn")
# A dtype as the user may name it -> torch's name for it (`engine.bases.DTYPES` maps these to dtypes).
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}
CARRY_CHOICES = ("chunk", "reset")  # the adapters' SSM state at a chunk boundary: carried, or reset
TRUNCATION_CHOICES = ("refuse", "left", "middle")  # a request over the position limit: refused, or cut


def check_dtype(name: str) -> str:
    """`name` if it names a dtype (or is "auto": the checkpoint's own, as lm-eval's `hf`), else the
    one-line error naming the choices."""
    if name != "auto" and name not in DTYPE_ALIASES:
        raise choice_error("dtype", name, ("auto", *DTYPE_ALIASES))
    return name


def default_base_path(name: str = "longctx-tiny") -> Path:
    """Directory of an embedded base (HF format): the committed copy under `longctx/assets/`, else
    one built into `$LONGCTX_CACHE` (default `~/.cache/longctx`) by `longctx pretrain`."""
    if name not in EMBEDDED_BASES:
        raise choice_error("embedded base", name, EMBEDDED_BASES)
    committed = ASSETS_DIR / name
    if (committed / "config.json").is_file():
        return committed
    cache = cache_root() / name
    if not (cache / "config.json").is_file():
        raise LongctxError(f"embedded base {name!r} is missing from {committed} and {cache}; build it with "
                           f"`longctx pretrain --arch {EMBEDDED_BASES[name]} --out {cache}`")
    return cache


def resolve_base(name_or_path: str, gguf_file: str | None = None) -> str:
    """Map an embedded name to its directory and a GGUF base (a real base's name, a `.gguf` path, or
    lm-eval's `pretrained=DIR,gguf_file=NAME`) to its dequantised cache; pass local directories and
    hub ids through."""
    return base_source(name_or_path, gguf_file)[0]


def base_source(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                subfolder: str | None = None) -> tuple[str, dict[str, str]]:
    """(what to load, from_pretrained's `revision`/`subfolder` keywords), as lm-eval's `hf` passes
    them. A hub id or local directory takes both (transformers ignores a revision for a directory).
    An embedded base has no revisions or subfolders, and a GGUF base is read by path and cached by
    its hash: there a revision other than `main` is refused, and a subfolder is where `gguf_file`
    lies in DIR (`pretrained=DIR,subfolder=S,gguf_file=F` reads DIR/S/F)."""
    name, pinned = str(name_or_path), revision is not None and str(revision) not in ("", "main")
    if name in EMBEDDED_BASES:
        for key, value in (("revision", revision if pinned else None), ("subfolder", subfolder)):
            if value:
                raise LongctxError(f"{key}={value!r} does not apply to the embedded base {name!r}: it is built "
                                   f"locally, one directory with no revisions or subfolders; leave {key} out")
        return str(default_base_path(name)), {}
    if is_gguf(name, gguf_file):
        if pinned:
            raise LongctxError(f"revision={revision!r} does not apply to a GGUF base: its file is read as it is "
                               f"(from DIR or the local hub cache) and cached by its hash; name the file you mean")
        if subfolder and not gguf_file:
            raise LongctxError(f"subfolder={subfolder!r} applies to pretrained=DIR,gguf_file=NAME only, not to "
                               f"{name!r}: give the .gguf file's path")
        member = f"{str(subfolder).strip('/')}/{gguf_file}" if subfolder else gguf_file
        return str(converted_dir(name, member)), {}
    source = {"revision": str(revision)} if pinned else {}
    return name, {**source, **({"subfolder": str(subfolder)} if subfolder else {})}


def parse_rope_scaling(value: Any) -> dict[str, Any] | None:
    """Rope scaling as transformers defines it, from `TYPE:FACTOR` (e.g. `yarn:4`), a mapping with
    `rope_type` and `factor`, or None / "none" (the checkpoint's own positions)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, dict):
        kind, factor = value.get("rope_type"), value.get("factor")
    else:
        kind, _, factor = str(value).partition(":")
    if kind not in ROPE_TYPES:
        raise choice_error("rope_scaling type", kind, ROPE_TYPES)
    try:
        parsed = float(factor)
    except (TypeError, ValueError):
        parsed = float("nan")
    if not parsed > 1:
        raise LongctxError(f"rope_scaling factor must be a number above 1, got {factor!r} (e.g. rope_scaling=yarn:4)")
    return {"rope_type": kind, "factor": parsed}
