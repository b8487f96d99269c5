"""The one spelling of a TransformerLens hook name: ``hook_name(site, layer)``.

TransformerLens's own sites go through ``transformer_lens.utilities.get_act_name``
(``"resid_pre"`` -> ``blocks.3.hook_resid_pre``; ``resid_post``, ``attn_out``, ``mlp_out``,
``pattern``...).  The projections the scaling hooks and the importance scores touch have no
``get_act_name`` alias: they are the ``TransformerBridge``'s wrappers of the HF linear layers,
``blocks.{layer}.attn.{q,k,v,o}`` and ``blocks.{layer}.mlp.{gate,in,out}`` (``in`` = ``up_proj``,
``out`` = ``down_proj``), each with a ``hook_in`` and a ``hook_out``; the component names are
``interp.architectures.COMPONENTS``.
"""

from __future__ import annotations

from transformer_lens.utilities import get_act_name

from interp.architectures import ATTN_COMPONENTS, COMPONENTS

ENDS = ("in", "out")


def hook_name(site: str, layer: int, end: str = "out") -> str:
    """The bridge hook of ``site`` at ``layer``: a TransformerLens site (``get_act_name``), or a
    projection component (``"q"`` ... ``"out"``) whose input or output (``end``) is hooked."""
    if site in COMPONENTS:
        if end not in ENDS:
            raise ValueError(f"end must be one of {ENDS}, got {end!r}")
        parent = "attn" if site in ATTN_COMPONENTS else "mlp"
        return f"blocks.{int(layer)}.{parent}.{site}.hook_{end}"
    return get_act_name(site, int(layer))


__all__ = ["hook_name"]
