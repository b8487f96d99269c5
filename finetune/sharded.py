"""Sharded fine-tuning: full, SPPFT or the ablation with every parameter sharded across the
processes of one launch (PyTorch's per-parameter sharding, FSDP2: ``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc-per-node 2 -m analyses.sppft --train-only ...        # or accelerate launch (below)

``train_sharded(model, dataset, mode, layers=..., out_dir=...)`` freezes the same parameters as
``finetune.train`` (the attention and MLP weights of the range ``finetune.train.mask_range``
gives), shards each decoder layer and then the whole model, trains with AdamW, and writes a plain
Hugging Face checkpoint gathered from the shards (``<out_dir>/model``) and the run folder
(``config.json``, ``log.json``, ``metrics.json``) like ``finetune.train``'s.

How the frozen layers stay fixed here.  ``finetune.train`` zeroes their gradients with tensor
hooks on the original parameters; that cannot work under sharding: ``fully_shard`` replaces every
parameter by a new ``DTensor`` parameter holding this rank's shard, so a hook on the original
``Parameter`` sits on a tensor the forward no longer uses and never fires, and an element mask's
indices name elements of the full tensor, which no rank holds.  What sharding does honour is
``requires_grad=False`` set before sharding: such a parameter gets no gradient (nothing is
reduce-scattered for it), the optimizer is never given it (no weight decay, no moments), and the
all-gather that rebuilds it for each forward copies its bytes, so the frozen weights come out
bit-identical.  Element masks and LoRA are therefore refused here (``ShardingError``).

Why a loop of its own rather than ``transformers.Trainer``: ``Trainer`` shards through
``accelerate``, whose FSDP plugin (accelerate 1.x) only engages on top of a GPU-type device; on
the CPU a ``distributed_type: FSDP`` launch silently becomes data parallelism (``MULTI_CPU``) with
the model unsharded, so nothing sharded could be tested on CPU.  This loop runs the same on CPUs
(gloo) and GPUs (NCCL, one GPU per process).  Any launcher that sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR`` works: ``torchrun``, or ``accelerate launch --config_file
finetune/accelerate_sharded.yaml`` (used as a launcher only).  A single process (no launcher)
runs the same code on a world of one.

Batches.  Each optimizer step takes ``batch_size`` rows in a seeded random order (a new
permutation each epoch); rank ``r`` of ``W`` trains on rows ``r, r + W, ...`` of that batch, so
``batch_size`` must be a multiple of ``W``.  The loss is the sum of the token losses over the
*global* number of target tokens, times ``W`` (``fully_shard`` averages gradients over ranks), so
the gradient is the whole batch's mean-token gradient however the rows are split: the loss curve
equals one process's on the same batches up to the order of floating-point sums.

What is not done here: gradient accumulation (``grad_accum`` must be 1; raise ``batch_size``),
mixed precision (the parameters' own dtype is used), loading the model straight into shards (each
rank loads the whole model on the CPU first, then moves its shards to its device: for a 70B model
that needs the host memory of one full copy per process; see docs/scaling.md), and evaluation
between steps.  After training ``model.hf_model`` is left sharded (a ``FSDPModule``): evaluate
the gathered checkpoint (``load_model("<out_dir>/model")``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor

from finetune import masks as M
from finetune.train import TrainConfig, mask_range, pad_collate, prepare_dataset
from interp.checkpoint import save_hf_checkpoint
from interp.errors import SafetyLayersError
from interp.io import atomic_write_json
from interp.provenance import versions

CHECKPOINT = "model"
"""The gathered checkpoint's folder under a run's ``out_dir``."""


class ShardingError(SafetyLayersError, ValueError):
    """A combination sharded training cannot honour (element masks, LoRA, a bridged model, ...)."""


@dataclass
class ShardedResult:
    out_dir: Path
    checkpoint: Path
    mode: str
    layer_range: list[int] | None
    frozen: list[str]
    world_size: int
    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the process group


def world() -> tuple[int, int]:
    """``(rank, world size)`` as the launcher set them (``(0, 1)`` without a launcher)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_group() -> bool:
    """Join the launch's process group (NCCL with CUDA, else gloo) unless one exists; a lone
    process gets a group of one.  Returns whether this call created the group."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    size = world()[1]
    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
    if size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore())
    else:
        dist.init_process_group(backend)
    return True


def rank_device() -> torch.device:
    """This process's device: its own GPU (``LOCAL_RANK``) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ---------------------------------------------------------------- checks and freezing


def check_shardable(model, config: TrainConfig, element_masks: dict | None, world_size: int) -> None:
    """Refuse what sharded training cannot honour, naming the way that works."""
    if element_masks:
        raise ShardingError("element masks cannot be combined with sharded training: each rank holds a flat "
                            "shard of every weight, so a mask over the full tensor has nothing to act on; "
                            "train them unsharded (finetune.train) or freeze whole layers")
    if config.lora:
        raise ShardingError("LoRA is not supported in sharded training; use finetune.train (one process or DDP)")
    if getattr(model, "has_bridge", False):
        raise ShardingError("sharded training needs the plain HF model (the bridge wraps its modules): "
                            "load it with load_model(..., bridge=False)")
    if config.grad_accum != 1:
        raise ShardingError(f"grad_accum={config.grad_accum}: sharded training takes no gradient accumulation; "
                            "raise batch_size instead")
    if config.batch_size % world_size:
        raise ShardingError(f"batch_size={config.batch_size} must be a multiple of the {world_size} processes "
                            "(each takes an equal share of every batch)")


def freeze_for_sharding(model, frozen_range, include_norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """``requires_grad=False`` on the range's attention and MLP parameters (``finetune.masks``'s
    choice), ``True`` on every other parameter; returns the frozen ones by HF name."""
    model.hf_model.requires_grad_(True)
    frozen = M.layer_parameters(model, frozen_range.layers, include_norms) if frozen_range is not None else {}
    for param in frozen.values():
        param.requires_grad_(False)
    return frozen


def shard(model, device: torch.device):
    """``fully_shard`` each decoder layer, then the whole model (embeddings, final norm and a tied
    head share the root's group), on a one-dimensional mesh of every process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hf_model = model.hf_model  # on the CPU; each module's shards move to ``device`` as it is sharded
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for i in range(model.n_layers):
        fully_shard(hf_model.get_submodule(model.arch.layer_prefix(i).rstrip(".")), mesh=mesh)
    fully_shard(hf_model, mesh=mesh)
    return hf_model


# ---------------------------------------------------------------- optimisation


def decays(name: str) -> bool:
    """Whether a parameter takes weight decay (the ``Trainer``'s rule: not biases, not norms)."""
    owner = name.rpartition(".")[0].rpartition(".")[2]  # the module holding the parameter
    return not (name.endswith("bias") or "norm" in owner.lower())


def make_optimizer(hf_model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad only, biases and norms without decay."""
    groups = [{"params": [], "weight_decay": config.weight_decay}, {"params": [], "weight_decay": 0.0}]
    for name, param in hf_model.named_parameters():
        if param.requires_grad:
            groups[0 if decays(name) else 1]["params"].append(param)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def total_steps(config: TrainConfig, n_rows: int) -> int:
    return config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * math.ceil(n_rows / config.batch_size))


def make_scheduler(optimizer, config: TrainConfig, steps: int):
    """The ``Trainer``'s schedule: ``config.lr_scheduler`` with ``warmup`` as a ratio (< 1) or steps."""
    from transformers import get_scheduler

    warmup = math.ceil(config.warmup * steps) if config.warmup < 1 else int(config.warmup)
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def global_batches(n_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices of each step's whole batch: consecutive slices of a seeded permutation, a new
    permutation each epoch (a last short slice is dropped so every step's batch is full)."""
    if n_rows < batch_size:
        raise ShardingError(f"{n_rows} rows cannot fill one batch of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = torch.randperm(n_rows, generator=generator).tolist()
        out += [order[i:i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size)]
    return out[:steps]


def token_loss_sum(hf_model, batch: dict[str, Int[Tensor, "b t"]]) -> tuple[Float[Tensor, ""], int]:
    """The summed next-token cross-entropy over the target tokens (labels other than −100) and
    their number."""
    logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def train_step(hf_model, batch: dict, optimizer, scheduler, max_grad_norm: float) -> dict:
    """One optimizer step on this rank's rows; returns the whole batch's mean token loss."""
    world_size = dist.get_world_size()
    loss_sum, count = token_loss_sum(hf_model, batch)
    totals = torch.tensor([float(count), loss_sum.item()], dtype=torch.float64, device=loss_sum.device)
    dist.all_reduce(totals)
    (loss_sum * world_size / totals[0].clamp(min=1).to(loss_sum.dtype)).backward()
    params = [p for p in hf_model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return {"loss": float(totals[1] / totals[0].clamp(min=1)), "learning_rate": lr,
            "grad_norm": None if norm is None else float(norm)}


def local_batch(dataset, rows: list[int], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """This rank's share (rows ``rank, rank + W, ...``) of a whole batch, padded, on ``device``."""
    rank, size = dist.get_rank(), dist.get_world_size()
    features = [dataset[i] for i in rows[rank::size]]
    return {k: v.to(device) for k, v in pad_collate(features, pad_id).items()}


# ---------------------------------------------------------------- the checkpoint


def gathered_state(hf_model) -> dict[str, Tensor]:
    """The full state dict under the HF names, on the CPU of rank 0 (empty elsewhere); every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------- train


def run_steps(model, dataset, config: TrainConfig, device: torch.device, log=None) -> list[dict]:
    """The training loop: every step's loss, learning rate and gradient norm."""
    hf_model = model.hf_model
    steps = total_steps(config, len(dataset))
    optimizer = make_optimizer(hf_model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    history = []
    hf_model.train()
    for step, rows in enumerate(global_batches(len(dataset), config.batch_size, steps, config.seed), 1):
        entry = {"step": step, **train_step(hf_model, local_batch(dataset, rows, model.pad_token_id, device),
                                            optimizer, scheduler, config.max_grad_norm)}
        history.append(entry)
        if log is not None and step % max(1, config.logging_steps) == 0:
            log(entry)
    hf_model.eval()
    return history


def train_sharded(model, dataset, mode: str = "sppft", layers=None, out_dir: str | Path = "results/sppft/sharded",
                  config: TrainConfig | None = None, ablation_layers=None, element_masks: dict | None = None,
                  record: dict | None = None, log=None) -> ShardedResult:
    """Fine-tune ``model`` (a plain ``LoadedModel``, the same weights on every rank) sharded over
    the launch's processes and write ``<out_dir>/model`` (rank 0); every rank returns the result.
    Arguments as ``finetune.train.train``'s; ``element_masks`` and LoRA raise ``ShardingError``."""
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    created = start_group()
    try:
        check_shardable(model, config, element_masks, dist.get_world_size())
        frozen_range = mask_range(model, mode, layers, ablation_layers)
        dataset = prepare_dataset(model, dataset, config)
        torch.manual_seed(config.seed)
        frozen = freeze_for_sharding(model, frozen_range, config.include_norms)
        n_params = sum(p.numel() for p in M.named_parameters(model).values())
        n_frozen = sum(p.numel() for p in frozen.values())
        device = rank_device()
        shard(model, device)
        start = time.perf_counter()
        history = run_steps(model, dataset, config, device, log if dist.get_rank() == 0 else None)
        seconds = time.perf_counter() - start
        state = gathered_state(model.hf_model)
        checkpoint = out_dir / CHECKPOINT
        run_config = {"mode": mode, "model": model.spec, "template": model.template, "sharded": True,
                      "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                      "layer_range": [frozen_range.start, frozen_range.end] if frozen_range else None,
                      "safety_range": str(layers) if layers is not None else None, "frozen_parameters": list(frozen),
                      "dataset_rows": len(dataset), "train": asdict(config), "device": str(device),
                      "versions": versions(), **({"data": record} if record else {})}
        if dist.get_rank() == 0:
            save_hf_checkpoint(model, checkpoint, state=state)
            metrics = {"seconds": round(seconds, 2), "steps": len(history),
                       "seconds_per_step": round(seconds / len(history), 3) if history else None,
                       "train_loss": sum(h["loss"] for h in history) / len(history) if history else None,
                       "frozen_parameters": len(frozen), "frozen_elements": n_frozen,
                       "trainable_elements": n_params - n_frozen}
            atomic_write_json(out_dir / "config.json", run_config)
            atomic_write_json(out_dir / "log.json", history)
            atomic_write_json(out_dir / "metrics.json", metrics)
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    return ShardedResult(out_dir=out_dir, checkpoint=checkpoint, mode=mode, layer_range=run_config["layer_range"],
                         frozen=list(frozen), world_size=run_config["world_size"], seconds=seconds,
                         steps=len(history), losses=[h["loss"] for h in history], config=run_config)
