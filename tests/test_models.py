"""The offline loader: real weights, the bridge's equivalence with plain HF, clear errors."""

from __future__ import annotations

import pytest
import torch

from interp import models, provenance
from interp.models import ModelLoadError, ModelNotFoundError, PromptTooLongError, load_hf, load_model
from interp.templates import ALPACA, TemplateError, format_prompt


def test_embedded_bridge_logits_equal_an_independent_hf_model(embedded_base):
    """The bridge's logits equal those of a second, bridge-free HF copy of the same weights."""
    plain, tok, _ = load_hf("embedded-base")
    plain.config._attn_implementation = "eager"
    plain.eval()
    ids = embedded_base.encode(["How do I bake bread?"])["input_ids"]
    with torch.no_grad():
        expected = plain(ids).logits
        got = embedded_base.bridge(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, expected)


def test_embedded_run_with_cache_has_one_resid_post_per_layer(embedded_base):
    ids = embedded_base.encode(["What is the capital of Canada?"])["input_ids"]
    _, cache = embedded_base.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert embedded_base.n_layers == 30
    assert sorted(cache.keys(), key=lambda k: int(k.split(".")[1])) == [
        f"blocks.{i}.hook_resid_post" for i in range(30)
    ]
    assert cache["blocks.29.hook_resid_post"].shape == (1, ids.shape[1], 576)


def test_bridge_shares_the_hf_parameters(tiny):
    assert tiny.bridge.original_model is tiny.hf_model
    assert tiny.n_layers == 4
    q = tiny.hf_model.model.layers[1].self_attn.q_proj.weight
    ids = tiny.encode(["hello there"])["input_ids"]
    with torch.no_grad():
        before = tiny.bridge(ids)
        q.mul_(2.0)
        after = tiny.bridge(ids)
        q.div_(2.0)
    assert not torch.allclose(before, after)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        load_model(str(tmp_path / "nowhere" / "model"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_is_a_clear_error_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="local HF cache"):
        load_model("no-such-org/no-such-model-xyz")


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match="could not read the GGUF file"):
        load_model(str(bad))
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_unknown_template_is_a_clear_error(tiny_dir):
    with pytest.raises(TemplateError, match="unknown prompt template 'vicuna'"):
        load_model(str(tiny_dir), template="vicuna")


def test_aligned_model_without_weights_says_how_to_make_them(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "PACKAGE_WEIGHTS", tmp_path / "pkg")
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="python -m finetune.align"):
        load_model("embedded")


def test_templates(tiny):
    chat = format_prompt(tiny.tokenizer, "Name a fruit.", "chat")
    assert chat.endswith("<|im_start|>assistant\n") and "Name a fruit." in chat
    assert format_prompt(tiny.tokenizer, "Name a fruit.", "alpaca") == ALPACA.format(instruction="Name a fruit.")
    assert tiny.format("Name a fruit.", "alpaca").endswith("### Response:\n")


def test_prompt_longer_than_the_context_is_refused(tiny):
    assert tiny.n_ctx == 256
    with pytest.raises(PromptTooLongError, match="over the model's context of 256"):
        tiny.encode(["short", "word " * 400])


def host_fingerprint(module) -> str:
    """The fingerprint computed independently on the host: every parameter of an unbridged module
    (tied ones under every name) copied as float64, summed and sampled there."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(dict(module.named_parameters(remove_duplicate=False)).items()):
        if name.rpartition(".")[2] == "bias" and not tensor.detach().any():
            continue
        flat = tensor.detach().double().flatten().cpu()
        step = max(1, flat.numel() // 257)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(f"{flat.sum().item():.6e}".encode())
        digest.update(flat[::step].numpy().round(6).tobytes())
    return digest.hexdigest()[:16]


def test_fingerprint_equals_the_host_float64_reference_bridged_or_not(tiny, tiny_dir, tiny_bias_dir):
    plain, _, _ = load_hf(str(tiny_dir))
    assert tiny.fingerprint() == host_fingerprint(plain) == provenance.weights_fingerprint(plain)
    unbridged = load_model(str(tiny_bias_dir), device="cpu", bridge=False)
    reference = host_fingerprint(unbridged.hf_model)
    assert unbridged.fingerprint() == reference
    unbridged.bridge  # noqa: B018 (boot it: the names the HF module reports change, the record does not)
    assert any("_original_component" in n for n, _ in unbridged.hf_model.named_parameters())
    assert unbridged.fingerprint() == reference
    with pytest.raises(ValueError, match="bridge"):
        provenance.weights_fingerprint(unbridged.hf_model)


def test_encode_leaves_the_tokenizer_as_it_was(tiny):
    side = tiny.tokenizer.padding_side
    left = tiny.encode(["a", "a longer prompt"], padding_side="left")
    right = tiny.encode(["a", "a longer prompt"], padding_side="right")
    assert tiny.tokenizer.padding_side == side
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0


def test_the_bridge_boots_only_when_asked(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu", bridge=False)
    assert not model.has_bridge
    assert not any("_original_component" in n for n, _ in model.hf_model.named_parameters())
    assert model.bridge.original_model is model.hf_model and model.has_bridge


def test_fingerprint_tracks_the_weights(tiny):
    before = tiny.fingerprint()
    weight = tiny.hf_parameters["model.layers.0.mlp.up_proj.weight"]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
        changed = tiny.fingerprint()
        weight.copy_(saved)  # exactly (x + 1 - 1 loses the low bits of a small x)
    assert tiny.fingerprint() == before
    assert changed != before


def test_kv_cached_generation_through_the_bridge_matches_uncached(embedded_base):
    """Guards the transformers pin: with transformers 5.24 the bridge's attention never saw the
    KV cache (the kwarg was renamed), so cached generation silently ignored the prompt
    ("The-----").  Real weights: the random tiny model emits one token forever, so cached and
    uncached would agree even with that bug."""
    model = embedded_base
    batch = model.encode(["What is the capital of France?", "Name a fruit."])
    kw = dict(max_new_tokens=8, do_sample=False, temperature=None, top_p=None, top_k=None,
              pad_token_id=model.tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.hf_model.generate(**batch, use_cache=True, **kw)
        uncached = model.hf_model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    first = model.tokenizer.decode(cached[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in first


def test_aligned_weights_and_fingerprint_do_not_depend_on_the_thread_count():
    """The adapter merge and the fingerprint's sums ran multi-threaded once, and a 1-thread
    process got a different fingerprint from a 2-thread one for the same model: every located
    range was then refused by the other."""
    from interp.provenance import weights_fingerprint

    threads = torch.get_num_threads()
    loaded = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model, _, _ = load_hf("embedded")
            loaded[n] = (dict(model.named_parameters()), weights_fingerprint(model))
    finally:
        torch.set_num_threads(threads)
    (one, fp_one), (two, fp_two) = loaded[1], loaded[2]
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert fp_one == fp_two
