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

import dataclasses
import hashlib
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from longctx.core.errors import LongctxError, choice_error
from longctx.core.fileio import atomic_directory
from longctx.pretrain.corpus import python_prose, synthetic_documents, word_list
from longctx.pretrain.data import MixedBlocks, RecallCurriculum, copy_blocks, document_pool, mqar_blocks, table_blocks
from longctx.pretrain.probes import PROBE_SAMPLES, evaluate_capability, token_accuracy

EMBEDDED_NAME = "longctx-tiny"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class PretrainRecipe:
    arch: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 4096
    state_size: int = 16  # Mamba's d_state (N per channel); Zoology's MQAR configs use 8-24
    # stage 1: copy warm-up on random tokens
    induction_steps: int = 5000
    induction_batch: int = 128
    induction_len: int = 256
    induction_copies: int = 3  # spans per block that reappear later
    # stage 0: multi-query associative recall curriculum on random tokens
    recall_steps: int = 0
    recall_batch: int = 64
    recall_len: int = 256
    recall_pairs: int = 32  # the curriculum's last level (4, 8, ... up to this)
    recall_advance: float = 0.0  # > 0: next level once held-out accuracy at this one reaches it; 0: equal shares
    # stage 2: text + synthetic documents + copy blocks
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 1024
    copy_share: float = 0.25  # fraction of stage-2 rows that are synthetic blocks (`mixed_blocks`)
    mixed_blocks: str = "copy"  # the synthetic blocks of stage 2: a key of SYNTHETIC_BLOCKS
    prose_share: float = 0.15  # fraction of documents that are prose windows
    pool_tokens: int = 8_000_000  # the stage-2 document stream, cycled
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    precision: str = "bf16"  # on CUDA: "bf16" autocast or "fp32" (CPU always trains in float32)


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


def build_llama(recipe: PretrainRecipe, tokenizer: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def build_mamba(recipe: PretrainRecipe, tokenizer: Any) -> nn.Module:
    """A small Mamba (Gu & Dao, 2023) of the recipe's width and depth, tied embeddings.

    `use_mambapy` selects transformers' pure-PyTorch parallel scan for training when the CUDA
    kernels are absent (the sequential fallback is far slower); inference paths are unchanged.
    """
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_layers,
        state_size=recipe.state_size, expand=2, conv_kernel=4, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_mambapy=True)
    torch.manual_seed(recipe.seed)
    return MambaForCausalLM(config)


# Architecture name -> builder; both embedded bases come from the same recipe.
ARCHS: dict[str, Callable[[PretrainRecipe, Any], nn.Module]] = {"llama": build_llama, "mamba": build_mamba}
# Per-architecture departures from the recipe's defaults; each is the run of its committed base.
# Mamba (d_model 256, 2 layers; one H100, 6 min, fp32): no copy warm-up (2,500 warm-up steps on an
# H100 left its copy accuracy at 0), 700 steps of the MQAR curriculum (it leaves the 1/pairs
# plateau after ~300), then text whose synthetic rows are recall tables in the probes' own words
# (`mixed_blocks=table`): recall as a text skill did not come from token MQAR alone.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mamba": {"hidden_size": 256, "num_layers": 2, "induction_steps": 0, "recall_steps": 700, "recall_advance": 0.8,
              "steps": 4000, "seq_len": 512, "copy_share": 0.6, "mixed_blocks": "table", "pool_tokens": 2_000_000,
              "precision": "fp32"},
}


def _mqar_of_any_size(recipe: PretrainRecipe, vocab: tuple[int, int]) -> Callable:
    def make(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        pairs = int(torch.randint(4, recipe.recall_pairs + 1, (1,), generator=gen))
        return mqar_blocks(n, recipe.seq_len, min(pairs, recipe.seq_len // 4), *vocab, gen)
    return make


# Stage 2's synthetic rows, by `mixed_blocks`: (recipe, token range, words, tokenizer) -> make(n, gen).
SYNTHETIC_BLOCKS: dict[str, Callable[[PretrainRecipe, tuple[int, int], list[str], Any], Callable]] = {
    "copy": lambda r, vocab, words, tok: lambda n, gen: copy_blocks(n, r.seq_len, r.induction_copies, *vocab, gen),
    "mqar": lambda r, vocab, words, tok: _mqar_of_any_size(r, vocab),
    "table": lambda r, vocab, words, tok: lambda n, gen: table_blocks(
        n, r.seq_len, r.recall_pairs, words, tok, random.Random(int(torch.randint(1 << 31, (1,), generator=gen)))),
}


ADVANCE_CHECK_STEPS = 25  # how often an adaptive curriculum measures held-out recall at its level


def _advance_callback(curriculum: RecallCurriculum, measure: Callable[[int], float], threshold: float,
                      history: list[dict]) -> Any:
    """Trainer callback for an adaptive curriculum: every `ADVANCE_CHECK_STEPS` steps, held-out
    recall at the current level (`measure(pairs)`), kept in `latest` for the stage's log; at
    `threshold` or above, the next level, and an entry in `history` (where each phase change was)."""
    from transformers import TrainerCallback

    class AdvanceOnRecall(TrainerCallback):
        def __init__(self) -> None:
            self.latest: dict[str, float] = {}

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            last = curriculum.level_index + 1 >= len(curriculum.levels)
            if state.global_step % ADVANCE_CHECK_STEPS or last:
                return
            pairs = curriculum.levels[curriculum.level_index]
            accuracy = round(measure(pairs), 4)
            self.latest = {"level": pairs, "level_accuracy": accuracy}
            if accuracy >= threshold:
                curriculum.level_index += 1
                history.append({"stage": "recall curriculum", "step": state.global_step, "level_passed": pairs,
                                "level_accuracy": accuracy, "next_level": curriculum.levels[curriculum.level_index]})
                if args.disable_tqdm:
                    print(json.dumps(history[-1]), flush=True)

    return AdvanceOnRecall()


@dataclass
class TimeLimit:
    """Stops training once `deadline` (epoch seconds) passes: the current stage ends after its step,
    later stages are skipped, and `stopped` says where (recorded in the manifest). What a GPU lease
    or a cluster job's wall-time limit needs: a run that stops short still saves its model. One per
    `pretrain` call; `deadline=None` never stops."""
    deadline: float | None = None
    stopped: dict | None = None

    def callback(self, stage: str) -> Any:
        from transformers import TrainerCallback

        limit = self

        class StopAtDeadline(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if limit.deadline is not None and time.time() >= limit.deadline:
                    control.should_training_stop = True
                    limit.stopped = {"stage": stage, "step": state.global_step}

        return StopAtDeadline()


def _train(model: nn.Module, data: torch.utils.data.IterableDataset, recipe: PretrainRecipe, steps: int,
           batch: int, progress: bool, workdir: str, probes: dict[str, tuple[Tensor, Tensor]], stage: str,
           limit: TimeLimit, callbacks: tuple[Any, ...] = (), log_extra: Callable[[], dict] = dict) -> list[dict]:
    """One stage with HF Trainer (cosine schedule); logs loss, wall time, each held-out probe's
    accuracy (`{name}_accuracy`) and what `log_extra()` adds; stops early at `limit`."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    history: list[dict] = []
    started = time.perf_counter()

    class CopyProbe(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                history.append({"stage": stage, "step": state.global_step, "loss": round(logs["loss"], 4),
                                **{f"{name}_accuracy": token_accuracy(model, *p) for name, p in probes.items()},
                                **log_extra(), "seconds": round(time.perf_counter() - started, 1)})
                if not progress:
                    print(json.dumps(history[-1]), flush=True)

    args = TrainingArguments(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=recipe.learning_rate, lr_scheduler_type="cosine", warmup_steps=recipe.warmup_steps,
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(1, steps // 20), save_strategy="no",
        report_to=[], use_cpu=recipe.device == "cpu",
        bf16=recipe.device == "cuda" and recipe.precision == "bf16", seed=recipe.seed,
        data_seed=recipe.seed, dataloader_num_workers=0, disable_tqdm=not progress)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CopyProbe(), limit.callback(stage), *callbacks])
    if not progress:
        trainer.remove_callback(PrinterCallback)  # its dicts would interleave with the JSON lines
    trainer.train()
    return history


def _recall_stage(model: nn.Module, curriculum: RecallCurriculum, recipe: PretrainRecipe, vocab: tuple[int, int],
                  progress: bool, workdir: str, probes: dict[str, tuple[Tensor, Tensor]],
                  limit: TimeLimit) -> list[dict]:
    """Stage 0; with `recall_advance`, each level's held-out blocks decide when the next begins."""
    callbacks, moves, log_extra = (), [], dict
    if curriculum.adaptive:
        held_out = {p: mqar_blocks(64, recipe.recall_len, p, *vocab, torch.Generator().manual_seed(97 + p))
                    for p in curriculum.levels}
        measure = lambda pairs: token_accuracy(model, *held_out[pairs])  # noqa: E731
        callbacks = (_advance_callback(curriculum, measure, recipe.recall_advance, moves),)
        log_extra = lambda: dict(callbacks[0].latest)  # noqa: E731  the level and its last check
    history = _train(model, curriculum, recipe, recipe.recall_steps, recipe.recall_batch, progress, workdir,
                     probes, "recall curriculum", limit, callbacks, log_extra)
    return sorted(history + moves, key=lambda entry: entry["step"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def _require_mambapy() -> None:
    """Training Mamba without mambapy falls back to transformers' per-token loop: refuse up front."""
    try:
        import mambapy  # noqa: F401
    except ImportError:
        raise LongctxError("training Mamba needs mambapy (a longctx dependency: pip install 'mambapy>=1.2,<2'); "
                           "without it transformers falls back to a per-token loop, measured 4x slower at "
                           "128 tokens and 21x at 256 (benchmarks/p6_mamba_training.py)") from None


def _recipe(arch: str, seed: int, device: str, overrides: dict[str, Any]) -> PretrainRecipe:
    if arch not in ARCHS:
        raise choice_error("architecture", arch, ARCHS)
    if device not in DEVICES:
        raise choice_error("device", device, DEVICES)
    if arch == "mamba":
        _require_mambapy()
    if device == "cuda" and not torch.cuda.is_available():
        raise LongctxError("device 'cuda': no CUDA device is visible here; use --device cpu (much slower)")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(PretrainRecipe)})
    if unknown:
        raise choice_error("recipe field", unknown[0], [f.name for f in dataclasses.fields(PretrainRecipe)])
    recipe = dataclasses.replace(PretrainRecipe(arch=arch, seed=seed, device=device),
                                 **{**ARCH_DEFAULTS[arch], **overrides})
    if recipe.mixed_blocks not in SYNTHETIC_BLOCKS:
        raise choice_error("mixed_blocks", recipe.mixed_blocks, tuple(SYNTHETIC_BLOCKS))
    if recipe.precision not in PRECISIONS:
        raise choice_error("precision", recipe.precision, PRECISIONS)
    if not 0.0 <= recipe.recall_advance <= 1.0:
        raise LongctxError(f"recipe field recall_advance: {recipe.recall_advance} is not an accuracy in [0, 1] "
                           "(0: levels in equal shares of the stage)")
    if recipe.state_size < 1:
        raise LongctxError(f"recipe field state_size: {recipe.state_size} is not a positive int")
    return recipe


def _run_stages(model: nn.Module, recipe: PretrainRecipe, tokenizer: Any, prose: str, words: list[str],
                progress: bool, limit: TimeLimit) -> list[dict]:
    """Build each stage's rows and held-out probes, train the stages in order; the joint log."""
    vocab = (len(SPECIAL_TOKENS), len(tokenizer))
    probes = {"copy": copy_blocks(64, recipe.induction_len, recipe.induction_copies, *vocab,
                                  torch.Generator().manual_seed(99))}
    if recipe.recall_steps or recipe.mixed_blocks != "copy":
        probes.update({f"mqar_{p}": mqar_blocks(64, recipe.recall_len, p, *vocab, torch.Generator().manual_seed(98))
                       for p in (8, recipe.recall_pairs)})
    recall = RecallCurriculum(recipe.recall_steps * recipe.recall_batch, recipe.recall_len, recipe.recall_pairs,
                              vocab, recipe.seed + 4, adaptive=recipe.recall_advance > 0)
    warmup = MixedBlocks(recipe.induction_steps * recipe.induction_batch, recipe.induction_len, 1.0,
                         lambda n, gen: copy_blocks(n, recipe.induction_len, recipe.induction_copies, *vocab, gen),
                         None, recipe.seed + 2)
    pool = document_pool(recipe.pool_tokens, recipe.prose_share, recipe.seed, prose, words, tokenizer) \
        if recipe.steps else None  # steps=0: synthetic stages only (e.g. an MQAR-only run)
    if recipe.mixed_blocks == "table":  # text-format recall, held out: the curve the probes follow
        probes["table"] = table_blocks(64, recipe.seq_len, recipe.recall_pairs, words, tokenizer, random.Random(98))
    mixed = MixedBlocks(recipe.steps * recipe.batch_size, recipe.seq_len, recipe.copy_share,
                        SYNTHETIC_BLOCKS[recipe.mixed_blocks](recipe, vocab, words, tokenizer), pool, recipe.seed + 3)
    history: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        if recipe.recall_steps:
            history += _recall_stage(model, recall, recipe, vocab, progress, workdir, probes, limit)
        if recipe.induction_steps and not limit.stopped:
            history += _train(model, warmup, recipe, recipe.induction_steps, recipe.induction_batch, progress,
                              workdir, probes, "copy warm-up", limit)
        if recipe.steps and not limit.stopped:
            history += _train(model, mixed, recipe, recipe.steps, recipe.batch_size, progress, workdir, probes,
                              "mixed", limit)
    return history


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
    recipe = _recipe(arch, seed, device, overrides)
    check_out_dir(Path(out_dir))
    if time_limit_minutes is not None and not time_limit_minutes > 0:
        raise LongctxError(f"time limit: {time_limit_minutes} is not a positive number of minutes")
    torch.set_num_threads(recipe.threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    limit = TimeLimit(time.time() + 60 * time_limit_minutes if time_limit_minutes else None)
    prose = python_prose()
    words = word_list(prose)
    tokenizer = train_tokenizer([prose, *synthetic_documents(2000, recipe.seed + 7, words, prose)], recipe.vocab_size)
    model = ARCHS[arch](recipe, tokenizer)
    history = _run_stages(model, recipe, tokenizer, prose, words, progress, limit)
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
                                 "transformers": __import__("transformers").__version__},
                    "device": torch.cuda.get_device_name() if recipe.device == "cuda" else f"cpu ({platform.machine()})",
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
