"""Plain Hugging Face checkpoints of a ``LoadedModel``, whatever wraps it.

``hf_model.save_pretrained`` fails once TransformerLens's bridge has wrapped the model ("The
weights trying to be saved contained shared tensors ..."), and the bridge's parameter names are
not the model's.  ``save_hf_checkpoint`` writes what ``save_pretrained`` would have written for
the unwrapped model: ``model.safetensors`` with the parameters and persistent buffers under their
HF names (``LoadedModel.hf_parameters``, recorded before the bridge booted; a tied weight is
written once, under its first name, as ``save_pretrained`` does), ``config.json``,
``generation_config.json`` and the tokenizer.  ``AutoModelForCausalLM.from_pretrained(folder)``
loads it, and so do vLLM and lm-evaluation-harness.  The write goes to a temporary folder that
is renamed into place, so an interrupted save leaves no half checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each storage once (tied weights under their first name), contiguous, on the CPU."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_hf_checkpoint(model, folder: str | Path, metadata: dict | None = None,
                       state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a ``LoadedModel``) as a plain HF model folder; returns the folder.
    ``metadata``: extra provenance stored beside it as ``safety_layers.json``; ``state``: the
    weights under their HF names when they are not the model's own tensors (a sharded run's
    gathered state dict), by default ``model.hf_state_dict()``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = _unique(model.hf_state_dict() if state is None else state)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = model.config
        attn = getattr(config, "_attn_implementation", None)
        config.save_pretrained(tmp)
        if attn is not None:  # the saved config should not pin the eager attention the bridge needs
            saved = json.loads((tmp / "config.json").read_text())
            saved.pop("_attn_implementation", None)
            (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        generation_config = getattr(model.hf_model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        if metadata:
            (tmp / "safety_layers.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
