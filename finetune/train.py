"""Fine-tuning through transformers' ``Trainer``: full, SPPFT (safety layers frozen) or the
paper's ablation (another range of the same size frozen), optionally with LoRA.

``train(model, dataset, mode, layers=..., out_dir=...)`` trains ``model.hf_model`` in place, so
the ``LoadedModel`` (and its TransformerLens bridge, which shares the weights) holds the trained
weights afterwards.  Because it is plain ``Trainer``, the same code runs under
``accelerate launch`` on GPUs (see the notes on FSDP/DeepSpeed below).

Modes (Li et al., §4 and Table 8):

- ``full``: every weight trains.
- ``sppft``: the attention and MLP weights of ``layers`` (the located safety range) are frozen
  (``finetune.masks.freeze_layers``); RMSNorms train, as in the paper's code.
- ``ablation``: a different range of the same size is frozen: ``ablation_layers`` if given,
  else the first layers of the model (or the last, if those overlap the safety range).

Frozen weights stay **bit-identical**: their gradients are zeroed by tensor hooks *and* they are
left out of the optimizer (``MaskedTrainer.create_optimizer``), so AdamW's decoupled weight decay
and its momentum never touch them.  Element masks (``element_masks=``) keep their parameter in
the optimizer but in a zero-weight-decay group, and their masked elements are written back after
every optimizer step (see ``finetune.masks``).  ``skip_frozen_grads=True`` additionally sets
``requires_grad=False`` on wholly frozen parameters (what the paper's code does), which saves
their weight-gradient computation; the hooks alone do not.

With ``lora=True`` (PEFT), LoRA adapters go on the q/k/v/o/gate/up/down projections of every
layer *outside* the frozen range, so the frozen layers get no adapter at all; the adapter is
merged into the weights after training.

A run folder holds ``config.json`` (everything: mode, range, frozen parameters, data record,
hyperparameters, seeds, versions), ``log.json`` (the Trainer's log history), ``metrics.json``
and ``checkpoints/checkpoint-N`` (safetensors weights under the plain HF names, optimizer,
scheduler and RNG state; ``resume_from_checkpoint`` continues a run).  Checkpoints are plain HF
model folders: ``load_model("<run>/checkpoints/checkpoint-N")`` loads one.

Sharded training: tensor hooks registered on the original parameters do not survive sharding
(FSDP2's ``fully_shard`` swaps every parameter for a new ``DTensor`` one; FSDP1 and DeepSpeed
flatten them), and the custom save/load below is bypassed under FSDP and DeepSpeed.  Sharded
fine-tuning is ``finetune.sharded`` (FSDP2, frozen parameters ``requires_grad=False``, a gathered
plain checkpoint), tested on CPU processes; this module runs one process or DDP (tested on CPU).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune import masks as M
from interp.io import atomic_write_json
from interp.provenance import versions
from interp.ranges import LayerRange, LayerRangeError

MODES = ("full", "sppft", "ablation")


@dataclass
class TrainConfig:
    """Hyperparameters.  Defaults are sized for the 135M embedded model on two CPU cores;
    the paper's (Table 6) are 3 epochs, 100 warmup steps, lr 1e-4 (Llama-3) to 6e-4, fp32."""

    epochs: float = 1
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    train_on_inputs: bool = False
    warmup: float = 0.1  # a ratio of the total steps if < 1, else a step count
    lr_scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    seed: int = 0
    logging_steps: int = 1
    save_strategy: str = "epoch"  # "epoch", "steps" (every save_steps) or "no"
    save_steps: int = 500
    save_total_limit: int | None = 1
    keep_checkpoints: bool = True
    skip_frozen_grads: bool = False
    include_norms: bool = False
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    progress: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    mode: str
    layer_range: list[int] | None
    frozen: list[str]
    seconds: float
    steps: int
    train_loss: float | None
    log_history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None


# ---------------------------------------------------------------- batching


def pad_collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad a list of tokenized rows into a batch (labels padded with −100)."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

    return {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


# ---------------------------------------------------------------- the trainer


def load_hf_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors (a plain checkpoint's ``model.safetensors``) into ``model``'s own
    parameters (a tied weight may appear under one of its names only)."""
    params = M.named_parameters(model)
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(model.hf_state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))


def optimizer_groups(module, handle: M.MaskHandle, weight_decay: float, decay_names: set[str],
                     allowed: set[int] | None = None) -> list[dict]:
    """AdamW parameter groups that leave wholly frozen parameters out (no state, no decay) and
    put element-masked ones in the zero-weight-decay group.  ``decay_names``: the names (as
    ``module.named_parameters`` gives them) that take weight decay.  ``allowed``: ids of the
    parameters that may train at all (the model's own HF parameters; not, say, the split copies
    a bridge adds on Phi-3)."""
    frozen, partial = handle.frozen_ids(), handle.partial_ids()
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in frozen or (allowed is not None and id(p) not in allowed):
            continue
        groups[0 if (name in decay_names and id(p) not in partial) else 1]["params"].append(p)
    return [g for g in groups if g["params"]]


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class RestoreMaskedElements(TrainerCallback):
        """After each optimizer step, write the saved values back into element-masked weights."""

        def __init__(self, handle):
            self.handle = handle

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.handle.restore()

    class MaskedTrainer(Trainer):
        """``Trainer`` whose optimizer never sees frozen parameters and gives element-masked
        ones no weight decay, and whose checkpoints use plain HF parameter names."""

        def __init__(self, *args, mask: M.MaskHandle | None = None, loaded=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.mask = mask or M.MaskHandle()
            self.loaded = loaded
            if self.mask.partial:
                self.add_callback(RestoreMaskedElements(self.mask))

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model if model is None else model
                decay = set(self.get_decay_parameter_names(model))
                allowed = None
                if self.loaded is not None and self._plain():
                    allowed = {id(p) for p in M.named_parameters(self.loaded).values()}
                groups = optimizer_groups(model, self.mask, self.args.weight_decay, decay, allowed)
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

        def _plain(self) -> bool:
            from peft import PeftModel

            return not (self.is_fsdp_enabled or self.is_deepspeed_enabled or isinstance(self.model, PeftModel))

        def _save(self, output_dir=None, state_dict=None):
            if not self._plain() or self.loaded is None:
                return super()._save(output_dir, state_dict)
            from transformers.trainer import TRAINING_ARGS_NAME

            from interp.checkpoint import save_hf_checkpoint

            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return None
            save_hf_checkpoint(self.loaded, output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from interp.checkpoint import WEIGHTS_NAME

            weights = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
            if not self._plain() or self.loaded is None or not os.path.isfile(weights):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            import safetensors.torch

            load_hf_state(self.loaded, safetensors.torch.load_file(weights))
            return None

    return MaskedTrainer


# ---------------------------------------------------------------- ranges and LoRA


def mask_range(model, mode: str, layers=None, ablation_layers=None) -> LayerRange | None:
    """The range a mode freezes: none (full), the safety range (sppft), or the ablation range."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "full":
        return None
    if mode == "ablation" and ablation_layers is not None:
        return M.resolve_range(ablation_layers, model)
    if layers is None:
        raise LayerRangeError(f"mode {mode!r} needs the located safety range (layers=...)")
    safety = M.resolve_range(layers, model)
    return safety if mode == "sppft" else M.ablation_range(safety, M.n_layers_of(model))


def lora_target_names(model, frozen_layers: set[int]) -> list[str]:
    """Module names of the projections (``interp.architectures``) of every layer outside the
    frozen ones: where LoRA adapters go."""
    arch = model.arch
    modules = dict.fromkeys(arch.projection(c).module for c in arch.projections)
    return [arch.layer_prefix(i) + m for i in range(model.n_layers) if i not in frozen_layers for m in modules]


def _wrap_lora(model, frozen_layers: set[int], config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    if model.has_bridge:
        raise ValueError("LoRA fine-tuning needs the plain HF model: load it with load_model(..., bridge=False)")
    targets = lora_target_names(model, frozen_layers)
    if not targets:
        raise ValueError("LoRA: no projection layers left to adapt outside the frozen range")
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    return get_peft_model(model.hf_model, lora), targets


def _merge_lora(model, peft_model) -> None:
    """Merge the adapters into the base weights in place (the same ``Parameter`` objects, so
    ``hf_parameters`` stays valid) and put the plain modules back."""
    peft_model.merge_and_unload()


# ---------------------------------------------------------------- the steps of a run


def check_trainable(model) -> None:
    """Refuse a model whose own parameters would get no gradient: a bridged family with fused
    projections (TransformerLens computes with split copies of them)."""
    if model.has_bridge and model.arch.fused_blocks:
        raise ValueError(
            f"{model.arch.family}: TransformerLens's bridge computes with copies split off the fused "
            f"{', '.join(model.arch.fused_blocks)} weights, so the model's own parameters would get no gradient; "
            "fine-tune the plain model: load it with load_model(..., bridge=False)"
        )


def check_unsharded() -> None:
    """Refuse an accelerate launch that asks for FSDP or DeepSpeed: they replace or flatten the
    parameters, so the tensor hooks would never fire and the optimizer's frozen-parameter filter
    would match nothing (frozen layers would train); ``finetune.sharded`` is the sharded path."""
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise ValueError(f"finetune.train cannot keep layers frozen under {name}: use finetune.sharded "
                             "(python -m analyses.sppft --train-only under torchrun or accelerate launch "
                             "--config_file finetune/accelerate_sharded.yaml)")


def prepare_dataset(model, dataset, config: TrainConfig):
    """A tokenized dataset: ``dataset`` itself, or a list of ``finetune.data`` examples tokenized
    with ``config.max_length`` and ``config.train_on_inputs``; an empty one is refused."""
    from finetune.data import tokenize

    if isinstance(dataset, list):
        dataset = tokenize(dataset, model.tokenizer, config.max_length, config.train_on_inputs, model.template)
    if len(dataset) == 0:
        raise ValueError("train: empty dataset")
    return dataset


def enable_gradients(hf_model) -> dict[str, bool]:
    """Let every weight train (a model loaded with a merged PEFT adapter arrives with
    ``requires_grad=False`` everywhere); returns the flags as they were, for ``restore_gradients``."""
    flags = {n: p.requires_grad for n, p in hf_model.named_parameters()}
    hf_model.requires_grad_(True)
    return flags


def restore_gradients(hf_model, flags: dict[str, bool]) -> None:
    for n, p in hf_model.named_parameters():
        p.requires_grad_(flags.get(n, True))


def apply_masks(model, frozen_range: LayerRange | None, element_masks: dict | None, config: TrainConfig) -> M.MaskHandle:
    """Register the layer-range and element masks (none on the layers under LoRA, which get no
    adapter instead); with ``skip_frozen_grads`` the wholly frozen parameters stop requiring grad."""
    handle = M.MaskHandle()
    if frozen_range is not None and not config.lora:
        handle = M.freeze_layers(model, frozen_range, include_norms=config.include_norms)
    if element_masks:
        handle = handle.merge(M.freeze_elements(model, element_masks))
    handle.layer_range = frozen_range
    if config.skip_frozen_grads:
        for p in handle.frozen.values():
            p.requires_grad_(False)
    return handle


def training_arguments(config: TrainConfig, out_dir: Path, device: torch.device):
    """The ``TrainingArguments`` of a run: checkpoints under ``out_dir/checkpoints``."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        use_cpu=device.type == "cpu",
    )


def run_trainer(trainer, model, handle: M.MaskHandle, grad_flags: dict[str, bool], lora_model=None,
                resume_from_checkpoint=None) -> float:
    """Train, then (whatever happens) take the masks off, put the gradient flags back, merge any
    LoRA adapter and leave the model in eval mode; returns the seconds spent."""
    hf_model = model.hf_model
    start = time.perf_counter()
    try:
        hf_model.train()
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        seconds = time.perf_counter() - start
        handle.remove()
        restore_gradients(hf_model, grad_flags)
        if lora_model is not None:
            _merge_lora(model, lora_model)
        hf_model.eval()
    return seconds


# ---------------------------------------------------------------- records


def _train_loss(history: list[dict]) -> float | None:
    return next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None)


def run_record(model, mode: str, layers, frozen_range: LayerRange | None, handle: M.MaskHandle, n_rows: int,
               config: TrainConfig, resume_from_checkpoint=None, record: dict | None = None) -> dict:
    """What ``config.json`` holds: mode, range, masks, data, hyperparameters, device, versions."""
    return {
        "mode": mode,
        "model": model.spec,
        "template": model.template,
        "layer_range": [frozen_range.start, frozen_range.end] if frozen_range else None,
        "safety_range": str(layers) if layers is not None else None,
        "masks": handle.describe(),
        "dataset_rows": n_rows,
        "train": asdict(config),
        "device": str(model.device),
        "dtype": str(next(model.hf_model.parameters()).dtype),
        "resumed_from": str(resume_from_checkpoint) if resume_from_checkpoint else None,
        "versions": versions(),
        **({"data": record} if record else {}),
    }


def run_metrics(model, handle: M.MaskHandle, history: list[dict], steps: int, seconds: float) -> dict:
    """What ``metrics.json`` holds: time, steps, final loss, frozen and trainable element counts."""
    return {
        "seconds": round(seconds, 2),
        "steps": steps,
        "seconds_per_step": round(seconds / steps, 3) if steps else None,
        "train_loss": _train_loss(history),
        "frozen_parameters": len(handle.frozen),
        "frozen_elements": handle.n_frozen_elements(),
        "trainable_elements": sum(p.numel() for p in model.hf_model.parameters()) - handle.n_frozen_elements(),
    }


def write_run_folder(out_dir: Path, run_config: dict, history: list[dict], metrics: dict, keep_checkpoints: bool) -> None:
    """``config.json``, ``log.json`` and ``metrics.json``; the checkpoints folder goes if it is
    not to be kept or holds nothing."""
    atomic_write_json(out_dir / "config.json", run_config)
    atomic_write_json(out_dir / "log.json", history)
    atomic_write_json(out_dir / "metrics.json", metrics)
    checkpoints = out_dir / "checkpoints"
    if not keep_checkpoints or (checkpoints.is_dir() and not any(checkpoints.iterdir())):
        shutil.rmtree(checkpoints, ignore_errors=True)


# ---------------------------------------------------------------- train


def train(
    model,
    dataset,
    mode: str = "full",
    layers=None,
    out_dir: str | Path = "results/sppft/run",
    config: TrainConfig | None = None,
    ablation_layers=None,
    element_masks: dict | None = None,
    resume_from_checkpoint: str | bool | None = None,
    record: dict | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (a ``LoadedModel``) in place and write a run folder.

    ``dataset``: a tokenized ``datasets.Dataset`` (``input_ids``/``attention_mask``/``labels``)
    or a list of ``finetune.data`` examples (tokenized here with ``config.max_length`` and
    ``config.train_on_inputs``).  ``layers``: the safety range (``LayerRange``, ``"6,12"`` or a
    located-range JSON).  ``element_masks``: extra ``{name: bool mask}`` frozen elements.
    ``record``: anything to store in config.json (e.g. the data's ``describe`` record).
    ``callbacks``: extra ``TrainerCallback``s (e.g. timers)."""
    from transformers import set_seed

    config = config or TrainConfig()
    check_trainable(model)
    check_unsharded()
    out_dir = Path(out_dir)
    frozen_range = mask_range(model, mode, layers, ablation_layers)
    dataset = prepare_dataset(model, dataset, config)
    set_seed(config.seed)

    grad_flags = enable_gradients(model.hf_model)
    handle = apply_masks(model, frozen_range, element_masks, config)
    train_model, lora_model = model.hf_model, None
    if config.lora:
        train_model, _ = _wrap_lora(model, set(frozen_range.layers if frozen_range else ()), config)
        lora_model = train_model
    pad_id = model.pad_token_id
    trainer = _trainer_class()(
        model=train_model,
        args=training_arguments(config, out_dir, model.device),
        train_dataset=dataset,
        data_collator=lambda feats: pad_collate(feats, pad_id),
        processing_class=model.tokenizer,
        mask=handle,
        loaded=model,
        callbacks=callbacks,
    )
    seconds = run_trainer(trainer, model, handle, grad_flags, lora_model, resume_from_checkpoint)

    history, steps = trainer.state.log_history, trainer.state.global_step
    run_config = run_record(model, mode, layers, frozen_range, handle, len(dataset), config, resume_from_checkpoint, record)
    metrics = run_metrics(model, handle, history, steps, seconds)
    write_run_folder(out_dir, run_config, history, metrics, config.keep_checkpoints)
    return TrainResult(
        out_dir=out_dir,
        mode=mode,
        layer_range=run_config["layer_range"],
        frozen=handle.names,
        seconds=seconds,
        steps=steps,
        train_loss=metrics["train_loss"],
        log_history=history,
        config=run_config,
    )
