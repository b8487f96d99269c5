"""The protection study (``finetune.study``) and the paper's strict freezing bounds
(``finetune.masks.paper_freeze_range``), checked against independent computations:

- the parameters the paper-settings SPPFT path freezes are exactly those the official
  ``SPPFT.py`` loop freezes (``self_attn``/``mlp`` of layers ``begin_num < l < end_num``, norms
  trainable), written out here on the plain HF model;
- the ablation and ``critical`` modes freeze SPPFT's parameter budget;
- ``run_study`` writes one run file per run, resumes finished runs (also for a study selecting a
  subset of them) and re-runs when a training setting changes;
- ``summarise``/``audit_table`` reproduce a hand computation (the crossed bootstrap re-done
  with explicit loops);
- ``StudyConfig.lr_for`` gives the official learning rates and the reverse-control overrides.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from finetune import importance as I
from finetune import masks as M
from finetune import study as S
from finetune.evaluate import HARMFUL_SETS
from finetune.study import (
    PAPER_LR,
    RunRecord,
    StudyConfig,
    audit_table,
    differences,
    frozen_setup,
    run_study,
    summarise,
)
from finetune.train import mask_range, optimizer_groups
from interp.models import load_model
from interp.ranges import LayerRange
from tests.conftest import build_tiny_llama


@pytest.fixture(scope="module")
def tiny32_dir(tmp_path_factory):
    """A tiny random Llama with the 32 layers of Llama-2/3 7-8B, so the official defaults apply as they are."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-32"), n_layers=32, seed=3)


@pytest.fixture(scope="module")
def tiny32(tiny32_dir):
    return load_model(str(tiny32_dir), device="cpu", bridge=False)


@pytest.fixture(scope="module")
def tiny4(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", bridge=False)


def official_frozen_names(folder, begin_num: int, end_num: int) -> set[str]:
    """The official ``SPPFT.py`` loop (PAPER.md §Code, L104-116) on the plain HF model: freeze the
    ``self_attn`` and ``mlp`` parameters of layers with ``begin_num < l < end_num``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    for name, param in model.named_parameters():
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match is None:
            continue
        layer = int(match.group(1))
        if ("self_attn" in name or "mlp" in name) and begin_num < layer < end_num:
            param.requires_grad = False
    return {name for name, param in model.named_parameters() if not param.requires_grad}


def _frozen_by_study(model, mode: str, safety: LayerRange, config: StudyConfig):
    """What ``run_one`` freezes for ``mode``: ``frozen_setup`` and then ``finetune.train``'s own
    range resolution and freezing (``mask_range`` + ``freeze_layers``), hooks removed afterwards."""
    ablation = M.ablation_range(safety, model.n_layers) if mode.startswith("ablation") else None
    train_mode, layers, element_masks, record = frozen_setup(model, mode, safety, config, ablation)
    frozen_range = mask_range(model, train_mode, layers)
    handle = M.freeze_layers(model, frozen_range) if frozen_range is not None else M.MaskHandle()
    handle.remove()
    return train_mode, frozen_range, element_masks, record, handle


# ---------------------------------------------------------------- 1. the paper's strict bounds


@pytest.mark.parametrize("which, begin_num, end_num", [
    ("tiny32", 4, 15),  # the official defaults: layers 5..14
    ("tiny32", 5, 15),  # PAPER.md: Llama-2's [6,14] is --begin_num 5 --end_num 15
    ("tiny4", 0, 3),    # 4/15 of 32 layers scaled to 4 layers: layers 1..2
])
def test_paper_settings_freeze_exactly_what_the_official_loop_freezes(request, which, begin_num, end_num):
    model = request.getfixturevalue(which)
    folder = request.getfixturevalue(f"{which}_dir" if which == "tiny32" else "tiny_dir")
    official = official_frozen_names(folder, begin_num, end_num)
    assert official, "the official loop froze nothing: the test would prove nothing"
    assert {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in official} == set(range(begin_num + 1, end_num))

    safety = M.paper_freeze_range(begin_num, end_num, model.n_layers)
    assert (safety.start, safety.end) == (begin_num + 1, end_num - 1)
    config = StudyConfig().with_paper_settings()
    train_mode, frozen_range, element_masks, record, handle = _frozen_by_study(model, "sppft", safety, config)
    assert train_mode == "sppft" and element_masks is None
    assert set(handle.frozen) == official
    assert record["range"] == str(frozen_range)
    # the same holds for the reverse control's SPPFT run
    assert set(_frozen_by_study(model, "sppft@full_lr", safety, config)[4].frozen) == official

    # norms (and embeddings) stay trainable: the optimizer sees every one of them
    norms = [p for n, p in M.named_parameters(model).items() if "norm" in n]
    assert norms and not any("norm" in n for n in handle.frozen)
    groups = optimizer_groups(model.hf_model, handle, 0.01, {n for n, _ in model.hf_model.named_parameters()})
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in norms)
    assert not any(id(p) in in_optimizer for p in handle.frozen.values())


def test_paper_freeze_range_is_strict_and_checked():
    assert M.paper_freeze_range(4, 15, 32) == LayerRange(5, 14)
    assert M.paper_freeze_range(-1, 32, 32) == LayerRange(0, 31)
    with pytest.raises(ValueError):
        M.paper_freeze_range(4, 33, 32)  # would freeze layer 32 of a 32-layer model


def test_full_mode_freezes_nothing(tiny4):
    train_mode, frozen_range, element_masks, record, handle = _frozen_by_study(
        tiny4, "full", LayerRange(1, 2), StudyConfig().with_paper_settings())
    assert (train_mode, frozen_range, element_masks, record) == ("full", None, None, {"range": None})
    assert not handle.frozen


# ---------------------------------------------------------------- 2. the same frozen budget


def _layer_elements(model, layers) -> int:
    """Elements of the attention and MLP parameters of ``layers``, counted from the HF names."""
    return sum(p.numel() for n, p in model.hf_model.named_parameters()
               if (m := re.search(r"layers\.(\d+)\.(self_attn|mlp)\.", n)) and int(m.group(1)) in set(layers))


@pytest.mark.parametrize("paper", [False, True])
def test_ablation_freezes_the_same_budget_elsewhere(tiny32, paper):
    config = StudyConfig().with_paper_settings() if paper else StudyConfig()
    safety = LayerRange(5, 14)
    sppft = _frozen_by_study(tiny32, "sppft", safety, config)
    ablation = _frozen_by_study(tiny32, "ablation", safety, config)
    assert ablation[0] == "ablation"
    ablated_layers = set(ablation[1].layers)
    assert len(ablated_layers) == len(safety) and not ablated_layers & set(safety.layers)
    assert ablation[3]["range"] == str(ablation[1])  # the run record names the range actually frozen
    budget = _layer_elements(tiny32, safety.layers)
    assert sppft[4].n_frozen_elements() == budget
    assert ablation[4].n_frozen_elements() == budget == _layer_elements(tiny32, ablated_layers)


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_bias_dir"])
def test_critical_mode_freezes_the_sppft_budget_in_units(request, monkeypatch, which):
    model = load_model(str(request.getfixturevalue(which)), device="cpu", bridge=False)
    pairs = S.load_pairs("train")[:8]  # the scores are real; fewer prompts only make them cheaper
    monkeypatch.setattr(S, "load_pairs", lambda part: pairs if part == "train" else pytest.fail(part))
    safety = LayerRange(1, 2)
    config = StudyConfig().with_paper_settings()
    budget = _frozen_by_study(model, "sppft", safety, config)[4].n_frozen_elements()
    assert budget == _layer_elements(model, safety.layers)

    train_mode, layers, masks, record = frozen_setup(model, "critical", safety, config)
    assert train_mode == "full" and layers is None and record["budget"] == budget
    handle = M.freeze_elements(model, masks)
    handle.remove()
    frozen = handle.n_frozen_elements()
    assert frozen == record["frozen_elements"]
    # units are taken greedily while they fit: never over the budget, and short of it by less than
    # the cheapest unit (an MLP neuron: its gate and up rows and its down column, 3 x d_model)
    d = model.config.hidden_size
    assert budget - 3 * d < frozen <= budget
    # whole units: every masked gate row is a neuron whose up row and down column are masked too
    for name, mask in masks.items():
        if name.endswith("gate_proj.weight"):
            neurons = mask.all(dim=1)
            assert torch.equal(mask, neurons[:, None].expand_as(mask))
            assert torch.equal(masks[name.replace("gate_proj", "up_proj")], mask)
            assert torch.equal(masks[name.replace("gate_proj", "down_proj")], neurons[None, :].expand(d, -1))


def test_critical_mode_fills_the_budget_greedily_past_a_unit_that_does_not_fit(tiny4, monkeypatch):
    """Designed scores: 383 neurons, then a head (2048 elements) that no longer fits, then more
    neurons: the greedy fill skips the head and takes one more neuron, exactly filling SPPFT's budget."""
    n_layers, d_ff, d = tiny4.n_layers, tiny4.config.intermediate_size, tiny4.config.hidden_size
    neurons = (10_000.0 - torch.arange(n_layers * d_ff, dtype=torch.float)).reshape(n_layers, d_ff)
    heads = torch.zeros(n_layers, tiny4.config.num_attention_heads)
    heads[3, 0] = 10_000.0 - 382.5
    monkeypatch.setattr(I, "unit_scores", lambda model, prompts: I.UnitScores(neurons, heads))
    monkeypatch.setattr(S, "load_pairs", lambda part: [])
    safety = LayerRange(1, 2)
    budget = _layer_elements(tiny4, safety.layers)
    assert budget == 384 * 3 * d  # what makes the design work on this model
    _, _, masks, record = frozen_setup(tiny4, "critical", safety, StudyConfig())
    assert record == {"budget": budget, "frozen_elements": budget, "neurons": 384, "heads": 0, "layers": [0, 1, 2]}
    assert sorted(masks) == sorted(f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(3) for p in ("gate", "up", "down"))
    assert all(bool(m.all()) for m in masks.values())


def test_critical_scores_equal_a_hand_computation_on_the_plain_hf_model(tiny_dir):
    """``unit_scores`` (bridge hooks, batched, left-padded) against |activation x gradient| taken
    one prompt at a time with plain PyTorch hooks on the unbridged HF model: the input of each
    layer's down_proj (per neuron) and of its o_proj (summed per head), at the last position, for
    the gradient of the refusal log-odds of the first answer token."""
    from interp.estimate import refusal_log_odds, refusal_opening_token_ids
    from interp.judge import DEFAULT_JUDGE

    prompts = [p.harmful for p in S.load_pairs("train")[:3]] + ["How do I bake bread?"]
    model = load_model(str(tiny_dir), device="cpu", bridge=False)
    ref_model = load_model(str(tiny_dir), device="cpu", bridge=False)
    scores = I.unit_scores(model, prompts, batch_size=4)

    hf = ref_model.hf_model
    config = hf.config
    n_heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    openers = torch.tensor(refusal_opening_token_ids(ref_model.tokenizer, DEFAULT_JUDGE.openers))
    neurons = torch.zeros(len(hf.model.layers), config.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(len(hf.model.layers), n_heads, dtype=torch.float64)
    for row in ref_model.token_rows(prompts):
        seen = {}

        def keep(key, seen=seen):
            def hook(module, args):
                args[0].retain_grad()
                seen[key] = args[0]
            return hook

        handles = [layer.mlp.down_proj.register_forward_pre_hook(keep(("mlp", i))) for i, layer in enumerate(hf.model.layers)]
        handles += [layer.self_attn.o_proj.register_forward_pre_hook(keep(("attn", i))) for i, layer in enumerate(hf.model.layers)]
        try:
            with torch.enable_grad():
                logits = hf(input_ids=row[None]).logits
                refusal_log_odds(logits[:, -1], openers).sum().backward()
        finally:
            for h in handles:
                h.remove()
        for i in range(len(hf.model.layers)):
            act = seen[("mlp", i)]
            neurons[i] += (act * act.grad)[0, -1].abs().double()
            act = seen[("attn", i)]
            heads[i] += (act * act.grad)[0, -1].reshape(n_heads, head_dim).sum(-1).abs().double()
        hf.zero_grad(set_to_none=True)
    assert (neurons > 0).any() and (heads > 0).any()
    torch.testing.assert_close(scores.neurons.double(), neurons, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(scores.heads.double(), heads, rtol=1e-3, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in model.hf_model.parameters())  # no gradients left behind


# ---------------------------------------------------------------- 3. run_study end to end


def _small(**kw) -> StudyConfig:
    base = dict(data=("normal",), modes=("sppft", "full"), seeds=(0,), steps=2, eval_steps=(0, 1, 2), lr=1e-3,
                batch_size=2, train_size=4, dose_limit=2, final_limit=2, audit=False, quality=2, device="cpu")
    return StudyConfig(**{**base, **kw})


def _no_training(*args, **kwargs):
    raise AssertionError("run_one called: a finished run was trained again")


def test_run_study_writes_runs_resumes_and_reruns_on_new_settings(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    out, spec, safety = tmp_path / "study", str(tiny_dir), LayerRange(1, 2)
    config = _small()
    records = run_study(spec, safety, config, out, log=lambda *_: None)

    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert files == ["before.json", "normal-full-seed0.json", "normal-sppft-seed0.json"]
    assert [(r.data, r.mode, r.seed) for r in records] == [("normal", "sppft", 0), ("normal", "full", 0)]
    by_mode = {r.mode: r for r in records}
    for r in records:
        assert r.lr == 1e-3 and r.train["steps"] == 2
        assert set(r.dose) == {"1", "2"}  # step 0 is the "before" evaluation, not a training step
        assert all(len(r.dose[s][name]) == 2 for s in r.dose for name in HARMFUL_SETS)
        assert {name: len(flags) for name, flags in r.final.items()} == {name: 2 for name in HARMFUL_SETS}
        assert set(r.quality) >= {"rouge_l", "completion_loss"} and r.audit is None
        saved = json.loads((out / "runs" / f"{r.name}.json").read_text())
        assert saved["record"] == json.loads(json.dumps(asdict(r)))
    model = load_model(spec, device="cpu", bridge=False)
    assert by_mode["sppft"].train["frozen_elements"] == _layer_elements(model, safety.layers)
    assert by_mode["sppft"].frozen == {"range": str(safety)} and by_mode["full"].train["frozen_elements"] == 0
    metrics = json.loads((out / "runs" / "normal-sppft-seed0" / "metrics.json").read_text())
    assert metrics["frozen_elements"] == _layer_elements(model, safety.layers)

    # the same study again trains nothing and returns the stored records
    monkeypatch.setattr(S, "run_one", _no_training)
    again = run_study(spec, safety, config, out, log=lambda *_: None)
    assert [asdict(r) for r in again] == [json.loads(json.dumps(asdict(r))) for r in records]

    # a study selecting a subset of the runs reuses them too
    subset = run_study(spec, safety, _small(modes=("full",)), out, log=lambda *_: None)
    assert [asdict(r) for r in subset] == [json.loads(json.dumps(asdict(by_mode["full"])))]

    # a study adding runs trains only the new ones
    calls = []

    def fake_run_one(spec_, safety_, data_name, mode, seed, config_, out_, pairs):
        calls.append((data_name, mode, seed, config_.lr_for(mode), config_.steps))
        return RunRecord(data_name, mode, seed, config_.lr_for(mode), {}, final={n: [True] for n in HARMFUL_SETS})

    monkeypatch.setattr(S, "run_one", fake_run_one)
    run_study(spec, safety, _small(seeds=(0, 1)), out, log=lambda *_: None)
    assert calls == [("normal", "sppft", 1, 1e-3, 2), ("normal", "full", 1, 1e-3, 2)]

    # a different learning rate, then also a different number of steps, re-runs every run of the
    # study (and once done, those runs are reused in turn)
    for changed in (dict(lr=2e-3), dict(lr=2e-3, steps=3)):
        calls.clear()
        run_study(spec, safety, _small(**changed), out, log=lambda *_: None)
        expected = _small(**changed)
        assert calls == [("normal", m, 0, expected.lr_for(m), expected.steps) for m in ("sppft", "full")]
        calls.clear()
        run_study(spec, safety, _small(**changed), out, log=lambda *_: None)
        assert calls == []

    # a report over the folder: every finished run with the first settings, whatever selection made
    # it (seed 1; the seed-0 files were replaced by the re-runs), none made with another lr or steps
    reported = S.finished_runs(spec, safety, _small(modes=("full",), seeds=(5,)), out)
    assert sorted((r.mode, r.seed) for r in reported) == [("full", 1), ("sppft", 1)]
    assert all(r.lr == 1e-3 for r in reported)
    assert [(r.mode, r.seed, r.lr) for r in S.finished_runs(spec, safety, _small(lr=2e-3, steps=3), out)] == \
        [("full", 0, 2e-3), ("sppft", 0, 2e-3)]
    assert S.finished_runs(spec, LayerRange(0, 1), _small(), out) == []  # another safety range


# ---------------------------------------------------------------- 4. summarise and audit_table


def _bootstrap_by_hand(flags: list[list[bool]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The crossed bootstrap of ``interp.stats.seeds_interval`` written out with loops: each
    replicate draws seeds with replacement and one set of requests with replacement, scores every
    drawn seed on those requests, and takes the mean; the interval is the 2.5 and 97.5
    percentiles (same random stream)."""
    n_seeds, n_req = len(flags), len(flags[0])
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    req_draws = rng.integers(0, n_req, size=(n_boot, n_req))
    boots = []
    for b in range(n_boot):
        total = 0.0
        for i in range(n_seeds):
            row = flags[seed_draws[b, i]]
            total += sum(float(row[req_draws[b, j]]) for j in range(n_req))
        boots.append(total / (n_seeds * n_req))
    boots.sort()

    def percentile(q):  # linear interpolation between the order statistics around (n - 1) q
        pos = (n_boot - 1) * q
        below = int(pos)
        return boots[below] + (pos - below) * (boots[min(below + 1, n_boot - 1)] - boots[below])

    return percentile(0.025), percentile(0.975)


def _synthetic_records():
    rng = np.random.default_rng(7)
    records = []
    for mode, p in (("sppft", 0.2), ("full", 0.7)):
        for seed in range(3):
            final = {name: [bool(x) for x in rng.random(5 + k) < p] for k, name in enumerate(HARMFUL_SETS)}
            dose = {str(s): {name: [bool(x) for x in rng.random(3) < p * s / 4] for name in HARMFUL_SETS} for s in (4, 2)}
            audit = {"gap": [0.1 * seed, 0.5, 0.2 + seed], "R_o": {"k": seed + (mode == "full"), "n": 10}}
            records.append(RunRecord("normal", mode, seed, 1e-4 if mode == "sppft" else 3e-4, {"range": None}, dose=dose,
                                     final=final, quality={"rouge_l": 0.1 * (seed + 1), "completion_loss": 2.0 + seed},
                                     audit=audit))
    before = {"dose": {name: [True, False, False] for name in HARMFUL_SETS},
              "audit": {"gap": [0.0, 1.0, 2.0], "R_o": {"k": 4, "n": 10}}}
    return records, before


def test_summarise_matches_a_hand_computation():
    records, before = _synthetic_records()
    final, dose = summarise(records, before)
    assert len(final) == 2 * len(HARMFUL_SETS) and len(dose) == 2 * len(HARMFUL_SETS) * 3
    for mode in ("sppft", "full"):
        runs = [r for r in records if r.mode == mode]
        for name in HARMFUL_SETS:
            flags = [r.final[name] for r in runs]
            row = final[(final["mode"] == mode) & (final["set"] == name)].iloc[0]
            per_seed = [sum(f) / len(f) for f in flags]
            assert row["R_h"] == pytest.approx(sum(per_seed) / 3)  # equal request counts: mean of seed means
            assert row["per_seed"] == pytest.approx(per_seed)
            assert (row["seeds"], row["n"], row["data"], row["lr"]) == (3, len(flags[0]), "normal", runs[0].lr)
            lo, hi = _bootstrap_by_hand(flags)
            assert (row["lo"], row["hi"]) == (pytest.approx(lo), pytest.approx(hi))
            assert row["lo"] <= row["R_h"] <= row["hi"] and row["lo"] < row["hi"]
            assert row["rouge_l"] == pytest.approx(0.2) and row["completion_loss"] == pytest.approx(3.0)

            curve = dose[(dose["mode"] == mode) & (dose["set"] == name)]
            assert list(curve["step"]) == [0, 2, 4]
            step0 = curve.iloc[0]
            assert step0["R_h"] == pytest.approx(1 / 3)
            assert (step0["lo"], step0["hi"]) == tuple(pytest.approx(v) for v in _bootstrap_by_hand([before["dose"][name]]))
            for step in (2, 4):
                row = curve[curve["step"] == step].iloc[0]
                flags = [r.dose[str(step)][name] for r in runs]
                assert row["R_h"] == pytest.approx(np.mean(flags))
                assert (row["lo"], row["hi"]) == tuple(pytest.approx(v) for v in _bootstrap_by_hand(flags))


def test_summarise_interval_is_degenerate_when_every_seed_agrees():
    records = [RunRecord("implicit", "sppft", s, 3e-5, {}, final={n: [True, True, False, False] for n in HARMFUL_SETS},
                         quality={"rouge_l": 0.0, "completion_loss": 1.0}) for s in range(2)]
    final, _ = summarise(records, {"dose": {n: [False] for n in HARMFUL_SETS}})
    assert (final["R_h"] == 0.5).all()
    assert (final["lo"] < 0.5).all() and (final["hi"] > 0.5).all()  # the requests still vary
    records = [RunRecord("implicit", "sppft", s, 3e-5, {}, final={n: [True] * 4 for n in HARMFUL_SETS},
                         quality={"rouge_l": 0.0, "completion_loss": 1.0}) for s in range(2)]
    final, _ = summarise(records, {"dose": {n: [False] for n in HARMFUL_SETS}})
    assert (final["R_h"] == 1.0).all() and (final["lo"] == 1.0).all() and (final["hi"] == 1.0).all()


def test_repeating_a_seed_does_not_narrow_the_interval():
    """Three identical seeds carry the information of one (the paper settings' full-batch steps
    give exactly that): the interval must stay as wide as one seed's request bootstrap, and a
    seed that differs must widen it."""
    from interp.stats import seeds_interval

    rng = np.random.default_rng(3)
    one = [bool(x) for x in rng.random(200) < 0.4]
    single = seeds_interval([one], n_boot=4000)
    tripled = seeds_interval([one, one, one], n_boot=4000)
    assert tripled["hi"] - tripled["lo"] == pytest.approx(single["hi"] - single["lo"], rel=0.1)
    other = [bool(x) for x in rng.random(200) < 0.7]
    mixed = seeds_interval([one, one, other], n_boot=4000)
    assert mixed["hi"] - mixed["lo"] > 1.5 * (single["hi"] - single["lo"])


def test_seeds_difference_matches_a_hand_computation():
    """The paired bootstrap written out with loops: one draw of seeds and one of requests per
    replicate, both arrays scored on it (same random stream as ``seeds_difference``)."""
    from interp.stats import seeds_difference

    rng = np.random.default_rng(11)
    a = (rng.random((3, 9)) < 0.3).tolist()
    b = (rng.random((3, 9)) < 0.6).tolist()
    n_boot = 500
    draws = np.random.default_rng(0)
    seed_draws = draws.integers(0, 3, size=(n_boot, 3))
    req_draws = draws.integers(0, 9, size=(n_boot, 9))
    boots = sorted(sum(float(a[seed_draws[k, i]][req_draws[k, j]]) - float(b[seed_draws[k, i]][req_draws[k, j]])
                       for i in range(3) for j in range(9)) / 27 for k in range(n_boot))
    stat = seeds_difference(a, b, n_boot=n_boot)
    assert stat["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (stat["lo"], stat["hi"]) == (pytest.approx(np.quantile(boots, 0.025)), pytest.approx(np.quantile(boots, 0.975)))
    assert (stat["n_seeds"], stat["n_requests"]) == (3, 9)
    same = seeds_difference(a, a)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        seeds_difference(a, [row[:8] for row in b])


def test_pairing_narrows_the_difference_when_runs_agree():
    """Two modes that answer the same hard requests and differ on a few: the paired interval on
    the difference is far narrower than the unpaired intervals' spread, and excludes zero."""
    from interp.stats import seeds_difference, seeds_interval

    rng = np.random.default_rng(5)
    hard = rng.random(200) < 0.3  # the requests every mode tends to answer
    base = hard[None, :] & (rng.random((3, 200)) < 0.9)
    worse = hard[None, :] | (rng.random((3, 200)) < 0.08)  # those, plus about 8% more
    paired = seeds_difference(worse, base)
    one, other = seeds_interval(worse), seeds_interval(base)
    assert paired["lo"] > 0
    assert paired["hi"] - paired["lo"] < 0.6 * ((one["hi"] - one["lo"]) + (other["hi"] - other["lo"])) / 2
    assert one["lo"] < other["hi"]  # the separate intervals overlap: only the pairing shows the difference


def test_differences_pair_modes_by_seed_and_request():
    from interp.stats import seeds_difference

    records, _ = _synthetic_records()
    ablation = [RunRecord("normal", "ablation", r.seed, r.lr, {}, final=r.final, quality=r.quality)
                for r in records if r.mode == "sppft" and r.seed != 1]  # seed 1 unfinished
    table = differences(records + ablation)
    assert set(zip(table["mode"], table["reference"])) == {("sppft", "full"), ("ablation", "full"), ("sppft", "ablation")}
    runs = {(r.mode, r.seed): r for r in records + ablation}
    for mode, ref, seeds in (("sppft", "full", [0, 1, 2]), ("ablation", "full", [0, 2]), ("sppft", "ablation", [0, 2])):
        for name in HARMFUL_SETS:
            row = table[(table["mode"] == mode) & (table["reference"] == ref) & (table["set"] == name)].iloc[0]
            stat = seeds_difference([runs[mode, s].final[name] for s in seeds], [runs[ref, s].final[name] for s in seeds])
            assert (row["difference"], row["lo"], row["hi"]) == (pytest.approx(stat["mean"]), pytest.approx(stat["lo"]),
                                                                  pytest.approx(stat["hi"]))
            assert row["seeds"] == len(seeds) and row["n"] == len(runs[mode, 0].final[name])
            if (mode, ref) == ("sppft", "ablation"):  # the ablation copies SPPFT's verdicts
                assert (row["difference"], row["lo"], row["hi"]) == (0.0, 0.0, 0.0)
    assert differences([r for r in records if r.mode == "sppft"]).empty  # no reference, no rows


def test_audit_table_matches_a_hand_computation():
    records, before = _synthetic_records()
    table = audit_table(records, before)
    assert list(table["mode"]) == ["before", "sppft", "full"]
    assert table.iloc[0][["R_o", "n", "gap_0", "gap_1", "gap_2"]].tolist() == [4, 10, 0.0, 1.0, 2.0]
    for i, mode in ((1, "sppft"), (2, "full")):
        row = table.iloc[i]
        # seeds 0, 1, 2: R_o counts seed (+1 for full), gaps 0.1 seed, 0.5, 0.2 + seed
        assert row["R_o"] == pytest.approx(1 + (mode == "full")) and row["n"] == 10
        assert [row[f"gap_{j}"] for j in range(3)] == [pytest.approx(0.1), pytest.approx(0.5), pytest.approx(1.2)]
    assert audit_table([RunRecord("normal", "full", 0, 1e-4, {})], {"audit": None}).empty


# ---------------------------------------------------------------- 5. learning rates


def test_lr_for_gives_the_official_rates_and_the_reverse_control():
    assert PAPER_LR == {"frozen": 3e-5, "full": 3e-4}  # SPPFT.py and Full_finetuning.py defaults
    paper = StudyConfig(lr=1e-4).with_paper_settings()
    assert (paper.batch_size, paper.grad_accum, paper.template, paper.train_on_inputs, paper.max_length) == (
        4, 32, "alpaca", True, 256)
    assert paper.lr == 1e-4  # the config's own lr is kept, but paper settings do not use it
    assert {m: paper.lr_for(m) for m in S.MODES} == {"sppft": 3e-5, "full": 3e-4, "ablation": 3e-5, "critical": 3e-5}
    assert paper.lr_for("sppft@full_lr") == 3e-4 and paper.lr_for("full@sppft_lr") == 3e-5

    plain = StudyConfig(lr=1e-4)
    assert {m: plain.lr_for(m) for m in S.MODES} == dict.fromkeys(S.MODES, 1e-4)
    assert plain.lr_for("sppft@full_lr") == 3e-4 and plain.lr_for("full@sppft_lr") == 3e-5

    control = StudyConfig(modes=("sppft", "full"), reverse_control=True).with_paper_settings()
    assert control.run_modes() == ["sppft", "full", "sppft@full_lr", "full@sppft_lr"]
    assert StudyConfig(modes=("sppft",)).run_modes() == ["sppft"]
    assert RunRecord("implicit", "full@sppft_lr", 2, 3e-5, {}).name == "implicit-full-at-sppft_lr-seed2"


def test_frozen_setup_rejects_an_unknown_mode(tiny4):
    with pytest.raises(ValueError, match="unknown study mode"):
        frozen_setup(tiny4, "everything", LayerRange(1, 2), StudyConfig())


def test_reverse_control_runs_can_be_named_on_the_command_line():
    """``--modes sppft@full_lr,full@sppft_lr`` selects only the reverse control (a study split
    over cores), with the learning rates of ``lr_for``."""
    from analyses.sppft import parse_args, study_config

    config = study_config(parse_args(["--layers", "2,4", "--paper-settings", "--modes", "sppft@full_lr,full@sppft_lr"]))
    assert config.run_modes() == ["sppft@full_lr", "full@sppft_lr"]
    assert [config.lr_for(m) for m in config.run_modes()] == [PAPER_LR["full"], PAPER_LR["frozen"]]


def test_a_study_whose_ablation_cannot_fit_fails_before_any_run(tiny_dir, tmp_path):
    """On 4 layers no 2-layer range lies outside [1,2]: the study must say so before training the
    other modes (``make demo`` once lost six minutes of SPPFT and full runs to this)."""
    from interp.ranges import LayerRangeError

    config = StudyConfig(modes=("sppft", "full", "ablation"), seeds=(0,), steps=1, device="cpu")
    with pytest.raises(LayerRangeError, match="leave ablation out of the modes"):
        run_study(str(tiny_dir), LayerRange(1, 2), config, tmp_path)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(LayerRangeError):  # a range past the model's last layer fails there too
        run_study(str(tiny_dir), LayerRange(2, 4), StudyConfig(modes=("sppft",), seeds=(0,), device="cpu"), tmp_path)


def test_run_key_keeps_stored_runs_reusable_and_tells_new_settings_apart():
    """A setting added later (``harmful_sets``) is left out of the key at its default, so a run file
    written before it existed still matches; any other value is part of the key."""
    key = S.run_key(StudyConfig())
    assert "harmful_sets" not in key and key["steps"] == 64
    scored = S.run_key(StudyConfig(harmful_sets=(S.VALIDATION_SET,)))
    assert scored["harmful_sets"] == (S.VALIDATION_SET,) and {k: v for k, v in scored.items() if k != "harmful_sets"} == key
    assert S.study_prompts(S.VALIDATION_SET) == [p.harmful for p in S.load_pairs("validation")]
    assert len(S.study_prompts(S.VALIDATION_SET)) == 80


def test_seed_sources_say_what_the_seed_draws():
    paper = StudyConfig().with_paper_settings()  # micro-batch 4 x 32 accumulation: 128 rows a step
    assert S.seed_sources(paper, "implicit", "sppft", 100) == []
    assert S.seed_sources(paper, "implicit", "sppft", 129) == ["row order and grouping (a step's batch is part of the set)"]
    assert S.seed_sources(paper, "backdoor", "full", 100) == ["the seeded data set"]
    assert S.seed_sources(paper, "implicit", "full", 100, dropout=0.1) == ["dropout"]
    assert S.seed_sources(StudyConfig(), "implicit", "full", 100)  # batch 8 of 100 rows
