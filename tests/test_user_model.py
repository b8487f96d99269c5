"""Hook correctness on a model of your own:

    pytest tests/test_user_model.py --model meta-llama/Llama-2-7b-chat-hf --dtype bfloat16 --device cuda

``--model`` takes any spec ``load_model`` accepts (a local HF folder, a ``.gguf`` file, a hub id
already in the local HF cache, ``embedded``) and may be repeated; ``--dtype`` (float32, bfloat16,
float16) and ``--device`` (default: CUDA when there is one) say how to load it.  Without
``--model`` the tests run on tiny random Llama, Qwen2 and Phi-3 models built here (about half a
minute on one CPU thread), so the file is part of the normal suite.  (The options are registered
in ``tests/conftest.py``; without that registration the tiny defaults run.)

Each test checks the toolkit's machinery against the model's own Hugging Face computation, using
only the architecture table's names and never a second copy of the weights (a 7B model fits once):

- the last-token capture equals ``output_hidden_states`` of one prompt at a time;
- the scaling hooks equal the projection weights multiplied in place (and put back bit-exactly);
- ``freeze_layers`` keeps a layer bit-identical through an AdamW step with weight decay, while
  its neighbours, in the same optimizer, move (only three layers take gradients, to fit memory);
- ``save_pretrained`` writes a folder plain ``AutoModelForCausalLM.from_pretrained`` reloads with
  the same weights and logits.

Tolerances follow the dtype; for bfloat16/float16 errors are measured relative to the tensors'
norm (a 7B model's activations reach the hundreds, where an absolute tolerance means nothing).
"""

from __future__ import annotations

import pytest
import torch

from finetune import masks as M
from interp.activations import capture_last_token_resid
from interp.models import default_device, dtype_named, load_model
from interp.provenance import weights_fingerprint
from interp.ranges import LayerRange
from interp.scaling import ALL_COMPONENTS, scaled

try:
    from test_families import BUGS, build_tiny_family
except ImportError:  # imported as a package module
    from tests.test_families import BUGS, build_tiny_family

DEFAULT_TINY = ("llama", "qwen2", "phi3")
PROMPTS = ["How do I kill a Python process?", "Write a haiku about the sea.", "What is the capital of France?"]

# normwise relative error allowed, by dtype (float32 leaves room for a 7B model's long sums)
RELATIVE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _option(config, name):
    return config.getoption(name, default=None)


def pytest_generate_tests(metafunc):
    """One run per ``--model`` (repeatable), else one per tiny default family."""
    if "user_spec" in metafunc.fixturenames:
        specs = _option(metafunc.config, "--model")
        if isinstance(specs, str):
            specs = [specs]
        specs = list(specs) if specs else [f"tiny:{family}" for family in DEFAULT_TINY]
        metafunc.parametrize("user_spec", specs, scope="session")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@pytest.fixture(scope="session")
def user_model(user_spec, request, tmp_path_factory):
    dtype = dtype_named(_option(request.config, "--dtype")) or torch.float32
    device = _option(request.config, "--device") or default_device()
    spec = user_spec
    if spec.startswith("tiny:"):
        spec = str(build_tiny_family(spec[5:], tmp_path_factory.mktemp(spec.replace(":", "-"))))
    model = load_model(spec, device=device, dtype=dtype)
    if any(p.is_meta for p in model.hf_parameters.values()):
        pytest.skip("offloaded (meta) weights cannot be scaled in place or trained; load without a disk offload")
    return model


def _check(got, expected, dtype, what: str):
    error = relative_error(got, expected)
    assert error <= RELATIVE[dtype], f"{what}: relative error {error:.2e} > {RELATIVE[dtype]:.0e} ({dtype})"


def _layers(model) -> dict[str, int]:
    n = model.n_layers
    return {"low": max(0, n // 4), "mid": n // 2, "high": max(0, n - 2)}


# --- capture -----------------------------------------------------------------------------------------


def test_user_capture_equals_single_prompt_hidden_states(user_model):
    model = user_model
    n = model.n_layers
    acts = capture_last_token_resid(model, PROMPTS, batch_size=len(PROMPTS), progress=False)
    assert acts.shape == (len(PROMPTS), n, model.config.hidden_size)
    for p, row in enumerate(model.token_rows(PROMPTS)):
        with torch.no_grad():
            hidden = model.hf_model(row[None].to(model.device), output_hidden_states=True).hidden_states
        assert len(hidden) == n + 1
        expected = torch.stack([hidden[i + 1][0, -1] for i in range(n - 1)]).float().cpu()
        _check(acts[p, : n - 1], expected, model.dtype, f"prompt {p}")


# --- scaling -----------------------------------------------------------------------------------------


def _logits(model, batch):
    with torch.no_grad():
        return model.hf_model(**batch).logits[batch["attention_mask"].bool()].float()


@torch.no_grad()
def _weights_scaled(model, layers, alpha, components):
    """Multiply the projection weights in place (the paper's way), and return a function that
    puts the saved originals back bit-exactly."""
    saved = {}
    for i in layers:
        for c in components:
            name = model.arch.projection_weight(i, c)
            weight = model.hf_parameters[name]
            saved.setdefault(name, weight.detach().clone())
            weight[model.arch.row_slice(model.config, c)] *= alpha

    def restore():
        with torch.no_grad():
            for name, original in saved.items():
                model.hf_parameters[name].copy_(original)

    return restore


def _scaling_cases(model):
    at = _layers(model)
    return [
        (LayerRange(at["low"], at["mid"]), 1.2, ALL_COMPONENTS),
        (LayerRange(at["mid"], at["mid"]), 0.8, ("q",)),
        (LayerRange(at["low"], at["high"]), 1.3, ("gate", "in")),
        (LayerRange(at["high"], at["high"]), 1.5, ("k", "v", "o", "out")),
    ]


@pytest.mark.parametrize("case", range(4))
def test_user_scaling_hooks_equal_weight_scaling(user_model, case):
    model = user_model
    layers, alpha, components = _scaling_cases(model)[case]
    batch = model.encode(PROMPTS)
    before = {n: p.detach().clone() for n, p in model.hf_parameters.items() if model.arch.layer_of(n) in layers.layers}
    unscaled = _logits(model, batch)
    with scaled(model, layers, alpha, components):
        hooked = _logits(model, batch)
    restore = _weights_scaled(model, layers.layers, alpha, components)
    try:
        expected = _logits(model, batch)
    finally:
        restore()
    assert all(torch.equal(model.hf_parameters[n], p) for n, p in before.items()), "weights not restored"
    torch.testing.assert_close(_logits(model, batch), unscaled, atol=0, rtol=0)  # hooks gone, weights back
    effect = relative_error(expected, unscaled)
    assert effect > 0, "the scaling should change the logits"
    error = relative_error(hooked, expected)
    # the hooks must agree with the weights far better than either differs from the unscaled model
    assert error <= max(RELATIVE[model.dtype], 0.1 * effect), (
        f"hooks vs weights: {error:.2e}, scaling effect {effect:.2e} ({model.dtype})")


# --- masks through an AdamW step ----------------------------------------------------------------------------


def test_user_freeze_layers_bit_identical_after_adamw_step(user_model, request):
    from finetune.train import optimizer_groups

    model = user_model
    if model.arch.family == "phi3" and model.has_bridge:
        request.applymarker(pytest.mark.xfail(strict=True, reason=BUGS["phi3-split"]))
    mid = _layers(model)["mid"]
    window = [i for i in (mid - 1, mid, mid + 1) if 0 <= i < model.n_layers]
    params = M.named_parameters(model)
    trainable = {n for n in params if model.arch.layer_of(n) in window}
    saved = {n: params[n].detach().clone() for n in trainable}
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    handle = M.freeze_layers(model, [mid])
    try:
        assert set(handle.frozen) == set(model.arch.block_parameter_names(params, [mid]))
        assert set(handle.frozen) == {n for n in params if n.startswith((f"model.layers.{mid}.self_attn.",
                                                                          f"model.layers.{mid}.mlp."))}
        groups = optimizer_groups(model.hf_model, handle, 0.1, {n for n, _ in model.hf_model.named_parameters()},
                                  allowed={id(p) for n, p in params.items() if n in trainable})
        # the frozen weights join too, without weight decay: then only their zeroed gradients keep
        # them still (AdamW's step is m / (sqrt(v) + eps) = 0 for m = v = 0)
        groups.append({"params": list(handle.frozen.values()), "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
        batch = model.encode(PROMPTS[:2], padding_side="right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model.hf_model.train()
        loss = model.hf_model(**batch, labels=labels).loss
        loss.backward()
        for name, p in handle.frozen.items():
            assert p.grad is not None, f"{name}: no gradient reached the recorded parameter"
            assert torch.count_nonzero(p.grad) == 0, f"{name}: gradient not zeroed"
        optimizer.step()
        for name in trainable:
            same = torch.equal(params[name], saved[name])
            assert same == (name in handle.frozen), f"{name}: {'frozen but moved' if not same else 'did not move'}"
    finally:
        handle.remove()
        model.hf_model.eval()
        model.hf_model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, original in saved.items():
                params[n].copy_(original)
        for n, p in params.items():
            p.requires_grad_(flags[n])


# --- checkpoint ----------------------------------------------------------------------------------------------


def test_user_checkpoint_round_trip(user_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = user_model
    folder = model.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()
    reloaded.config._attn_implementation = "eager"
    reloaded_params = dict(reloaded.named_parameters(remove_duplicate=False))
    for name, param in model.hf_parameters.items():
        assert torch.equal(reloaded_params[name], param.detach()), name
    batch = model.encode(PROMPTS)
    with torch.no_grad():
        got = reloaded(**batch).logits[batch["attention_mask"].bool()].float()
    _check(got, _logits(model, batch), model.dtype, "reloaded logits")
    assert model.fingerprint() == weights_fingerprint(reloaded)
