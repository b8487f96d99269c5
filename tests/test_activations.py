"""Last-token residual capture: batched equals one prompt at a time, equals Hugging Face's
hidden states, and the saved file round-trips and refuses another model or prompt list."""

from __future__ import annotations

import pytest
import torch

from interp import activations
from interp.activations import (
    ActivationFileError,
    activation_metadata,
    apply_final_norm,
    cached_capture,
    capture_last_token_resid,
    load_activations,
    save_activations,
)
from interp.forward import common_prefix_length
from interp.models import load_model

QUERIES = [
    "Hi",
    "How do I bake a very large chocolate cake quickly and well for twenty guests?",
    "Name a colour.",
    "Tell me a story about a dragon who learns to fly.",
    "What is 2+2?",
]


def one_at_a_time(model, queries, template=None):
    """Reference: each prompt alone through the HF forward (no padding, no hooks, no prefix
    sharing), the output of every decoder layer but the last at the last position."""
    rows = []
    for query in queries:
        batch = model.encode([query], template=template)
        with torch.no_grad():
            out = model.hf_model(**batch, output_hidden_states=True)
        # hidden_states[0] is the embedding; [-1] has the final norm applied (tested separately)
        hidden = [h[0, -1] for h in out.hidden_states[1:-1]]
        rows.append(torch.stack(hidden))
    return torch.stack(rows)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_batched_capture_equals_one_prompt_at_a_time(tiny, padding_side, share_prefix):
    lengths = tiny.encode(QUERIES)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(QUERIES)  # every batch really is padded
    single = torch.cat([capture_last_token_resid(tiny, [q], progress=False, share_prefix=False) for q in QUERIES])
    batched = capture_last_token_resid(
        tiny, QUERIES, batch_size=3, padding_side=padding_side, share_prefix=share_prefix, progress=False
    )
    assert batched.shape == (len(QUERIES), tiny.n_layers, 64)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_capture_equals_hf_hidden_states_and_the_final_norm_is_documented(tiny):
    captured = capture_last_token_resid(tiny, QUERIES, batch_size=2, progress=False)
    reference = one_at_a_time(tiny, QUERIES)  # layers 0 .. L-2
    torch.testing.assert_close(captured[:, :-1], reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        final = torch.stack([
            tiny.hf_model(**tiny.encode([q]), output_hidden_states=True).hidden_states[-1][0, -1] for q in QUERIES
        ])
    assert not torch.allclose(captured[:, -1], final, atol=1e-3)  # resid_post has no final norm
    torch.testing.assert_close(apply_final_norm(tiny, captured)[:, -1], final, atol=1e-5, rtol=0)


def test_alpaca_template_and_a_subset_of_layers(tiny):
    everything = capture_last_token_resid(tiny, QUERIES, template="alpaca", progress=False)
    reference = one_at_a_time(tiny, QUERIES, template="alpaca")
    torch.testing.assert_close(everything[:, :-1], reference, atol=1e-5, rtol=0)
    subset = capture_last_token_resid(tiny, QUERIES, template="alpaca", layers=[2, 0], progress=False)
    torch.testing.assert_close(subset, everything[:, [0, 2]], atol=1e-5, rtol=0)  # ascending layers


def test_common_prefix_keeps_each_row_its_last_token():
    rows = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 9, 9]), torch.tensor([1, 2, 3])]
    assert common_prefix_length(rows) == 2
    assert common_prefix_length([torch.tensor([5, 6, 7])]) == 2
    assert common_prefix_length([torch.tensor([1, 2]), torch.tensor([3, 2])]) == 0


def test_bad_capture_requests_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="no queries"):
        capture_last_token_resid(tiny, [], progress=False)
    with pytest.raises(IndexError, match=r"outside this model's layers 0\.\.3"):
        capture_last_token_resid(tiny, QUERIES, layers=[4], progress=False)
    with pytest.raises(ValueError, match="padding_side"):
        capture_last_token_resid(tiny, QUERIES, padding_side="middle", progress=False)


def test_save_load_round_trip_and_refusals(tiny, tiny_bias_dir, tmp_path):
    acts = capture_last_token_resid(tiny, QUERIES, progress=False)
    meta = activation_metadata(tiny, QUERIES)
    path = save_activations(tmp_path / "acts.safetensors", acts, meta)
    assert torch.equal(load_activations(path, meta), acts)

    with pytest.raises(ActivationFileError, match="prompts_hash"):
        load_activations(path, activation_metadata(tiny, QUERIES[::-1]))
    with pytest.raises(ActivationFileError, match="template"):
        load_activations(path, activation_metadata(tiny, QUERIES, template="alpaca"))
    other = load_model(str(tiny_bias_dir), device="cpu")
    with pytest.raises(ActivationFileError, match="model_fingerprint"):
        load_activations(path, activation_metadata(other, QUERIES))
    with pytest.raises(ActivationFileError, match="layers"):
        load_activations(path, activation_metadata(tiny, QUERIES, layers=[0, 1]))

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ActivationFileError, match="not a readable safetensors"):
        load_activations(bad)
    with pytest.raises(ActivationFileError, match="no activation file"):
        load_activations(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="metadata says"):
        save_activations(tmp_path / "x.safetensors", acts[:2], meta)


def test_cached_capture_reuses_a_matching_file_and_refuses_another(tiny, tmp_path, monkeypatch):
    path = tmp_path / "cache.safetensors"
    first = cached_capture(tiny, QUERIES, path, progress=False)
    assert path.is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a matching file should be loaded, not recomputed")

    monkeypatch.setattr(activations, "capture_last_token_resid", must_not_run)
    assert torch.equal(cached_capture(tiny, QUERIES, path), first)
    with pytest.raises(ActivationFileError, match="another model, template or prompt list"):
        cached_capture(tiny, QUERIES[:3], path)
