"""Gradient masks (finetune.masks) on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from finetune import masks as M
from interp.ranges import LayerRange, LayerRangeError


def _backward(model, seed: int = 0):
    """One forward/backward pass of the LM loss on fixed random tokens; returns grads by name."""
    model.hf_model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    model.hf_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in M.named_parameters(model).items()}
    model.hf_model.zero_grad(set_to_none=True)
    return grads


def _reference_layer_params(model, layers) -> set[int]:
    """Identities of the attention and MLP parameters of ``layers``, found through the modules
    (not by name), as an independent check of the name-based search."""
    found = set()
    for i in layers:
        layer = model.hf_model.model.layers[i]
        for module in (layer.self_attn, layer.mlp):
            found |= {id(p) for p in module.parameters()}
    return found


def test_freeze_layers_masks_exactly_the_range(tiny):
    handle = M.freeze_layers(tiny, LayerRange(1, 2))
    try:
        assert {id(p) for p in handle.frozen.values()} == _reference_layer_params(tiny, [1, 2])
        assert len(handle.frozen) == 2 * 7  # q, k, v, o, gate, up, down per layer
        assert not any("norm" in n for n in handle.names)
        grads = _backward(tiny)
        for name, grad in grads.items():
            if name in handle.frozen:
                assert torch.count_nonzero(grad) == 0, name
            else:
                assert torch.count_nonzero(grad) > 0, name
    finally:
        handle.remove()


def test_include_norms_adds_the_layer_norms(tiny):
    handle = M.freeze_layers(tiny, "1,1", include_norms=True)
    try:
        assert {n for n in handle.names if "norm" in n} == {
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
        }
    finally:
        handle.remove()


def test_remove_restores_the_gradients(tiny):
    clean = _backward(tiny)
    handle = M.freeze_layers(tiny, [0, 3])
    masked = _backward(tiny)
    assert all(torch.count_nonzero(masked[n]) == 0 for n in handle.frozen)
    handle.remove()
    assert not handle.active
    again = _backward(tiny)
    for name in clean:
        assert torch.equal(again[name], clean[name]), name


def test_element_mask_zeroes_exactly_the_masked_gradient(tiny):
    spec = M.head_mask(tiny, layer=2, heads=[1, 3])
    (q_name, q_mask), (o_name, o_mask) = spec.items()
    head_dim = 64 // 4
    # independent: heads 1 and 3 are rows 16..31 and 48..63 of q_proj, the same columns of o_proj
    rows = torch.zeros(64, dtype=torch.bool)
    rows[16:32] = rows[48:64] = True
    assert torch.equal(q_mask, rows[:, None].expand(64, 64))
    assert torch.equal(o_mask, rows[None, :].expand(64, 64))
    assert q_mask.sum() == 2 * head_dim * 64
    handle = M.freeze_elements(tiny, spec)
    try:
        grads = _backward(tiny)
        for name, mask in spec.items():
            assert torch.count_nonzero(grads[name][mask]) == 0
            assert torch.count_nonzero(grads[name][~mask]) == (~mask).sum()
    finally:
        handle.remove()


def test_restore_writes_back_only_masked_elements(tiny):
    name = "model.layers.0.mlp.up_proj.weight"
    spec = M.row_mask(tiny, name, rows=[0, 5, 7])
    param = M.named_parameters(tiny)[name]
    original = param.detach().clone()
    handle = M.freeze_elements(tiny, spec)
    try:
        with torch.no_grad():
            param.add_(1.0)
        handle.restore()
        assert torch.equal(param[spec[name]], original[spec[name]])
        assert torch.equal(param[~spec[name]], original[~spec[name]] + 1.0)
    finally:
        handle.remove()
        with torch.no_grad():
            param.copy_(original)


def test_adamw_needs_the_zero_decay_group_for_element_masks():
    """A zero gradient alone does not keep a weight still under AdamW with weight decay; in a
    zero-weight-decay group the masked elements get exactly zero update (the documented claim)."""
    torch.manual_seed(0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:3] = True
    results = {}
    for wd in (0.0, 0.1):
        weight = torch.nn.Parameter(torch.randn(8, 8))
        start = weight.detach().clone()
        weight.register_hook(lambda g: g * (~mask))
        opt = torch.optim.AdamW([weight], lr=1e-2, weight_decay=wd)
        for _ in range(5):
            opt.zero_grad()
            (weight ** 2).sum().backward()
            opt.step()
        results[wd] = (torch.equal(weight[mask], start[mask]), torch.equal(weight[~mask], start[~mask]))
    assert results[0.0] == (True, False)
    assert results[0.1] == (False, False)


def test_range_outside_the_model_is_refused(tiny):
    with pytest.raises(LayerRangeError):
        M.freeze_layers(tiny, "2,4")  # tiny has layers 0..3
    with pytest.raises(LayerRangeError):
        M.freeze_layers(tiny, [3, 9])
    with pytest.raises(LayerRangeError):
        M.resolve_range("nonsense", tiny)
    assert M.resolve_range((1, 3), tiny) == LayerRange(1, 3)


def test_bad_element_mask_is_refused(tiny):
    with pytest.raises(KeyError):
        M.freeze_elements(tiny, {"model.layers.9.mlp.up_proj.weight": torch.zeros(1, dtype=torch.bool)})
    with pytest.raises(ValueError):
        M.freeze_elements(tiny, {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3, dtype=torch.bool)})


def test_ablation_range_same_size_and_disjoint():
    assert M.ablation_range(LayerRange(8, 14), 32) == LayerRange(0, 6)
    assert M.ablation_range(LayerRange(6, 14), 32) == LayerRange(23, 31)  # [0,8] would overlap
    assert M.ablation_range(LayerRange(2, 5), 32, at="end") == LayerRange(28, 31)
    assert M.ablation_range(LayerRange(0, 5), 32) == LayerRange(26, 31)  # start overlaps: the end
    with pytest.raises(LayerRangeError):
        M.ablation_range(LayerRange(1, 2), 4)  # [0,1] and [2,3] both overlap


def test_names_are_the_plain_hf_names_and_the_tensors_the_forward_uses(tiny_dir, tiny):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    params = M.named_parameters(tiny)
    assert set(params) == {n for n, _ in plain.named_parameters()}
    ids = torch.tensor([[1, 450, 338, 1234]])
    weight = params["model.layers.2.mlp.down_proj.weight"]
    saved = weight.detach().clone()
    with torch.no_grad():
        before = tiny.bridge(ids)
        weight.add_(0.5)  # the bridge's forward sees the change
        after = tiny.bridge(ids)
        weight.copy_(saved)  # exactly as it was (x + 0.5 - 0.5 need not be x)
    assert (after - before).abs().max() > 1e-3


def test_neuron_and_head_masks_cover_the_right_slices(tiny):
    masks = M.neuron_mask(tiny, 1, [0, 5])
    gate, up, down = (masks[f"model.layers.1.mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    assert gate[[0, 5]].all() and gate.sum() == 2 * 64 and torch.equal(gate, up)
    assert down[:, [0, 5]].all() and down.sum() == 2 * 64
    heads = M.head_mask(tiny, 3, [1])
    q, o = heads["model.layers.3.self_attn.q_proj.weight"], heads["model.layers.3.self_attn.o_proj.weight"]
    assert q[16:32].all() and q.sum() == 16 * 64 and o[:, 16:32].all() and o.sum() == 64 * 16
    with pytest.raises(ValueError):
        M.neuron_mask(tiny, 1, [128])


def _located_json(path, model, start: int, end: int, n_layers: int | None = None):
    """A minimal valid located-range record (interp.export's schema) for ``model``."""
    from interp.export import SCHEMA_ID, SCHEMA_VERSION
    from interp.io import atomic_write_json
    from interp.provenance import versions, weights_fingerprint

    sweep = dict(alpha=1.2, offset=0, r_o=1.0, winner=True)
    record = {
        "schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "created": "2025-01-01T00:00:00+00:00",
        "model": {"spec": "test", "fingerprint": weights_fingerprint(model), "n_layers": n_layers or model.n_layers},
        "range": {"start": start, "end": end}, "alpha": 1.2, "direction": "max", "components": ["q"],
        "initial_range": {"start": start, "end": end}, "baseline_r_o": 0.0,
        "sweeps": [{"phase": "upper", "start": start, "end": end, **sweep},
                   {"phase": "lower", "start": start, "end": end, **sweep}],
        "metric": {"name": "R_o", "method": "generation", "dataset": "over_rejection", "dataset_hash": "x",
                   "n_prompts": 1, "template": "chat", "max_new_tokens": 16},
        "versions": versions(),
    }
    return atomic_write_json(path, record)


def test_range_from_located_json(tiny, tiny_bias_dir, tmp_path):
    from interp.models import load_model

    path = _located_json(tmp_path / "located.json", tiny, 1, 2)
    assert M.resolve_range(path, tiny) == LayerRange(1, 2)
    handle = M.freeze_layers(tiny, str(path))
    try:
        assert handle.layer_range == LayerRange(1, 2) and len(handle.frozen) == 14
    finally:
        handle.remove()
    other = load_model(str(tiny_bias_dir), device="cpu")  # same shape, other weights
    with pytest.raises(LayerRangeError, match="other weights"):
        M.freeze_layers(other, path)
    too_long = _located_json(tmp_path / "long.json", tiny, 5, 6, n_layers=8)
    with pytest.raises(LayerRangeError):
        M.freeze_layers(tiny, too_long)
    with pytest.raises(LayerRangeError):
        M.resolve_range(tmp_path / "missing.json", tiny)
