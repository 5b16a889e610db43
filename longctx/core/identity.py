"""Every identity hash of longctx, in one place: of a base's weights, of a base's files, of an
adapter's training inputs, of a results cell and of a sweep's cell group. Pure functions of the
values their callers resolve (paths, hashes, recipes), so nothing here imports above `core`.

A hash here decides what is reused (an adapter, a finished cell) and what is refused (an adapter on
another base), so each is defined once and its inputs are spelled out in its docstring.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.core.fetch import sha256_file

if TYPE_CHECKING:  # annotations only: the sweep's driver imports this module without torch
    import torch
    from torch import nn


def fingerprint(model: nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """Hash of the base's architecture, parameter names/shapes and leading weight values.

    Cheap (a few values per tensor) yet distinguishes two checkpoints of one architecture, so an
    adapter trained on one base is refused on another. Meta tensors contribute shapes only.
    `as_dtype`: hash the values as they read once cast to that dtype, so a float32 base and its
    bf16 copy agree at bfloat16 (casting rounds the same way whatever did it).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    for name, param in model.named_parameters():
        clean = re.sub(r"(base_model\.model\.|\.base_layer)", "", name)
        digest.update(f"{clean}:{tuple(param.shape)};".encode())
        if param.device.type != "meta":
            head = param.detach().reshape(-1)[:16]
            head = (head if as_dtype is None else head.to(as_dtype)).float().cpu()  # (≤16,) float32
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- the sweep's identities: pure functions of resolved values (the sweep resolves names and files) ----

IDENTITY_VERSION = 1  # bump when a cell identity's definition changes (every cell then reruns)
FULL_HASH_BYTES = 256 << 20  # base files up to this size are hashed whole; larger ones sampled
BASE_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".gguf")


def cell_identity(inputs: dict[str, Any]) -> str:
    """A stable hash of identity inputs (canonical JSON, key order irrelevant): a cell's id, and
    every other sweep hash built on it (adapter key, group tag, legacy row id)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_identity(name: str, directory: Path | None = None, gguf_sha256: str | None = None) -> str:
    """Identity of a base's files, without loading it. A GGUF base is its file's sha256
    (`gguf:<16 hex>`); a directory, the names, sizes and contents of its config, tokenizer and
    weight files (sampled blocks of files over 256 MiB; `manifest.json` left out); a base with
    neither (a hub id not in the local cache), its name (`name:<name>`)."""
    if gguf_sha256 is not None:
        return "gguf:" + gguf_sha256[:16]
    if directory is None:
        return f"name:{name}"
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.suffix in BASE_FILE_SUFFIXES and path.name != "manifest.json":
            digest.update(f"{path.name}:{path.stat().st_size}:".encode() + _file_digest(path))
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> bytes:
    """sha256 of a whole file up to FULL_HASH_BYTES (`fetch.sha256_file`), else of 17 blocks of
    1 MiB spread over it."""
    size, block = path.stat().st_size, 1 << 20
    if size <= FULL_HASH_BYTES:
        return bytes.fromhex(sha256_file(path))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for i in range(17):  # the header, 15 blocks spread over the values, the end
            handle.seek(max(0, min(i * (size // 16), size - block)))
            digest.update(handle.read(block))
    return digest.digest()


def adapter_key(base: str, base_id: str, recipe: dict[str, Any], training: dict[str, Any] | None) -> str:
    """Key of a trained adapter: everything it depends on (the base's name and files' identity,
    the recipe with overrides, the training settings), so a cached adapter is reused exactly when
    training it again would give the same one."""
    return cell_identity({"base": {"name": base, "id": base_id}, "recipe": recipe, "training": training})


def cell_inputs(*, base: str, base_id: str, method: str, recipe: dict[str, Any], training: dict[str, Any] | None,
                task: str, length: int, num_samples: int, seed: int, haystack: str | None,
                depths: list[float] | None, chunk_size: int | None, ssm_carry: str, truncation: str, dtype: str,
                rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The one definition of a cell's identity: every input that changes its result. The carry mode
    counts only when chunked; `rope_scaling` only when set (so identities from before it still hold)."""
    evaluation = {"chunk_size": chunk_size, "ssm_carry": ssm_carry if chunk_size else None,
                  "truncation": truncation, "dtype": dtype, **({"rope_scaling": rope_scaling} if rope_scaling else {})}
    return {"version": IDENTITY_VERSION, "base": {"name": base, "id": base_id}, "method": method, "recipe": recipe,
            "training": training,
            "task": {"name": task, "length": length, "num_samples": num_samples, "seed": seed, "haystack": haystack,
                     "depths": depths, "tokenizer": base},
            "evaluation": evaluation}


def chunk_label(chunk_size: int | None) -> str:
    """How file names spell an evaluation chunk size: `chunk256`, or `unchunked` (whole sequences)."""
    return f"chunk{chunk_size}" if chunk_size else "unchunked"


def group_tag(method: str, task: str, seed: int, chunk_size: int | None, train_chunk_size: int | None,
              cell_ids: list[str]) -> str:
    """A cell group's name (its log's stem, its dispatch-state key and lock file):
    `<method>[-trainchunk<T>]-<task>-<chunk label>-seed<S>-<hash of all its cells' ids>`."""
    trained = f"-trainchunk{train_chunk_size}" if train_chunk_size else ""
    digest = cell_identity({"cells": list(cell_ids)})[:10]
    return f"{method}{trained}-{task}-{chunk_label(chunk_size)}-seed{seed}-{digest}"
