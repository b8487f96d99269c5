"""What every result records about where it came from: the weights' fingerprint and the
package versions.

``weights_fingerprint`` is a cheap, stable hash of a model's weights: every tensor's HF name,
shape, float64 sum (to 6 significant digits) and ~257 strided sample values (rounded to 6
decimals), in name order.  It tells checkpoints apart without hashing gigabytes.  It runs where
the weights are: the sum is taken on the tensor's own device (accumulated in float64) and only
the sampled values travel to the host, so a 7B model on a GPU costs a few hundred small copies,
not 28 GB of float64 ones.  All-zero biases are left out (a zero bias computes the same as none,
and TransformerLens's bridge adds one to the unembedding).  A float64 sum does not depend on
the torch thread count at 6 digits, so 1- and 2-thread processes agree.
"""

from __future__ import annotations

import hashlib
import platform

import torch
from torch import Tensor

PACKAGES = ("torch", "transformers", "transformer-lens", "peft", "trl", "datasets", "accelerate", "safety-layers")


def _state(model) -> dict[str, Tensor]:
    if isinstance(model, dict):
        return model
    if hasattr(model, "hf_state_dict"):  # a LoadedModel
        return model.hf_state_dict()
    if isinstance(model, torch.nn.Module):
        names = [n for n, _ in model.named_parameters()]
        if any("_original_component" in n for n in names):
            raise ValueError("fingerprint a LoadedModel, not the bridge-wrapped HF module (its names are renamed)")
        persistent = {
            n for n, _ in model.named_buffers(remove_duplicate=False)
            if n.rpartition(".")[2] not in model.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set
        }
        buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n in persistent}
        return {**dict(model.named_parameters(remove_duplicate=False)), **buffers}
    raise TypeError(f"cannot fingerprint {type(model).__name__}: need a LoadedModel, an HF module or a state dict")


@torch.no_grad()
def weights_fingerprint(model, cast: torch.dtype | None = None) -> str:
    """The fingerprint (module docstring) of a ``LoadedModel``, an unbridged HF module, or a
    ``{name: tensor}`` state dict; 16 hex digits.  ``cast``: hash the values rounded to that dtype
    first (``torch.bfloat16``: the same weights loaded in float32 or bfloat16 agree)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_state(model).items()):
        if tensor.is_meta:
            raise ValueError(f"{name} is on the meta device (offloaded): its values cannot be fingerprinted")
        if name.rpartition(".")[2] == "bias" and not tensor.any():
            continue
        flat = tensor.detach().reshape(-1)
        if cast is not None:
            flat = flat.to(cast)
        step = max(1, flat.numel() // 257)
        total = flat.sum(dtype=torch.float64).item()
        sample = flat[::step].to(torch.float64).cpu().numpy().round(6)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(f"{total:.6e}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out
