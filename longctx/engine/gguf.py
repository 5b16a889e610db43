"""GGUF checkpoints as bases: dequantised once into a HF directory cached by the file's sha256.

A GGUF base is named as lm-eval's `hf` names it (`pretrained=DIR,gguf_file=NAME.gguf`), by a path
to a `.gguf` file, or by a real base's name (`smollm2-135m`, fetched with `longctx fetch`).
transformers dequantises GGUF into an ordinary model (float32) through the optional `gguf` package;
that takes about a minute on 2 CPU cores, so the result (safetensors + tokenizer) is cached under
`$LONGCTX_CACHE/gguf/<sha256[:16]>/` and later loads take seconds. The base's identity is the
GGUF file's hash.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from longctx.core.errors import LongctxError
from longctx.core.fetch import SMOLLM2, SMOLLM2_GGUF_SHA256, cache_root, require, sha256_file
from longctx.core.fileio import atomic_directory

# name -> (the fetched asset holding its GGUF, that file's sha256)
REAL_BASES = {SMOLLM2.name: (SMOLLM2, SMOLLM2_GGUF_SHA256)}
GGUF_MISSING = ("reading a GGUF checkpoint needs the optional `gguf` package (longctx's `gguf` extra): "
                "pip install gguf")


def is_gguf(name_or_path: str, gguf_file: str | None = None) -> bool:
    """Whether a base names a GGUF checkpoint (a real base's name, a .gguf path, or gguf_file)."""
    return bool(gguf_file) or str(name_or_path) in REAL_BASES or str(name_or_path).endswith(".gguf")


def gguf_path(name_or_path: str, gguf_file: str | None = None) -> Path:
    """The GGUF file a base names: a real base's fetched file, `DIR/gguf_file` (a local directory or a
    hub id already in the local HF cache), or a path to a `.gguf` file."""
    if str(name_or_path) in REAL_BASES:
        asset, _ = REAL_BASES[str(name_or_path)]
        return require(asset.name) / Path(asset.member).name
    if gguf_file:
        local = Path(name_or_path) / gguf_file
        if local.is_file():
            return local
        cached = _hub_cached(str(name_or_path), gguf_file)
        if cached is None:
            raise LongctxError(f"GGUF file {gguf_file!r} not found in {str(name_or_path)!r} (a local directory, or a "
                               f"hub id already in the local cache; nothing is downloaded at run time)")
        return cached
    path = Path(name_or_path)
    if not path.is_file():
        raise LongctxError(f"GGUF file {str(name_or_path)!r} does not exist")
    return path


def _hub_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
    except Exception:  # not a repo id: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) else None


def gguf_sha256(name_or_path: str, gguf_file: str | None = None) -> str:
    """The GGUF file's sha256: pinned for a real base (known before it is fetched), else read."""
    if str(name_or_path) in REAL_BASES:
        return REAL_BASES[str(name_or_path)][1]
    return sha256_file(gguf_path(name_or_path, gguf_file))


def converted_dir(name_or_path: str, gguf_file: str | None = None) -> Path:
    """The dequantised HF directory of a GGUF base, converting it on first use."""
    source = gguf_path(name_or_path, gguf_file)
    sha = gguf_sha256(name_or_path, gguf_file)
    target = cache_root() / "gguf" / sha[:16]
    if not (target / "manifest.json").is_file():
        convert(source, target, sha)
    return target


def convert(source: Path, target: Path, sha: str) -> Path:
    """Dequantise `source` with transformers and save it (safetensors, float32) with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise LongctxError(GGUF_MISSING)
    import transformers  # deferred: heavy, and only a conversion needs it here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sha256_file(source) != sha:
        raise LongctxError(f"GGUF file {str(source)!r} does not have the expected sha256 {sha[:16]}…; "
                           f"fetch it again with `longctx fetch --force`")
    print(f"longctx: dequantising {source.name} into {target} (once; about a minute on 2 CPU cores)",
          flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    except (OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LongctxError(f"cannot read GGUF file {str(source)!r}: {first}") from None
    model.hf_quantizer = None  # dequantised already: saving refuses while a quantizer is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {"gguf_file": source.name, "gguf_sha256": sha, "transformers": transformers.__version__,
                    "dtype": "float32"}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return target
