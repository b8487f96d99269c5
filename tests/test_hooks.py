"""The one hook-name helper (interp.hooks) names hooks the bridge really has, and spells them as
TransformerLens does."""

from __future__ import annotations

import pytest
import torch

from interp.architectures import COMPONENTS
from interp.hooks import hook_name

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "pattern")


def test_every_name_is_a_hook_that_fires_on_the_bridge(tiny):
    names = [hook_name(site, layer) for site in SITES for layer in range(tiny.n_layers)]
    names += [hook_name(c, layer, end) for c in COMPONENTS for layer in range(tiny.n_layers) for end in ("in", "out")]
    assert len(set(names)) == len(names)
    fired = set()

    def record(name):
        def hook(value, hook):
            fired.add(name)
            return value

        return hook

    ids = tiny.encode(["How do I bake bread?"])["input_ids"]
    with torch.no_grad(), tiny.bridge.hooks(fwd_hooks=[(name, record(name)) for name in names]):
        tiny.bridge(ids)
    assert not set(names) - fired, sorted(set(names) - fired)


def test_spelling():
    assert hook_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert hook_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert hook_name("q", 2) == "blocks.2.attn.q.hook_out"
    assert hook_name("out", 1, "in") == "blocks.1.mlp.out.hook_in"
    with pytest.raises(ValueError, match="end"):
        hook_name("q", 0, "middle")
