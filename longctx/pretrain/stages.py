"""The training stages of the embedded bases' recipe (`longctx.pretrain.build`): each stage is one
HF `Trainer` run over its rows, logging held-out probe accuracy; an adaptive recall curriculum
and a wall-time limit are Trainer callbacks.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from longctx.engine.hf_internals import printer_callback
from longctx.pretrain.data import MixedBlocks, RecallCurriculum, copy_blocks, document_pool, mqar_blocks, table_blocks
from longctx.pretrain.probes import token_accuracy
from longctx.pretrain.recipe import SPECIAL_TOKENS, SYNTHETIC_BLOCKS, PretrainRecipe


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
    from transformers import Trainer, TrainerCallback, TrainingArguments

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
        trainer.remove_callback(printer_callback())  # its dicts would interleave with the JSON lines
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


def run_stages(model: nn.Module, recipe: PretrainRecipe, tokenizer: Any, prose: str, words: list[str],
                progress: bool, limit: TimeLimit) -> list[dict]:
    """Build each stage's rows and held-out probes, train the stages in order; the joint log."""
    vocab = (len(SPECIAL_TOKENS), len(tokenizer))
    probes = {"copy": copy_blocks(recipe.probe_blocks, recipe.induction_len, recipe.induction_copies, *vocab,
                                  torch.Generator().manual_seed(99))}
    if recipe.recall_steps or recipe.mixed_blocks != "copy":
        probes.update({f"mqar_{p}": mqar_blocks(recipe.probe_blocks, recipe.recall_len, p, *vocab,
                                                torch.Generator().manual_seed(98))
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


