"""LoRA adapter files: saved in float16, summed exactly, merged into a base model (all by PEFT)."""

from __future__ import annotations

from pathlib import Path

import torch

from interp.models import load_model


def save_adapter_fp16(peft_model, out_dir: Path) -> Path:
    """Save ``peft_model``'s ``default`` LoRA adapter with its tensors in float16 (half the size;
    merged back in float32)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, selected_adapters=["default"])
    weights = out_dir / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return out_dir


def combine_adapters(base_model, adapter_dirs: list[Path], weights: list[float], out_dir: Path) -> Path:
    """Write ``sum_i weights[i] * dW_i`` as one LoRA adapter (ranks added): PEFT's
    ``add_weighted_adapter(combination_type="cat")`` stacks the scaled A matrices and the B
    matrices, so the sum is exact (no SVD truncation)."""
    from peft import PeftModel

    if len(adapter_dirs) != len(weights) or not adapter_dirs:
        raise ValueError("need one weight per adapter")
    names = [f"part{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base_model, adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(names, list(weights), "default", combination_type="cat")
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    save_adapter_fp16(model, out_dir)
    model.unload()
    return out_dir


def merged_model(base: str, adapter: Path):
    """``base`` loaded on the CPU without a bridge, with the LoRA adapter in ``adapter`` merged in
    (PEFT's ``merge_and_unload``)."""
    from peft import PeftModel

    model = load_model(base, device="cpu", bridge=False)
    with torch.no_grad():
        model.hf_model = PeftModel.from_pretrained(model.hf_model, adapter).merge_and_unload()
    return model
