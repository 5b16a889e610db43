"""`longctx train` (design §8): fine-tune one adapter on a task's train split with HF `Trainer`.

The loss covers the answer tokens only (prompt positions are labelled -100). Hyper-parameters
come from `longctx/adapters/recipes/<method>.yaml`, overridable; `Trainer` brings the progress bar, gradient
clipping, checkpoints (a run resumes from the last complete one in `OUT/checkpoints`) and, under
`accelerate launch`, DDP/FSDP/DeepSpeed. A run directory records what its adapter depends on in
`OUT/train_settings.json`; it is continued only with those settings (`open_run_directory`).
Validation accuracy (greedy-exact answers on the validation split) is logged every `eval_every`
steps. The adapter directory and `train_log.json` are written atomically; the base's own weights
are never saved.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from longctx.adapters import wrap
from longctx.core.errors import LongctxError
from longctx.core.fileio import atomic_write_text
from longctx.engine.bases import load_base
from longctx.engine.hf_internals import TRAINER_STATE_NAME, printer_callback
from longctx.engine.runner import score_continuation
from longctx.tasks import generate
from longctx.training.chunked import chunked_training_loss
from longctx.training.config import TrainConfig


def encode_examples(tokenizer: Any, examples: list[Any]) -> list[dict[str, list[int]]]:
    """input_ids = prompt + answer; labels = -100 on the prompt, the answer's ids after it."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.input, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_accuracy(adapted: Any, tokenizer: Any, examples: list[Any]) -> float:
    """Fraction of examples whose whole answer is the model's greedy continuation."""
    model = adapted.model
    was_training = model.training
    model.eval()
    hits = 0
    for ex in examples:
        prompt = tokenizer(ex.input, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
        hits += score_continuation(adapted, prompt, answer)[1]
    model.train(was_training)
    return hits / max(len(examples), 1)


def _validation_callback(adapted: Any, tokenizer: Any, examples: list[Any], every: int) -> Any:
    from transformers import TrainerCallback

    class Validate(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                acc = answer_accuracy(adapted, tokenizer, examples)
                state.log_history.append({"step": state.global_step, "validation_accuracy": acc})
    return Validate()


def _chunked_trainer_class() -> type:
    """HF `Trainer` whose step runs each batch through `chunked_training_loss`: one backward per
    chunk, everything else (optimiser, clipping, schedule, checkpoints, resume) is Trainer's."""
    from transformers import Trainer

    class ChunkedTrainer(Trainer):
        def __init__(self, *args: Any, adapted: Any, chunk_size: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.adapted, self.chunk_size = adapted, chunk_size

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
            model.train()
            inputs = self._prepare_inputs(inputs)
            steps = self.args.gradient_accumulation_steps
            loss = chunked_training_loss(self.adapted, inputs["input_ids"], inputs["labels"], self.chunk_size,
                                         lambda part: self.accelerator.backward(part / steps), model=model)
            return loss / steps
    return ChunkedTrainer


def _trainer(cfg: TrainConfig, adapted: Any, **kwargs: Any) -> Any:
    """Trainer's own step for whole-sequence training, the chunked one with `cfg.chunk_size`."""
    from transformers import Trainer

    if cfg.chunk_size is None:
        return Trainer(model=adapted.model, **kwargs)
    return _chunked_trainer_class()(model=adapted.model, adapted=adapted, chunk_size=cfg.chunk_size, **kwargs)


def _arguments(cfg: TrainConfig, lr: float, workdir: Path, progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(workdir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=lr, lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, cfg.steps // 10),
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, min(10, cfg.steps // 10)),
        save_strategy="steps", save_steps=max(1, min(50, cfg.steps // 2)), save_total_limit=1,
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=not progress, use_cpu=not torch.cuda.is_available())


def _warm_up_and_select(adapted: Any, cfg: TrainConfig, lr: float, train: list, tokenizer: Any, out: Path,
                        progress: bool) -> dict[str, int] | None:
    """Methods that pick what to train after a warm-up (SDLoRA): run it, then select. The warm-up
    is deterministic, so a resumed run re-selects the same entries before loading its checkpoint."""
    import dataclasses
    import tempfile

    select = getattr(adapted.method, "select_dimensions", None)
    if select is None:
        return None
    warm = dataclasses.replace(cfg, steps=min(adapted.recipe.selection_warmup_steps, cfg.steps))
    with tempfile.TemporaryDirectory() as tmp:
        args = _arguments(warm, lr, Path(tmp), progress=False)
        args.save_strategy = "no"
        trainer = _trainer(cfg, adapted, args=args, train_dataset=train[:warm.steps * cfg.batch_size],
                           data_collator=lambda rows: pad_batch(rows, tokenizer.pad_token_id or 0))
        _quiet(trainer)
        trainer.train()
    return {"warmup_steps": trainer.state.global_step, **select(adapted.model)}


def _quiet(trainer: Any) -> None:
    """No per-step log dicts on stdout (they still reach the trainer's state and our log)."""
    trainer.remove_callback(printer_callback())


CHECKPOINT_STATE = TRAINER_STATE_NAME  # a Trainer checkpoint's last-written file


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The highest `checkpoint-N` that Trainer finished writing: its trainer_state.json, written
    last, parses. A save cut short (SIGKILL) leaves an empty or partial directory: ignored."""
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        try:
            complete = step.isdigit() and isinstance(json.loads((path / CHECKPOINT_STATE).read_text()), dict)
        except (OSError, ValueError):
            complete = False
        if complete:
            found.append((int(step), path))
    return max(found)[1] if found else None


def run_settings(cfg: TrainConfig, adapted: Any, lr: float) -> dict[str, Any]:
    """Everything the adapter of a run directory depends on (`OUT/train_settings.json`): the
    config less what only validation, the directory or the length of training (`steps`, which
    may grow: training continues from the last checkpoint) change, the resolved recipe and base."""
    config = {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS}
    return {**config, "learning_rate": lr, "recipe": adapted.recipe.to_dict(),
            "base_fingerprint": adapted.base_fingerprint}


_NOT_SETTINGS = ("out", "steps", "n_validation", "eval_every", "overrides")  # overrides: in `recipe`
SETTINGS_NAME = "train_settings.json"


def _recorded_settings(out: Path) -> tuple[dict[str, Any] | None, bool]:
    """(the settings a run directory was trained with, whether from a train_log.json): its
    train_settings.json, or for a run from before that file the `config` of its train_log.json
    (no recipe or base fingerprint then); None if neither."""
    for name in (SETTINGS_NAME, "train_log.json"):
        try:
            recorded = json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as err:
            raise LongctxError(f"{out / name} is unreadable ({err}): use another --out or remove the "
                               "directory") from None
        if not isinstance(recorded, dict):
            raise LongctxError(f"{out / name} is not a JSON object: use another --out or remove the directory")
        if name == SETTINGS_NAME:
            return recorded, False
        config = {k: v for k, v in recorded.get("config", {}).items() if k not in _NOT_SETTINGS or k == "overrides"}
        return {**config, "learning_rate": recorded.get("learning_rate")}, True
    return None, False


def _first_difference(recorded: dict[str, Any], requested: dict[str, Any], only_shared: bool) -> str | None:
    """`NAME RECORDED, not REQUESTED` for the first setting that differs (recipe fields one by one)."""
    def flat(settings: dict[str, Any]) -> dict[str, Any]:
        recipe = {f"recipe field {k}": v for k, v in settings.get("recipe", {}).items()}
        return {**{k: v for k, v in settings.items() if k != "recipe"}, **recipe}

    old, new = flat(recorded), flat(json.loads(json.dumps(requested)))  # JSON's types on both sides
    keys = [k for k in new if k in old] if only_shared else [*new, *(k for k in old if k not in new)]
    return next((f"{k} {old.get(k)!r}, not {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)), None)


def open_run_directory(out: Path, cfg: TrainConfig, settings: dict[str, Any]) -> Path | None:
    """Refuse a run directory trained with other settings (continuing it would hand back its
    adapter under the new ones), or with more steps than asked; else record the settings and
    return the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise LongctxError(f"--out {str(out)!r} is a file, not a run directory")
    resume, (recorded, legacy) = last_complete_checkpoint(out / "checkpoints"), _recorded_settings(out)
    if recorded is None and (resume or (out / "adapter").exists()):
        raise LongctxError(f"run directory {str(out)!r} holds a trained adapter or checkpoint but no record of its "
                           f"settings ({SETTINGS_NAME}): use another --out or remove the directory")
    if recorded is not None:
        requested = {**settings, "overrides": cfg.overrides} if legacy else settings
        difference = _first_difference(recorded, requested, only_shared=legacy)
        if difference:
            raise LongctxError(f"run directory {str(out)!r} was trained with {difference}: "
                               f"use another --out or remove the directory")
    done = int(resume.name.removeprefix("checkpoint-")) if resume else 0
    if done > cfg.steps:
        raise LongctxError(f"run directory {str(out)!r} has trained {done} steps, more than --steps {cfg.steps}: "
                           f"use another --out or remove the directory")
    if not (out / SETTINGS_NAME).is_file():
        atomic_write_text(out / SETTINGS_NAME, json.dumps(settings, indent=2) + "\n")
    return resume


def train_adapter(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train, validate and save; returns the adapter directory (`OUT/adapter`). A run directory
    is continued (from its last complete checkpoint) only with the settings it was trained with."""

    cfg.validate()
    out = Path(cfg.out)
    started = time.perf_counter()
    # Chunked: the chunk-over-cache attention (differentiable, no repeated K/V); whole: stock sdpa.
    attention = "sdpa" if cfg.chunk_size is None else "longctx_sdpa"
    model, tokenizer = load_base(cfg.base, dtype=cfg.dtype, attn_implementation=attention)
    adapted = wrap(model, cfg.method, seed=cfg.seed, **cfg.overrides)
    if adapted.trainable_parameters() == 0:
        raise LongctxError(f"method {cfg.method!r} has no trainable parameters; evaluate it without training")
    lr = cfg.learning_rate or adapted.recipe.learning_rate
    resume = open_run_directory(out, cfg, run_settings(cfg, adapted, lr))
    n_train = cfg.steps * cfg.batch_size
    train = encode_examples(tokenizer, generate(cfg.task, tokenizer, cfg.train_length, n_train, cfg.seed, "train"))
    validation = generate(cfg.task, tokenizer, cfg.train_length, cfg.n_validation, cfg.seed, "validation")
    adapted.model.train()
    selection = _warm_up_and_select(adapted, cfg, lr, train, tokenizer, out, progress)
    trainer = _trainer(cfg, adapted, args=_arguments(cfg, lr, out / "checkpoints", progress), train_dataset=train,
                       data_collator=lambda rows: pad_batch(rows, tokenizer.pad_token_id or 0),
                       callbacks=[_validation_callback(adapted, tokenizer, validation, cfg.eval_every)])
    if not progress:
        _quiet(trainer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    adapted.model.eval()
    adapter_dir = adapted.save(out / "adapter")
    log = {"config": asdict(cfg), "learning_rate": lr, "resumed_from": resume and str(resume), "selection": selection,
           "trainable_parameters": adapted.trainable_parameters(), "total_parameters": adapted.total_parameters(),
           "validation_accuracy": answer_accuracy(adapted, tokenizer, validation),
           "seconds": round(time.perf_counter() - started, 1), "history": trainer.state.log_history}
    atomic_write_text(out / "train_log.json", json.dumps(log, indent=2, default=str) + "\n")
    return adapter_dir
