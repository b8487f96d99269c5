"""Training through Trainer with masks (finetune.train) on fresh copies of the tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from finetune import data as D
from finetune import masks as M
from finetune.train import TrainConfig, mask_range, train
from interp.models import load_model
from interp.ranges import LayerRange, LayerRangeError

PAIRS = [(f"What is {i} plus {i}?", f"Sure: {i} plus {i} makes {2 * i}, as you can check.") for i in range(16)]


@pytest.fixture
def fresh(tiny_dir):
    """A new LoadedModel per test: training changes the weights in place."""
    return load_model(str(tiny_dir), device="cpu")


def _config(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=4, lr=1e-3, weight_decay=0.01, warmup=0, progress=False, save_strategy="no")
    return TrainConfig(**{**base, **kw})


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in M.named_parameters(model).items()}


def _examples(model):
    return D.implicit_set(PAIRS, model.tokenizer)


def test_sppft_keeps_masked_weights_bit_identical(fresh, tmp_path):
    before = _snapshot(fresh)
    result = train(fresh, _examples(fresh), "sppft", layers="1,2", out_dir=tmp_path, config=_config())
    after = M.named_parameters(fresh)
    frozen = set(result.frozen)
    assert len(frozen) == 14 and all(fresh.arch.layer_of(n) in (1, 2) for n in frozen)
    assert result.steps == 4
    for name, old in before.items():
        if name in frozen:
            assert torch.equal(after[name], old), f"{name} moved although masked"
        else:
            assert not torch.equal(after[name], old), f"{name} did not move"
    # the hooks are gone and the weights are those the bridge computes with
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert all(not p._backward_hooks for p in after.values())
    torch.testing.assert_close(fresh.bridge(ids), fresh.hf_model(input_ids=ids).logits)


def test_a_model_without_gradients_is_trained_and_left_as_it_was(fresh, tmp_path):
    """A merged PEFT adapter leaves every parameter with requires_grad=False (the aligned
    embedded model arrives so); train() still trains the unmasked weights and restores the flags."""
    fresh.hf_model.requires_grad_(False)
    before = _snapshot(fresh)
    result = train(fresh, _examples(fresh), "sppft", layers="1,2", out_dir=tmp_path, config=_config())
    after = M.named_parameters(fresh)
    for name, old in before.items():
        assert torch.equal(after[name], old) == (name in result.frozen), name
    assert not any(p.requires_grad for p in after.values())


def test_full_and_ablation_modes(fresh, tmp_path):
    assert mask_range(fresh, "full", "2,3") is None
    assert mask_range(fresh, "ablation", "2,3") == LayerRange(0, 1)
    assert mask_range(fresh, "ablation", "2,3", ablation_layers="3,3") == LayerRange(3, 3)
    with pytest.raises(LayerRangeError):
        mask_range(fresh, "sppft", None)
    with pytest.raises(LayerRangeError):
        mask_range(fresh, "sppft", "3,5")
    with pytest.raises(ValueError, match="unknown mode"):
        mask_range(fresh, "partial")
    before = _snapshot(fresh)
    result = train(fresh, _examples(fresh), "ablation", layers="2,3", out_dir=tmp_path, config=_config())
    assert result.layer_range == [0, 1]
    after = M.named_parameters(fresh)
    for name in before:
        frozen = fresh.arch.layer_of(name) in (0, 1) and (".self_attn." in name or ".mlp." in name)
        assert torch.equal(after[name], before[name]) == frozen, name


def test_element_masks_through_the_trainer(fresh, tmp_path):
    spec = M.head_mask(fresh, layer=1, heads=[0, 2])
    spec.update(M.row_mask(fresh, "model.layers.3.mlp.down_proj.weight", rows=range(10)))
    before = _snapshot(fresh)
    train(fresh, _examples(fresh), "full", out_dir=tmp_path, element_masks=spec, config=_config(weight_decay=0.1))
    after = M.named_parameters(fresh)
    for name, mask in spec.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        changed = after[name][~mask] != before[name][~mask]
        assert changed.float().mean() > 0.9, name


def test_run_folder_and_checkpoint(fresh, tmp_path):
    record = D.describe(_examples(fresh), "implicit", "chat", 0)
    result = train(
        fresh, _examples(fresh), "sppft", layers="1,2", out_dir=tmp_path, record=record,
        config=_config(save_strategy="steps", save_steps=4),
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mode"] == "sppft" and config["layer_range"] == [1, 2]
    assert config["train"]["seed"] == 0 and config["train"]["weight_decay"] == 0.01
    assert config["data"]["kinds"] == {"implicit": 16}
    assert "torch" in config["versions"] and config["masks"]["frozen_parameters"] == result.frozen
    log = json.loads((tmp_path / "log.json").read_text())
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_loss"] == pytest.approx(result.train_loss)
    # the checkpoint is a plain HF folder holding the trained weights
    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    assert (ckpt / "model.safetensors").is_file()
    reloaded = load_model(str(ckpt), device="cpu")
    trained = M.named_parameters(fresh)
    for name, param in M.named_parameters(reloaded).items():
        assert torch.equal(param, trained[name]), name


def test_resume_from_checkpoint_continues(tiny_dir, tmp_path):
    config = _config(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=None)
    whole = load_model(str(tiny_dir), device="cpu")
    train(whole, _examples(whole), "sppft", layers="1,2", out_dir=tmp_path / "a", config=config)
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    counter = StepCounter()
    resumed = load_model(str(tiny_dir), device="cpu")
    result = train(
        resumed, _examples(resumed), "sppft", layers="1,2", out_dir=tmp_path / "b", config=config,
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "checkpoint-2"), callbacks=[counter],
    )
    assert counter.steps == [3, 4]  # only the missing steps ran
    assert result.steps == 4
    expected = M.named_parameters(whole)
    for name, param in M.named_parameters(resumed).items():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-6, msg=name)
    # and it did continue from step 2, not restart: the step-2 weights differ from the final ones
    halfway = load_model(str(tmp_path / "a" / "checkpoints" / "checkpoint-2"), device="cpu")
    assert not torch.equal(M.named_parameters(halfway)["model.norm.weight"], expected["model.norm.weight"])


def test_skip_frozen_grads_gives_the_same_training(tiny_dir, tmp_path):
    hooked = load_model(str(tiny_dir), device="cpu")
    skipped = load_model(str(tiny_dir), device="cpu")
    train(hooked, _examples(hooked), "sppft", layers="1,2", out_dir=tmp_path / "h", config=_config())
    train(skipped, _examples(skipped), "sppft", layers="1,2", out_dir=tmp_path / "s", config=_config(skip_frozen_grads=True))
    a, b = M.named_parameters(hooked), M.named_parameters(skipped)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert all(p.requires_grad for p in b.values())  # flags restored


def test_lora_leaves_the_frozen_layers_without_adapter(tiny_dir, tmp_path):
    fresh = load_model(str(tiny_dir), device="cpu", bridge=False)  # PEFT wraps the plain modules
    before = _snapshot(fresh)
    n_params = len(before)
    train(fresh, _examples(fresh), "sppft", layers="1,2", out_dir=tmp_path, config=_config(lora=True, lr=1e-2, weight_decay=0.0))
    after = M.named_parameters(fresh)
    assert len(after) == n_params  # the adapter is merged and gone; no duplicated weights
    for name in before:
        adapted = fresh.arch.layer_of(name) in (0, 3) and (".self_attn." in name or ".mlp." in name)
        assert torch.equal(after[name], before[name]) != adapted, name
    # a bridge booted afterwards wraps (and hooks) the merged projection, and computes with its weights
    seen = {}
    hooks = [(f"blocks.0.attn.q.hook_{k}", lambda t, hook, k=k: seen.__setitem__(k, t)) for k in ("in", "out")]
    with fresh.bridge.hooks(fwd_hooks=hooks):
        fresh.hf_model(input_ids=torch.tensor([[1, 2, 3]]))
    q_weight = after["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(seen["out"].flatten(-2), torch.nn.functional.linear(seen["in"], q_weight))


def test_lora_on_a_bridged_model_is_refused_clearly(fresh, tmp_path):
    with pytest.raises(ValueError, match="bridge=False"):
        train(fresh, _examples(fresh), "full", out_dir=tmp_path, config=_config(lora=True))


def test_empty_dataset_is_refused(fresh, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="empty"):
        train(fresh, Dataset.from_list([]), "full", out_dir=tmp_path, config=_config())


# ---------------------------------------------------------------- evaluation (finetune.evaluate)


def test_rouge_l_against_brute_force():
    from itertools import combinations

    from finetune.evaluate import lcs_length, rouge_l, rouge_tokens

    def brute_lcs(a, b):
        for k in range(min(len(a), len(b)), 0, -1):
            subs = {c for c in combinations(b, k)}
            if any(c in subs for c in combinations(a, k)):
                return k
        return 0

    a = rouge_tokens("The cat sat on the mat, quietly.")
    b = rouge_tokens("the CAT is on a mat")
    assert a == ["the", "cat", "sat", "on", "the", "mat", "quietly"]
    assert lcs_length(a, b) == brute_lcs(a, b) == 4  # the cat on mat
    assert rouge_l("The cat sat on the mat, quietly.", "the CAT is on a mat") == pytest.approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))
    assert rouge_l("same words", "Same, words!") == 1.0
    assert rouge_l("", "anything") == 0.0


def test_completion_loss_matches_the_model_loss(fresh):
    from finetune.evaluate import completion_loss

    pair = ("What is two plus two?", "Four, of course.")
    (example,) = D.normal_set([pair], fresh.tokenizer)
    row = D.tokenize_example(fresh.tokenizer, example)
    with torch.no_grad():
        expected = fresh.hf_model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert completion_loss(fresh, [pair]) == pytest.approx(float(expected), rel=1e-5)
    # batching with padding does not change it: the mean over both pairs' answer tokens
    other = ("Name a colour please, any colour at all.", "Blue.")
    rows = [D.tokenize_example(fresh.tokenizer, ex) for ex in D.normal_set([pair, other], fresh.tokenizer)]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            n = sum(1 for x in r["labels"][1:] if x != -100)
            loss = fresh.hf_model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
            total, count = total + float(loss) * n, count + n
    assert completion_loss(fresh, [pair, other], batch_size=2) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_an_fsdp_or_deepspeed_launch_is_refused(fresh, tmp_path, monkeypatch, variable):
    """Under accelerate's FSDP or DeepSpeed the hooks and the optimizer filter would not hold the
    frozen layers; train() refuses before touching the model and names the sharded path."""
    monkeypatch.setenv(variable, "true")
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="finetune.sharded"):
        train(fresh, _examples(fresh), "sppft", layers="1,2", out_dir=tmp_path, config=_config())
    assert all(torch.equal(p, before[n]) for n, p in M.named_parameters(fresh).items())
    assert not (tmp_path / "config.json").exists()
