"""The recipe of the embedded base models `longctx-tiny` / `longctx-tiny-mamba` (`longctx pretrain`).

A byte-level BPE tokenizer (digits split one by one, so numbers are copied digit by digit) and a
small Llama or Mamba are trained with HF `Trainer` in up to three stages:

0. recall curriculum (Mamba): multi-query associative recall on random tokens as in Zoology
   (Arora et al., 2023, arXiv 2312.04927): key-value pairs, then queried keys whose values must
   follow; the number of pairs doubles from 4 up to `recall_pairs` over the stage (each batch
   draws its count up to the current level), in equal shares or, with `recall_advance`, once
   held-out recall at the current level is good enough. Attention learns recall from text alone; Mamba at
   this size did not (0 on every probe after the mixed stage) — MQAR is the task the Mamba and
   Zoology papers show small SSMs solving.
1. copy warm-up: blocks of random tokens in which spans reappear at random later offsets; loss
   only on the predictable copied tokens. This is the cleanest signal for an induction circuit
   (find the earlier occurrence, continue from it; Olsson et al., 2022). Random *offsets* matter:
   with a fixed offset a RoPE model learns a positional shortcut instead.
2. mixed stage: prose that ships with Python, synthetic copy / associative-recall / needle-in-
   prose documents (`longctx.pretrain.corpus`) and, so the skill is kept, more copy (or MQAR) blocks.

The aim is a base that copies and retrieves a little before any adapter is trained (measured
on held-out probes by `evaluate_capability`, recorded in the manifest). Same seed, device and
thread count: identical weights. The output directory is written atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers

from longctx.core.errors import LongctxError, choice_error
from longctx.core.fileio import atomic_directory
from longctx.pretrain.corpus import python_prose, synthetic_documents, word_list
from longctx.pretrain.probes import PROBE_SAMPLES, evaluate_capability
from longctx.pretrain.recipe import ARCHS, SPECIAL_TOKENS, PretrainRecipe, resolve_recipe
from longctx.pretrain.stages import TimeLimit, run_stages

EMBEDDED_NAME = "longctx-tiny"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE with individually split digits, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.environ["RAYON_NUM_THREADS"] = "1"  # deterministic merges
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30, **SPECIAL_TOKENS)


def recipe_overrides(items: list[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings -> recipe overrides, each value parsed as its field's type."""
    own_flags = {"arch": "--arch", "seed": "--seed", "device": "--device", "steps": "--steps"}
    fields = {f.name: f.type for f in dataclasses.fields(PretrainRecipe) if f.name not in own_flags}
    overrides = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if name in own_flags:
            raise LongctxError(f"recipe field {name}: set it with {own_flags[name]}, not --set")
        if not sep or name not in fields:
            raise choice_error("recipe field", name, list(fields))
        kind = {"int": int, "float": float}.get(str(fields[name]), str)
        try:
            overrides[name] = kind(raw)
        except ValueError:
            raise LongctxError(f"recipe field {name}: {raw!r} is not a valid {kind.__name__}") from None
    return overrides


# What a pretrain output held before its manifest listed its files ("files").
_LEGACY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "manifest.json")


def check_out_dir(out: Path) -> None:
    """Refuse an output directory holding anything `pretrain` did not write: the output replaces
    the directory whole, and what longctx did not write is never deleted. An empty or absent one,
    or an earlier pretrain output (the files its manifest lists), is fine."""
    if out.exists() and not out.is_dir():
        raise LongctxError(f"--out {str(out)!r} is a file, not a directory")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "model_sha256" not in manifest:
        raise LongctxError(f"--out {str(out)!r} is not empty and is not a longctx pretrain output (it holds "
                           f"{names[0]!r}); pretrain replaces its --out whole: use an empty or new directory")
    foreign = [name for name in names if name not in manifest.get("files", _LEGACY_FILES)]
    if foreign:
        raise LongctxError(f"--out {str(out)!r} holds {foreign[0]!r}, which longctx pretrain did not write; "
                           f"pretrain replaces its --out whole: move it away or use another directory")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def recipe_torch_settings(threads: int) -> Iterator[None]:
    """The recipe's thread count and deterministic algorithms while a base is built; the caller's
    own afterwards (a library call must not leave the process's torch changed)."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def pretrain(out_dir: Path, arch: str = "llama", steps: int | None = None, seed: int = 0,
             seq_len: int | None = None, progress: bool = True, device: str = "cpu", measure: bool = True,
             time_limit_minutes: float | None = None, **overrides: Any) -> Path:
    """Run the recipe and write an HF model directory (+ manifest.json) to `out_dir` atomically.

    `overrides` replace recipe fields by name (e.g. `induction_steps=0`, `pool_tokens=...`);
    `measure=False` leaves the manifest's capability empty (the probes are slow for Mamba on CPU;
    `evaluate_capability` runs them on the saved model later). `time_limit_minutes` stops training
    after that long (see `TimeLimit`); such a model depends on the machine's speed, so its
    manifest says where it stopped (`stopped_early`).
    """

    overrides.update({k: v for k, v in {"steps": steps, "seq_len": seq_len}.items() if v is not None})
    recipe = resolve_recipe(arch, seed, device, overrides)
    check_out_dir(Path(out_dir))
    if time_limit_minutes is not None and not time_limit_minutes > 0:
        raise LongctxError(f"time limit: {time_limit_minutes} is not a positive number of minutes")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with recipe_torch_settings(recipe.threads):
        started = time.perf_counter()
        limit = TimeLimit(time.time() + 60 * time_limit_minutes if time_limit_minutes else None)
        prose = python_prose()
        words = word_list(prose)
        documents = [prose, *synthetic_documents(2000, recipe.seed + 7, words, prose)]
        tokenizer = train_tokenizer(documents, recipe.vocab_size)
        model = ARCHS[arch](recipe, tokenizer)
        history = run_stages(model, recipe, tokenizer, prose, words, progress, limit)
        model = model.float().cpu().eval()  # capability is measured on CPU in float32, as tests re-measure it
        samples = PROBE_SAMPLES if recipe.steps >= 100 else 2
        capability = evaluate_capability(model, tokenizer, n=samples) if measure else None
        check_out_dir(Path(out_dir))  # again: anything put there while training is kept as well
        with atomic_directory(Path(out_dir)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            manifest = {"name": EMBEDDED_NAME if arch == "llama" else f"{EMBEDDED_NAME}-{arch}",
                        "recipe": dataclasses.asdict(recipe),
                        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                     "transformers": transformers.__version__},
                        "device": (torch.cuda.get_device_name() if recipe.device == "cuda"
                                   else f"cpu ({platform.machine()})"),
                        "threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - started, 1),
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "final_loss": history[-1]["loss"] if history else None, "loss_log": history,
                        "stopped_early": limit.stopped and {**limit.stopped, "time_limit_minutes": time_limit_minutes},
                        "capability": capability, "capability_samples": samples,
                        "capability_measured": f"on CPU in float32, torch {torch.__version__}",
                        "model_sha256": _sha256(tmp / "model.safetensors"),
                        "files": sorted([*(p.name for p in tmp.iterdir()), "manifest.json"])}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)
