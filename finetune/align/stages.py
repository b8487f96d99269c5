"""The recipe's two training stages, each validated as it trains and resumable.

Stage 1 (``sft_stage``) is supervised fine-tuning of a LoRA adapter (PEFT, on every projection of
every layer; transformers' ``Trainer``; loss on the answers only).  Stage 2 (``dpo_stage``) is
preference training with TRL's ``DPOTrainer`` on a model with stage 1 merged in; its LoRA's
reference model is that model with the new adapter disabled.

Each stage calls ``validate`` (a function scoring the model being trained, ``validation_scores``)
after every epoch, or every ``eval_every`` optimizer steps, saves a checkpoint on the same
schedule and keeps the checkpoint with the best score (``best_checkpoint``).  Checkpoints and the
validation log live in the stage's folder, so an interrupted stage resumes; ``stage_record``
returns a finished stage's record when its settings match.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.align.adapters import save_adapter_fp16
from finetune.align.data import dpo_rows, sft_examples, sft_rows
from interp.io import atomic_write_json

Validate = Callable[[], dict]
"""Scores the model being trained (``validation_scores``' dict, with ``score``)."""


def lora_config(model, rank: int):
    """A rank-``rank`` LoRA (alpha 2·rank, dropout 0.05) on every projection of every layer."""
    from peft import LoraConfig

    from finetune.train import lora_target_names

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=lora_target_names(model, set()))


def best_checkpoint(log: list[dict]) -> dict:
    """The validation row with the best score (ties: the earlier checkpoint)."""
    return max(log, key=lambda row: (row["score"], -row["step"]))


def stage_record(folder: Path, settings: dict) -> dict | None:
    """A finished stage with these settings (its record), or None.  A stage begun with other
    settings is cleared, so only an interrupted run with the same settings resumes."""
    record = folder / "record.json"
    if record.is_file() and (folder / "adapter" / "adapter_model.safetensors").is_file():
        data = json.loads(record.read_text())
        if data.get("settings") == settings:
            return data
    started = folder / "settings.json"
    if folder.is_dir() and (not started.is_file() or json.loads(started.read_text()) != settings):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(started, settings)
    return None


def sft_stage(model, prompts: dict[str, list[str]], answers: dict[str, str], folder: Path, *, validate: Validate,
              epochs: int, lr: float, rank: int, seed: int, pair_weight: int, answer_tokens: int) -> dict:
    """Stage 1 on ``model`` (trained in place, its adapter unloaded at the end): ``sft_rows``
    (``answer_tokens`` > 0 cuts each answer, ``cut_answer``), validated each epoch; the best
    epoch's adapter is saved in ``folder/adapter``."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from finetune.data import tokenize
    from finetune.train import pad_collate

    rows = sft_rows(prompts, answers, seed, pair_weight)
    examples = sft_examples(model.tokenizer, rows, answer_tokens)
    dataset = tokenize(examples, model.tokenizer, max_length=192)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model.hf_model, lora_config(model, rank))
    training = TrainingArguments(
        output_dir=str(folder / "checkpoints"), per_device_train_batch_size=8, num_train_epochs=epochs,
        learning_rate=lr, warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=10,
        save_strategy="epoch", report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length", remove_unused_columns=False, use_cpu=model.device.type == "cpu",
    )
    trainer = Trainer(model=peft_model, args=training, train_dataset=dataset,
                      data_collator=lambda feats: pad_collate(feats, model.pad_token_id))
    log = _train_validated(trainer, folder, validate, every=0)
    best = best_checkpoint(log)
    _load_checkpoint(peft_model, folder, best["step"])
    save_adapter_fp16(peft_model, folder / "adapter")
    peft_model.unload()
    return {"examples": len(examples), "kinds": {k: sum(r[2] == k for r in rows) for k in ("answer", "refuse")},
            "validation": log, "chosen_epoch": best["epoch"], "history": trainer.state.log_history}


def dpo_stage(model, prompts: dict[str, list[str]], answers: dict[str, str], base_answers: dict[str, str],
              folder: Path, *, validate: Validate, epochs: int, lr: float, beta: float, rank: int, seed: int,
              refuse_weight: int, eval_every: int) -> dict:
    """Stage 2 on ``model`` (stage 1 merged in): ``dpo_rows``, validated every ``eval_every``
    steps (0: every epoch) and at the end; the best point's adapter is saved in ``folder/adapter``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = dpo_rows(prompts, answers, base_answers, seed, refuse_weight)
    config = DPOConfig(
        output_dir=str(folder / "checkpoints"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=epochs, learning_rate=lr, beta=beta, warmup_steps=5,
        lr_scheduler_type="cosine", logging_steps=10, report_to=[], seed=seed,
        save_strategy="steps" if eval_every else "epoch", save_steps=eval_every or 500,
        max_length=192, use_cpu=model.device.type == "cpu", dataloader_num_workers=0,
    )
    torch.manual_seed(seed)
    trainer = DPOTrainer(model=model.hf_model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=model.tokenizer, peft_config=lora_config(model, rank))
    log = _train_validated(trainer, folder, validate, every=eval_every)
    final = trainer.state.global_step
    if not log or log[-1]["step"] != final:  # the end of training is a candidate too
        log.append({"epoch": round(trainer.state.epoch, 2), "step": final, **validate()})
    best = best_checkpoint(log)
    if best["step"] != final:
        _load_checkpoint(trainer.model, folder, best["step"])
    save_adapter_fp16(trainer.model, folder / "adapter")
    trainer.model.unload()
    return {"pairs": len(rows), "validation": log, "chosen_epoch": best["epoch"], "beta": beta,
            "history": trainer.state.log_history}


def _train_validated(trainer, folder: Path, validate: Validate, every: int) -> list[dict]:
    """Train (resuming from the last checkpoint in ``folder/checkpoints``), validating after every
    epoch (``every`` 0) or every ``every`` steps; the validation log, also kept in
    ``folder/validation.json`` at each checkpoint."""
    from transformers import TrainerCallback

    resume = _last_checkpoint(folder / "checkpoints")
    saved = folder / "validation.json"
    log: list[dict] = json.loads(saved.read_text()) if resume and saved.is_file() else []

    def run(state, model_in_training):
        start = time.time()
        scores = validate()
        log.append({"epoch": round(state.epoch, 2), "step": state.global_step, **scores,
                    "seconds": round(time.time() - start, 1)})
        print(f"validation at step {state.global_step} (epoch {state.epoch:.2f}): {scores}", flush=True)
        model_in_training.train()

    class Validate(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if not every:
                run(state, kwargs["model"])

        def on_step_end(self, args, state, control, **kwargs):
            if every and state.global_step % every == 0:
                run(state, kwargs["model"])

        def on_save(self, args, state, control, **kwargs):
            atomic_write_json(saved, log)

    trainer.add_callback(Validate())
    trainer.train(resume_from_checkpoint=resume)
    return log


def _load_checkpoint(peft_model, folder: Path, step: int) -> None:
    """Put the adapter saved at ``step`` back into ``peft_model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(folder / "checkpoints" / f"checkpoint-{step}"
                                                    / "adapter_model.safetensors"))


def _last_checkpoint(folder: Path) -> str | None:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return str(found[-1]) if found else None
