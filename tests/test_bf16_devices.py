"""The inference building blocks in bfloat16 on the CPU, and on a model split over two placements.

bfloat16 (``load_model(..., dtype=torch.bfloat16)``): the last-token capture, the scaling hooks
and ``RoEvaluator`` on the tiny Llama, each against an independent bfloat16 computation on a
separate plain HF copy, with bfloat16 tolerances (8 bits of mantissa: a relative error of about
4e-3 per rounding, compounded over the layers).

Several devices (``load_model(..., device_map=...)``): this machine has one CPU and no GPU, so
the split is CPU + disk.  Layers 1 and 3 are offloaded to disk (accelerate's ``AlignDevicesHook``
loads their weights for each forward and drops them again); everything else stays on the CPU.
That exercises the accelerate hooks the bridge must work through, the same ones a CPU + GPU or
multi-GPU ``device_map`` installs.  A real multi-GPU split is not tested here.
"""

from __future__ import annotations

import pytest
import torch

from interp.activations import capture_last_token_resid
from interp.generation import generate
from interp.models import load_model
from interp.overrejection import RoEvaluator
from interp.ranges import LayerRange
from interp.scaling import ALL_COMPONENTS, scaled

try:
    from test_families import (
        DO_PROMPTS,
        PROMPTS,
        ParityJudge,
        build_tiny_family,
        greedy_reference,
        logits_at_real_tokens,
        plain_copy,
        reference_scaled,
        tolerances,
    )
except ImportError:  # imported as a package module
    from tests.test_families import (
        DO_PROMPTS,
        PROMPTS,
        ParityJudge,
        build_tiny_family,
        greedy_reference,
        logits_at_real_tokens,
        plain_copy,
        reference_scaled,
        tolerances,
    )

BF16 = torch.bfloat16
N_LAYERS = 4  # conftest's tiny Llama


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ over the whole tensor (scale-free)."""
    return float((got.float() - expected.float()).norm() / expected.float().norm())


# --- bfloat16 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu", dtype=BF16)
    assert model.dtype == BF16 and all(p.dtype == BF16 for p in model.hf_parameters.values())
    return model


@pytest.fixture(scope="module")
def plain_bf16(tiny_dir):
    return plain_copy(tiny_dir, BF16)


def test_bf16_bridge_logits_equal_plain_hf(bf16, plain_bf16):
    batch = bf16.encode(PROMPTS)
    with torch.no_grad():
        got = bf16.bridge(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert got.dtype == BF16
    torch.testing.assert_close(got[batch["attention_mask"].bool()], logits_at_real_tokens(plain_bf16, batch),
                               **tolerances(BF16))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bf16_capture_equals_single_prompt_hidden_states(bf16, plain_bf16, tiny, batch_size):
    acts = capture_last_token_resid(bf16, PROMPTS, batch_size=batch_size, progress=False)
    assert acts.dtype == torch.float32 and acts.shape == (len(PROMPTS), N_LAYERS, 64)
    for p, row in enumerate(bf16.token_rows(PROMPTS)):
        with torch.no_grad():
            hidden = plain_bf16(row[None], output_hidden_states=True).hidden_states
        expected = torch.stack([hidden[i + 1][0, -1] for i in range(N_LAYERS - 1)]).float()
        torch.testing.assert_close(acts[p, : N_LAYERS - 1], expected, **tolerances(BF16))
    # and bfloat16 stays near the float32 model (the same weights, rounded)
    full = capture_last_token_resid(tiny, PROMPTS, batch_size=batch_size, progress=False)
    assert relative_error(acts, full) < 2e-2


@pytest.mark.parametrize("layers,alpha,components", [
    (LayerRange(1, 2), 1.3, ALL_COMPONENTS),
    (LayerRange(0, 3), 0.8, ALL_COMPONENTS),
    ([0, 3], 1.5, ("q",)),
    (LayerRange(2, 3), 1.2, ("gate", "in")),
])
def test_bf16_scaling_hooks_equal_weight_scaling(bf16, plain_bf16, plain_f32, layers, alpha, components):
    layer_list = layers.layers if isinstance(layers, LayerRange) else layers
    ref = reference_scaled(plain_bf16, "llama", layer_list, alpha, components)
    batch = bf16.encode(PROMPTS)
    expected, unscaled = logits_at_real_tokens(ref, batch), logits_at_real_tokens(plain_bf16, batch)
    with scaled(bf16, layers, alpha, components):
        got = logits_at_real_tokens(bf16.hf_model, batch)
    assert (expected.float() - unscaled.float()).abs().max() > 0
    torch.testing.assert_close(got, expected, **tolerances(BF16))
    # against the float32 truth, the hooks in bfloat16 are as accurate as scaled bfloat16 weights
    truth = logits_at_real_tokens(reference_scaled(plain_f32, "llama", layer_list, alpha, components), batch)
    assert relative_error(got, truth) <= 2 * relative_error(expected, truth) + 1e-3


@pytest.mark.parametrize("layers,alpha", [(None, 1.0), (LayerRange(1, 3), 1.4)])
def test_bf16_ro_evaluator_matches_plain_generation(bf16, plain_bf16, layers, alpha):
    judge = ParityJudge()
    result = RoEvaluator(bf16, DO_PROMPTS, start=1, batch_size=2, judge=judge).evaluate(layers, alpha)
    with scaled(bf16, layers or [1], alpha):
        texts = generate(bf16, DO_PROMPTS, max_new_tokens=16, batch_size=2)
    assert result.texts == texts
    assert result.flags.tolist() == [judge.is_refusal(t) for t in texts]
    # against HF's greedy generation of the weight-scaled bfloat16 copy, one prompt at a time: a
    # near-tie between two tokens may break the other way in bfloat16, so the first tokens must agree
    ref = plain_bf16 if layers is None else reference_scaled(plain_bf16, "llama", layers.layers, alpha, ALL_COMPONENTS)
    reference = [bf16.tokenizer.decode(ids[:4], skip_special_tokens=True).strip()
                 for ids in greedy_reference(ref, bf16, DO_PROMPTS)]
    agree = sum(t.startswith(r) for r, t in zip(reference, texts))
    assert agree >= len(DO_PROMPTS) - 1, (reference, texts)


# --- a model split over two placements (CPU and disk) ------------------------------------------------

SPLIT = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
    "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk",
    "model.norm": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def split(tiny_dir):
    return load_model(str(tiny_dir), device_map=SPLIT)


@pytest.fixture(scope="module")
def plain_f32(tiny_dir):
    return plain_copy(tiny_dir)


def test_device_map_installs_accelerate_offload_hooks(split):
    from accelerate.hooks import AlignDevicesHook

    assert split.hf_model.hf_device_map == SPLIT
    assert split.device == torch.device("cpu")
    layers = split.hf_model.model.layers
    for i, place in ((0, "cpu"), (1, "disk"), (2, "cpu"), (3, "disk")):
        hooked = [m for m in layers[i].modules() if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook)
                  and m._hf_hook.offload]
        assert bool(hooked) == (place == "disk"), i
        weight = split.hf_parameters[f"model.layers.{i}.mlp.up_proj.weight"]
        assert weight.is_meta == (place == "disk")  # offloaded weights live on disk between forwards
    assert split.has_bridge


def test_device_map_bridge_logits_equal_plain_hf(split, plain_f32):
    batch = split.encode(PROMPTS)
    with torch.no_grad():
        got = split.bridge(batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got[batch["attention_mask"].bool()], logits_at_real_tokens(plain_f32, batch),
                               **tolerances(torch.float32))


def test_device_map_run_with_cache_and_capture(split, plain_f32):
    ids = split.encode(PROMPTS[:1])["input_ids"]
    _, cache = split.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(cache.keys()) == [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]
    acts = capture_last_token_resid(split, PROMPTS, batch_size=2, progress=False)
    for p, row in enumerate(split.token_rows(PROMPTS)):
        with torch.no_grad():
            hidden = plain_f32(row[None], output_hidden_states=True).hidden_states
        expected = torch.stack([hidden[i + 1][0, -1] for i in range(N_LAYERS - 1)])
        torch.testing.assert_close(acts[p, : N_LAYERS - 1], expected, **tolerances(torch.float32))
        if p == 0:
            torch.testing.assert_close(cache["blocks.1.hook_resid_post"][0, -1], hidden[2][0, -1],
                                       **tolerances(torch.float32))


@pytest.mark.parametrize("layers,alpha,components", [
    (LayerRange(0, 0), 1.3, ALL_COMPONENTS),   # on the CPU
    (LayerRange(1, 1), 1.3, ALL_COMPONENTS),   # offloaded
    (LayerRange(0, 3), 0.8, ("q", "gate", "in")),  # across both
])
def test_device_map_scaling_hooks_equal_weight_scaling(split, plain_f32, layers, alpha, components):
    ref = reference_scaled(plain_f32, "llama", layers.layers, alpha, components)
    batch = split.encode(PROMPTS)
    expected = logits_at_real_tokens(ref, batch)
    assert (expected - logits_at_real_tokens(plain_f32, batch)).abs().max() > 1e-3
    with scaled(split, layers, alpha, components):
        got = logits_at_real_tokens(split.hf_model, batch)
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))


def test_device_map_ro_evaluator(split, plain_f32):
    judge = ParityJudge()
    result = RoEvaluator(split, DO_PROMPTS, start=1, batch_size=2, judge=judge).evaluate(LayerRange(1, 2), 1.4)
    ref = reference_scaled(plain_f32, "llama", [1, 2], 1.4, ALL_COMPONENTS)
    texts = [split.tokenizer.decode(ids, skip_special_tokens=True).strip()
             for ids in greedy_reference(ref, split, DO_PROMPTS)]
    assert result.texts == texts


@pytest.mark.parametrize("layer", [0, 1])  # layer 0 on the CPU, layer 1 offloaded to disk
def test_device_map_scaling_a_projection_with_a_bias(qwen2_split, layer):
    """Qwen2's q/k/v biases: the hook needs the bias's values to scale only the weight."""
    model, plain = qwen2_split
    assert model.hf_parameters[f"model.layers.{layer}.self_attn.q_proj.bias"].is_meta == (layer == 1)
    batch = model.encode(PROMPTS)
    with scaled(model, [layer], 1.5):
        got = logits_at_real_tokens(model.hf_model, batch)
    expected = logits_at_real_tokens(reference_scaled(plain, "qwen2", [layer], 1.5, ALL_COMPONENTS), batch)
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))


@pytest.fixture(scope="module")
def qwen2_split(tmp_path_factory):
    folder = build_tiny_family("qwen2", tmp_path_factory.mktemp("tiny-qwen2-split"))
    split_map = {k: v for k, v in SPLIT.items() if k != "model.layers.3"}  # 3 layers
    return load_model(str(folder), device_map=split_map), plain_copy(folder)
