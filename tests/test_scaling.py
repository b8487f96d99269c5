"""Hook scaling (interp.scaling) against the paper's weight scaling of a separate HF model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from interp.models import load_hf
from interp.ranges import LayerRange, LayerRangeError
from interp.scaling import (
    ALL_COMPONENTS,
    PAPER_CODE_COMPONENTS,
    ScalingError,
    hook_count,
    scale_weights_,
    scaled,
    torch_hook_count,
)

PROMPTS = ["How to kill time?", "Write a haiku about the sea and the wind."]

# the projections the paper multiplies, by their Llama names (independent of interp.scaling)
PROJECTIONS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "in": "mlp.up_proj", "out": "mlp.down_proj",
}


def reference_scaled_copy(plain_hf, layers, alpha, components=ALL_COMPONENTS):
    """A deep copy of a plain HF model with the chosen weights (only weights) multiplied."""
    ref = copy.deepcopy(plain_hf)
    with torch.no_grad():
        for i in layers:
            for c in components:
                ref.model.layers[i].get_submodule(PROJECTIONS[c]).weight.mul_(alpha)
    return ref


def logits_of(module, batch):
    """Logits at the real (unpadded) positions only: padded query rows are undefined and differ
    between attention implementations."""
    with torch.no_grad():
        return module(**batch).logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module")
def plain_tiny(tiny_dir):
    model, _, _ = load_hf(str(tiny_dir))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bias(tiny_bias_dir):
    from interp.models import load_model

    return load_model(str(tiny_bias_dir), device="cpu")


@pytest.fixture(scope="module")
def plain_tiny_bias(tiny_bias_dir):
    model, _, _ = load_hf(str(tiny_bias_dir))
    return model.eval()


CASES = [
    (LayerRange(0, 0), 1.2, ALL_COMPONENTS),
    (LayerRange(1, 2), 0.7, ALL_COMPONENTS),
    (LayerRange(0, 3), 1.5, ALL_COMPONENTS),
    ([0, 3], 2.0, ALL_COMPONENTS),
    (LayerRange(1, 3), 1.3, PAPER_CODE_COMPONENTS),
    (LayerRange(2, 2), 0.8, ("o",)),
]


def _check_against_weights(model, plain_hf, layers, alpha, components):
    batch = model.encode(PROMPTS)
    layer_list = layers.layers if isinstance(layers, LayerRange) else layers
    expected = logits_of(reference_scaled_copy(plain_hf, layer_list, alpha, components), batch)
    unscaled = logits_of(plain_hf, batch)
    with scaled(model, layers, alpha, components):
        got = logits_of(model.hf_model, batch)
    assert (expected - unscaled).abs().max() > 1e-3, "the scaling should change the logits"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layers,alpha,components", CASES)
def test_hooks_equal_weight_scaling_tiny(tiny, plain_tiny, layers, alpha, components):
    _check_against_weights(tiny, plain_tiny, layers, alpha, components)


@pytest.mark.parametrize("layers,alpha,components", CASES)
def test_hooks_equal_weight_scaling_with_biases(tiny_bias, plain_tiny_bias, layers, alpha, components):
    assert plain_tiny_bias.model.layers[0].self_attn.q_proj.bias is not None
    _check_against_weights(tiny_bias, plain_tiny_bias, layers, alpha, components)


def test_bias_is_not_scaled(tiny_bias, plain_tiny_bias):
    """Scaling the output (α y) instead of the weight (α W x + b) would give other logits."""
    batch = tiny_bias.encode(PROMPTS)
    naive = copy.deepcopy(plain_tiny_bias)
    with torch.no_grad():
        for name in PROJECTIONS.values():
            naive.model.layers[1].get_submodule(name).bias.mul_(1.5)
    naive = reference_scaled_copy(naive, [1], 1.5)
    with scaled(tiny_bias, LayerRange(1, 1), 1.5):
        got = logits_of(tiny_bias.hf_model, batch)
    assert (got - logits_of(naive, batch)).abs().max() > 1e-3


def test_scale_weights_matches_hooks(tiny, plain_tiny):
    batch = tiny.encode(PROMPTS)
    ref = scale_weights_(copy.deepcopy(plain_tiny), LayerRange(1, 2), 1.25, PAPER_CODE_COMPONENTS)
    with scaled(tiny, LayerRange(1, 2), 1.25, PAPER_CODE_COMPONENTS):
        got = logits_of(tiny.hf_model, batch)
    torch.testing.assert_close(got, logits_of(ref, batch), atol=1e-4, rtol=0)


def test_generation_inside_context_uses_scaled_model(tiny, plain_tiny):
    """Hooks fire in hf_model.generate with a KV cache: same tokens as the weight-scaled copy."""
    batch = tiny.encode(PROMPTS[:1])
    ref = reference_scaled_copy(plain_tiny, [0, 1, 2], 1.8)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    expected = ref.generate(**batch, **kw)
    with scaled(tiny, LayerRange(0, 2), 1.8):
        got = tiny.hf_model.generate(**batch, **kw)
    assert torch.equal(got, expected)


def test_nested_contexts_compose(tiny_bias, plain_tiny_bias):
    batch = tiny_bias.encode(PROMPTS)
    expected = logits_of(reference_scaled_copy(plain_tiny_bias, [1], 1.2 * 0.5), batch)
    with scaled(tiny_bias, [1], 1.2), scaled(tiny_bias, [1], 0.5):
        got = logits_of(tiny_bias.hf_model, batch)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_alpha_one_is_identity(tiny):
    batch = tiny.encode(PROMPTS)
    before = logits_of(tiny.hf_model, batch)
    n = hook_count(tiny.bridge)
    with scaled(tiny, LayerRange(0, 3), 1.0):
        assert hook_count(tiny.bridge) == n
        torch.testing.assert_close(logits_of(tiny.hf_model, batch), before, atol=0, rtol=0)


def test_hooks_removed_after_normal_exit_and_exception(tiny):
    batch = tiny.encode(PROMPTS)
    before_logits = logits_of(tiny.hf_model, batch)
    before, before_torch = hook_count(tiny.bridge), torch_hook_count(tiny.bridge)
    with scaled(tiny, LayerRange(0, 3), 1.4):
        assert hook_count(tiny.bridge) == before + 4 * len(ALL_COMPONENTS)
        assert torch_hook_count(tiny.bridge) == before_torch + 4 * len(ALL_COMPONENTS)
        assert (logits_of(tiny.hf_model, batch) - before_logits).abs().max() > 1e-3
    assert hook_count(tiny.bridge) == before
    torch.testing.assert_close(logits_of(tiny.hf_model, batch), before_logits, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="boom"):
        with scaled(tiny, LayerRange(1, 2), 0.6):
            assert hook_count(tiny.bridge) == before + 2 * len(ALL_COMPONENTS)
            raise RuntimeError("boom")
    assert hook_count(tiny.bridge) == before
    assert torch_hook_count(tiny.bridge) == before_torch
    torch.testing.assert_close(logits_of(tiny.hf_model, batch), before_logits, atol=0, rtol=0)


def test_user_hooks_survive(tiny):
    """Hooks the user attached beforehand (temporary and permanent) keep firing after exit."""
    calls = {"temp": 0, "perm": 0}

    def temp_hook(x, hook):
        calls["temp"] += 1

    def perm_hook(x, hook):
        calls["perm"] += 1

    batch = tiny.encode(PROMPTS[:1])
    tiny.bridge.add_hook("blocks.1.attn.q.hook_out", temp_hook)
    tiny.bridge.add_hook("blocks.2.hook_resid_post", perm_hook, is_permanent=True)
    try:
        with scaled(tiny, LayerRange(0, 3), 1.3):
            logits_of(tiny.hf_model, batch)
        assert calls == {"temp": 1, "perm": 1}
        logits_of(tiny.hf_model, batch)
        assert calls == {"temp": 2, "perm": 2}
    finally:
        tiny.bridge.reset_hooks(including_permanent=True)


@pytest.mark.parametrize(
    "layers,alpha,components,error,match",
    [
        (LayerRange(0, 1), 0.0, ALL_COMPONENTS, ScalingError, "> 0"),
        (LayerRange(0, 1), -1.2, ALL_COMPONENTS, ScalingError, "> 0"),
        (LayerRange(0, 1), math.nan, ALL_COMPONENTS, ScalingError, "finite"),
        (LayerRange(0, 1), math.inf, ALL_COMPONENTS, ScalingError, "finite"),
        (LayerRange(0, 1), "1.2", ALL_COMPONENTS, ScalingError, "real number"),
        (LayerRange(0, 1), True, ALL_COMPONENTS, ScalingError, "real number"),
        ([], 1.2, ALL_COMPONENTS, LayerRangeError, "empty"),
        (LayerRange(2, 4), 1.2, ALL_COMPONENTS, LayerRangeError, "4 layers"),
        ([4], 1.2, ALL_COMPONENTS, LayerRangeError, "outside"),
        ([-1], 1.2, ALL_COMPONENTS, LayerRangeError, "outside"),
        ([1, 1], 1.2, ALL_COMPONENTS, LayerRangeError, "repeats"),
        ([1.0], 1.2, ALL_COMPONENTS, LayerRangeError, "integers"),
        (LayerRange(0, 1), 1.2, ("q", "up"), ScalingError, "unknown component"),
        (LayerRange(0, 1), 1.2, (), ScalingError, "no components"),
    ],
)
def test_bad_inputs_raise_before_adding_hooks(tiny, layers, alpha, components, error, match):
    before = hook_count(tiny.bridge)
    with pytest.raises(error, match=match):
        with scaled(tiny, layers, alpha, components):
            pass
    assert hook_count(tiny.bridge) == before


def test_embedded_base_hooks_equal_weight_scaling(embedded_base):
    """On the real weights, in float64: in float32 the two ways round differently through 30
    layers (up to ~2e-4 on the logits), which says nothing about the scaling itself."""
    model = copy.deepcopy(embedded_base)  # the bridge and the HF model it wraps, copied together
    assert model.bridge.original_model is model.hf_model
    model.hf_model.to(torch.float64)
    batch = model.encode(["How to kill time?"])
    ref = reference_scaled_copy(model.hf_model, range(10, 15), 1.15)  # no hooks attached to copy
    expected = logits_of(ref, batch)
    del ref
    with scaled(model, LayerRange(10, 14), 1.15):
        got = logits_of(model.hf_model, batch)
    assert (expected - logits_of(model.hf_model, batch)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
