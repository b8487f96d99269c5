"""The one place that knows each model family's Hugging Face layout.

Every other module asks this table where a model keeps its decoder layers, which parameters
form a layer's attention and MLP, which projection weights the paper's scaling multiplies, and
which norms a layer has.  No other module spells a projection name.

The paper's families (Llama-2/3, Gemma, Phi-3) and three more (Gemma-2, Qwen2, Mistral) are
in the table; SmolLM2, the embedded model, is a Llama.  All share one decoder layout
(``model.layers.{i}.self_attn`` / ``.mlp``) and differ in their projections:

- Llama, Gemma, Gemma-2, Qwen2, Mistral: ``self_attn.{q,k,v,o}_proj`` and
  ``mlp.{gate,up,down}_proj`` (Qwen2 gives q, k and v a bias);
- Phi-3: one fused ``self_attn.qkv_proj`` (rows: q heads, then k heads, then v heads), and one
  fused ``mlp.gate_up_proj`` (rows: gate, then up).  Scaling q, k and v by α is scaling the
  whole ``qkv_proj`` by α, and likewise gate and up; a subset scales its row block.

The scaling components are TransformerLens's: ``q k v o`` (attention) and ``gate in out``
(MLP; ``in`` = up, ``out`` = down).

A model whose ``config.model_type`` is not in the table is refused with
``UnsupportedArchitectureError`` naming the supported families; ``register`` adds a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from interp.errors import SafetyLayersError

ATTN_COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_COMPONENTS: tuple[str, ...] = ("gate", "in", "out")
COMPONENTS: tuple[str, ...] = ATTN_COMPONENTS + MLP_COMPONENTS


class UnsupportedArchitectureError(SafetyLayersError, ValueError):
    """A model family this toolkit does not know."""


@dataclass(frozen=True)
class Projection:
    """Where one scaling component's weight lives inside a decoder layer: the ``nn.Linear``
    (``module``, relative to the layer) and, for a fused projection, which block of its output
    rows belongs to the component (``block`` of ``n_blocks`` blocks sized by ``sizes``)."""

    module: str
    block: int | None = None  # index into the fused projection's row blocks; None: the whole module


@dataclass(frozen=True)
class Architecture:
    """One family's layout (see the module docstring)."""

    family: str
    model_types: tuple[str, ...]
    projections: dict[str, Projection]
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    notes: str = ""
    fused_blocks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """For a fused module: the config attributes sizing each row block, e.g.
    ``{"self_attn.qkv_proj": ("q", "kv", "kv")}`` (``q``: heads × head_dim, ``kv``: KV heads ×
    head_dim, ``ff``: intermediate size)."""

    # --- names ---------------------------------------------------------------------------------

    def layer_prefix(self, layer: int) -> str:
        """``model.layers.3.``: the HF name prefix of a decoder layer's parameters."""
        return f"{self.layers}.{layer}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a parameter name belongs to (``None`` outside the layers)."""
        head = f"{self.layers}."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def block_parameter_names(self, names, layers, include_norms: bool = False) -> list[str]:
        """The attention and MLP parameters (weights and biases) of ``layers`` among ``names``
        (HF parameter names), plus the layers' norms if ``include_norms``: what SPPFT freezes."""
        wanted = set(layers)
        parts = {self.attention, self.mlp} | (set(self.norms) if include_norms else set())
        return [
            name for name in names
            if (layer := self.layer_of(name)) in wanted
            and name[len(self.layer_prefix(layer)):].split(".", 1)[0] in parts
        ]

    def projection(self, component: str) -> Projection:
        if component not in self.projections:
            raise UnsupportedArchitectureError(
                f"component {component!r} unknown; choose from {', '.join(COMPONENTS)}"
            )
        return self.projections[component]

    def projection_weight(self, layer: int, component: str) -> str:
        """HF name of the weight holding ``component`` of ``layer``."""
        return self.layer_prefix(layer) + self.projection(component).module + ".weight"

    def row_slice(self, config, component: str) -> slice:
        """The output rows of a projection's weight that belong to ``component`` (all rows for
        an unfused projection)."""
        proj = self.projection(component)
        if proj.block is None:
            return slice(None)
        sizes = [_block_size(config, kind) for kind in self.fused_blocks[proj.module]]
        start = sum(sizes[: proj.block])
        return slice(start, start + sizes[proj.block])

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # --- element masks ---------------------------------------------------------------------------

    def neuron_rows(self, config, neurons) -> dict[str, tuple[str, list[int]]]:
        """For MLP neurons ``neurons`` (indices into the intermediate size): the weights and
        output rows (``"rows"``) or input columns (``"cols"``) that carry them.  Returns
        ``{component: (axis, indices)}`` for gate, in (rows) and out (columns)."""
        neurons = [int(n) for n in neurons]
        out = {}
        for component, axis in (("gate", "rows"), ("in", "rows"), ("out", "cols")):
            rows = self.row_slice(config, component) if axis == "rows" else slice(None)
            offset = rows.start or 0
            out[component] = (axis, [offset + n for n in neurons])
        return out

    def head_rows(self, config, heads) -> dict[str, tuple[str, list[int]]]:
        """For attention (query) heads ``heads``: their rows of q and columns of o.  K/V heads are
        shared under grouped-query attention and are left out."""
        dim = self.head_dim(config)
        q_offset = self.row_slice(config, "q").start or 0
        q_rows, o_cols = [], []
        for h in heads:
            q_rows += list(range(q_offset + h * dim, q_offset + (h + 1) * dim))
            o_cols += list(range(h * dim, (h + 1) * dim))
        return {"q": ("rows", q_rows), "o": ("cols", o_cols)}


def _block_size(config, kind: str) -> int:
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind == "q":
        return config.num_attention_heads * dim
    if kind == "kv":
        return (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * dim
    if kind == "ff":
        return config.intermediate_size
    raise ValueError(f"unknown block kind {kind!r}")


_SPLIT = {
    "q": Projection("self_attn.q_proj"),
    "k": Projection("self_attn.k_proj"),
    "v": Projection("self_attn.v_proj"),
    "o": Projection("self_attn.o_proj"),
    "gate": Projection("mlp.gate_proj"),
    "in": Projection("mlp.up_proj"),
    "out": Projection("mlp.down_proj"),
}

ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add a family to the table (its ``model_types`` then resolve to it)."""
    ARCHITECTURES[arch.family] = arch
    return arch


register(Architecture("llama", ("llama",), _SPLIT, notes="Llama-2, Llama-3, SmolLM2"))
register(Architecture("mistral", ("mistral",), _SPLIT))
register(Architecture("qwen2", ("qwen2",), _SPLIT, notes="q, k, v projections carry biases"))
register(Architecture("gemma", ("gemma",), _SPLIT))
register(Architecture(
    "gemma2", ("gemma2",), _SPLIT,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
))
register(Architecture(
    "phi3", ("phi3",),
    {
        "q": Projection("self_attn.qkv_proj", 0),
        "k": Projection("self_attn.qkv_proj", 1),
        "v": Projection("self_attn.qkv_proj", 2),
        "o": Projection("self_attn.o_proj"),
        "gate": Projection("mlp.gate_up_proj", 0),
        "in": Projection("mlp.gate_up_proj", 1),
        "out": Projection("mlp.down_proj"),
    },
    fused_blocks={"self_attn.qkv_proj": ("q", "kv", "kv"), "mlp.gate_up_proj": ("ff", "ff")},
    notes="fused qkv_proj and gate_up_proj",
))


def supported_families() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_of(model) -> Architecture:
    """The family of an HF model, a config, or a ``LoadedModel`` (by ``config.model_type``)."""
    config = getattr(model, "config", None)
    if config is None:
        hf = getattr(model, "hf_model", None)
        config = getattr(hf, "config", model)
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} is not supported; supported families: {', '.join(supported_families())} "
        "(interp.architectures.register adds one)"
    )
