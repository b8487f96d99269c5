"""The alignment recipe (finetune.align): what it trains on, what it must never see, the exact
adapter sum it ships, a whole (tiny) run, and the shipped adapter's record against its files."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.align import (
    alternatives_record,
    build_parser,
    candidate_prompts,
    check_pairs,
    check_prompts,
    combine_adapters,
    cut_answer,
    evaluation_prompts,
    held_out_prompts,
    near_copies,
    sft_rows,
    training_prompts,
    validation_prompts,
)
from interp.data import load_pairs, load_prompts, load_xstest, prompts_hash
from interp.models import PACKAGE_WEIGHTS, ALIGNED_ADAPTER


@pytest.fixture(scope="module")
def prompts():
    return training_prompts()


def test_training_prompts_hold_no_held_out_row_and_no_near_copy(prompts):
    train = set(prompts["refuse"]) | set(prompts["answer"])
    held_out = held_out_prompts()
    assert set(evaluation_prompts()) | set(sum(validation_prompts(question_pairs=True).values(), [])) == set(held_out)
    assert set(sum(validation_prompts().values(), [])) < set(held_out)  # the question pairs' validation too
    assert not train & set(held_out)
    assert not near_copies(sorted(train), held_out)  # word-set Jaccard > 0.8
    xstest = {x.prompt for x in load_xstest()}
    assert not train & xstest and not train & set(load_prompts("over_rejection"))


def test_near_copy_check_can_fail():
    """AdvBench's halves hold near-duplicates; the candidates include them and the filter drops them."""
    candidates = candidate_prompts()["refuse"]
    copies = near_copies(candidates, load_prompts("advbench", "test"))
    assert copies and all(score > 0.8 for score, _, _ in copies)
    assert not {t for _, t, _ in copies} & set(training_prompts()["refuse"])


def test_training_roles_cover_the_pairs_in_matched_frames(prompts):
    pairs = load_pairs("train")
    assert {p.harmful for p in pairs} <= set(prompts["refuse"])
    assert {p.benign for p in pairs} <= set(prompts["answer"])
    assert set(load_prompts("benign", "train")) <= set(prompts["answer"])


def test_supplementary_pairs_join_training_only_when_asked(prompts):
    extra = [p for p in load_pairs("train", extra=True) if p.extra]
    without = training_prompts(extra_pairs=False)
    sides = {"refuse": {p.harmful for p in extra}, "answer": {p.benign for p in extra}}
    for role, texts in sides.items():
        assert not texts & set(without[role])
        kept = texts & set(prompts[role])
        assert len(kept) >= len(texts) - 5  # at most a few dropped as near-copies of held-out prompts
        assert set(prompts[role]) - kept == set(without[role])


def test_hard_pairs_join_training_only_when_asked_and_are_weighted_as_pairs(prompts):
    hard = [p for p in load_pairs("train", hard=True) if p.hard]
    with_hard = training_prompts(hard_pairs=True)
    train = set(with_hard["refuse"]) | set(with_hard["answer"])
    assert not train & set(held_out_prompts()) and not near_copies(sorted(train), held_out_prompts())
    for role, side in (("refuse", "harmful"), ("answer", "benign")):
        texts = {getattr(p, side) for p in hard}
        assert not texts & set(prompts[role])
        kept = texts & set(with_hard[role])
        assert len(kept) >= len(texts) - 5  # at most a few dropped as near-copies of held-out prompts
        assert set(with_hard[role]) - kept == set(prompts[role])
    rows = sft_rows(with_hard, {q: "An answer." for q in with_hard["answer"]}, pair_weight=3)
    counts = {}
    for query, _, _ in rows:
        counts[query] = counts.get(query, 0) + 1
    assert {counts[p.benign] for p in hard if p.benign in kept} == {3}  # the pair weight reaches them


def test_question_pairs_join_training_and_validation_only_when_asked(prompts):
    questions = [p for p in load_pairs("all", questions=True) if p.question]
    train = [p for p in questions if p.part == "train"]
    held = [p for p in questions if p.part == "validation"]
    with_questions = training_prompts(question_pairs=True)
    for role, side in (("refuse", "harmful"), ("answer", "benign")):
        texts = {getattr(p, side) for p in train}
        assert not texts & set(prompts[role]) and texts <= set(with_questions[role])
        assert set(with_questions[role]) - texts == set(prompts[role])
        assert not {getattr(p, side) for p in held} & set(with_questions[role])
    plain, asked = validation_prompts(), validation_prompts(question_pairs=True)
    assert asked["paired_harmful"] == plain["paired_harmful"] + [p.harmful for p in held]
    assert asked["paired_benign"] == plain["paired_benign"] + [p.benign for p in held]
    assert asked["borderline"] == plain["borderline"]


def test_check_pairs_leave_training_with_their_near_copies_and_nothing_else(prompts):
    pairs = check_pairs(24)
    assert len({p.pair_id for p in pairs}) == 24 and all(p.extra and p.part == "train" for p in pairs)
    assert len({p.category for p in pairs}) == 10  # spread over the supplement, not its first category
    rows = check_prompts(24)
    assert rows == {"paired_harmful": [p.harmful for p in pairs], "paired_benign": [p.benign for p in pairs]}
    check = rows["paired_harmful"] + rows["paired_benign"]
    held = training_prompts(check=24)
    assert set(check) <= set(held_out_prompts(24)) and not set(check) & set(held_out_prompts())
    for role in ("refuse", "answer"):
        removed = set(prompts[role]) - set(held[role])
        copies = {t for _, t, _ in near_copies(prompts[role], check)}
        assert removed == (set(check) & set(prompts[role])) | copies, role
        assert set(held[role]) <= set(prompts[role])
    assert not near_copies(sorted(set(held["refuse"]) | set(held["answer"])), check)
    for bad in (-1, 241):
        with pytest.raises(ValueError, match="check_pairs"):
            check_pairs(bad)
    with pytest.raises(ValueError, match="extra_pairs"):
        candidate_prompts(extra_pairs=False, check=4)


def test_a_run_with_check_pairs_scores_the_shipped_adapter_on_them_once(tiny_dir, tmp_path, monkeypatch):
    """``--check-pairs``: the rows leave the training data (its recorded hash) and the adapter
    written to ``--out`` is scored on them, as an independent scoring of that adapter finds."""
    from finetune import align
    from interp.generation import generate
    from interp.judge import DEFAULT_JUDGE

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    align.main(["--base", str(tiny_dir), "--limit", "4", "--epochs", "1", "--check-pairs", "6", "--out", str(out)])
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["settings"]["check_pairs"] == 6
    assert recipe["stages"]["sft"]["settings"]["check_pairs"] == 6
    for role in ("refuse", "answer"):
        assert recipe["data"][role]["hash"] == prompts_hash(training_prompts(4, question_pairs=True, check=6,
                                                                             hard_pairs=True)[role])
    model = align.merged_model(str(tiny_dir), out)
    expected = {}
    for name, queries in check_prompts(6).items():
        texts = generate(model, queries, max_new_tokens=32, batch_size=1, decided=DEFAULT_JUDGE.decided)
        refused = sum(DEFAULT_JUDGE.is_refusal(t) for t in texts) / len(texts)
        expected[name] = round(refused if name == "paired_harmful" else 1 - refused, 4)
    check = recipe["check"]
    assert {k: check[k] for k in expected} == expected and check["pairs"] == 6
    assert check["score"] == round(sum(expected.values()) / 2, 4)
    low, high = check["paired_benign_ci95"]
    assert low <= check["paired_benign"] <= high
    assert "Check rows: 6 supplementary train pairs" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match="error: check_pairs"):
        align.main(["--base", str(tiny_dir), "--limit", "4", "--check-pairs", "999", "--out", str(out)])


def _random_adapter(tiny_dir, folder, seed: int, rank: int = 2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return {
        name.replace("base_model.model.", "").replace(".base_layer", ""): param
        for name, param in peft_model.merge_and_unload().named_parameters()
    }


def test_combined_adapter_is_the_exact_sum(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters())
    merged_a = _random_adapter(tiny_dir, tmp_path / "a", seed=1)
    merged_b = _random_adapter(tiny_dir, tmp_path / "b", seed=2)
    combine_adapters(AutoModelForCausalLM.from_pretrained(tiny_dir), [tmp_path / "a", tmp_path / "b"], [1.0, 1.0],
                     tmp_path / "sum")
    config = json.loads((tmp_path / "sum" / "adapter_config.json").read_text())
    assert config["r"] == 4  # ranks add up: the sum is exact, not an SVD truncation
    summed = dict(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "sum")
                  .merge_and_unload().named_parameters())
    changed = 0
    for name, w0 in base.items():
        expected = w0 + (merged_a[name] - w0) + (merged_b[name] - w0)
        torch.testing.assert_close(summed[name], expected, atol=2e-3, rtol=0)  # adapter stored in fp16
        changed += not torch.equal(merged_a[name], w0)
    assert changed == 8  # q_proj and down_proj of 4 layers carried an adapter
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_adapters(AutoModelForCausalLM.from_pretrained(tiny_dir), [tmp_path / "a"], [1.0, 1.0], tmp_path / "x")


def test_cut_answers_keep_their_first_tokens_and_lose_the_end_marker():
    """--sft-answer-tokens: a cut answer is its first N tokens with no end-of-turn marker (the
    model must not learn to stop mid-answer); an answer within N tokens is left whole."""
    from finetune.align import _chat
    from tests.conftest import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    long = dict(zip(("prompt", "completion"), _chat(tokenizer, "How do I bake bread?",
                "Mix flour, water, salt and yeast in a large bowl, knead it for ten minutes, then let it rise.")))
    cut = cut_answer(tokenizer, long, 6)
    ids = tokenizer(long["completion"], add_special_tokens=False)["input_ids"]
    assert tokenizer(cut["completion"], add_special_tokens=False)["input_ids"] == ids[:6]
    assert "<|im_end|>" in long["completion"] and "<|im_end|>" not in cut["completion"]
    assert cut["prompt"] == long["prompt"]
    short = dict(zip(("prompt", "completion"), _chat(tokenizer, "Hi?", "Hello.")))
    assert cut_answer(tokenizer, short, 6) == short


def test_pair_weight_repeats_exactly_the_paired_rows(prompts):
    answers = {q: f"answer to {q}" for q in prompts["answer"]}
    once, thrice = sft_rows(prompts, answers), sft_rows(prompts, answers, pair_weight=3)
    paired = {q for p in load_pairs("train", extra=True) for q in (p.harmful, p.benign)}
    assert len(once) == len(prompts["answer"]) + len(prompts["refuse"])
    count = {}
    for query, _, kind in thrice:
        count[query, kind] = count.get((query, kind), 0) + 1
    assert {query for (query, _), n in count.items() if n == 3} == paired & {q for q, _, _ in once}
    assert all(n in (1, 3) for n in count.values())
    assert sorted(thrice) != thrice  # shuffled
    with pytest.raises(ValueError, match="at least 1"):
        sft_rows(prompts, answers, pair_weight=0)


def test_a_whole_tiny_run_validates_every_epoch_and_records_its_choice(tiny_dir, tmp_path, monkeypatch):
    """The recipe end to end on the tiny model (8 prompts per role): both stages, a validation
    score after each epoch, the choice and the data recorded, an adapter PEFT can load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune import align

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    align.main(["--base", str(tiny_dir), "--limit", "8", "--method", "sft+dpo", "--epochs", "2", "--dpo-epochs", "1", "--out", str(out)])
    recipe = json.loads((out / "recipe.json").read_text())
    assert [row["epoch"] for row in recipe["stages"]["sft"]["validation"]] == [1, 2]
    assert recipe["stages"]["dpo"]["validation"]  # validated every --dpo-eval-every steps
    assert recipe["method"] in ("sft", "sft+dpo")
    best = {name: max(r["score"] for r in stage["validation"]) for name, stage in recipe["stages"].items()}
    assert recipe["best_validation"] == best
    assert recipe["data"]["refuse"]["n"] == 8 and "dropped_near_copies" in recipe["data"]["refuse"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)  # loads
    # a second run reuses both finished stages
    before = (out / "adapter_model.safetensors").read_bytes()
    align.main(["--base", str(tiny_dir), "--limit", "8", "--method", "sft+dpo", "--epochs", "2", "--dpo-epochs", "1", "--out", str(out)])
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_the_shipped_adapter_matches_its_recorded_recipe():
    folder = PACKAGE_WEIGHTS / ALIGNED_ADAPTER
    recipe = json.loads((folder / "recipe.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    prompts = training_prompts(extra_pairs=recipe["settings"].get("extra_pairs", False),
                               question_pairs=recipe["settings"].get("question_pairs", False),
                               check=recipe["settings"].get("check_pairs", 0),
                               hard_pairs=recipe["settings"].get("hard_pairs", False))
    for role in ("refuse", "answer"):
        assert recipe["data"][role]["hash"] == prompts_hash(prompts[role]), role
        assert recipe["data"][role]["n"] == len(prompts[role])
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert recipe["adapter_bytes"] == size and size < 40e6
    ranks = recipe["settings"]["rank"] * (2 if recipe["method"] == "sft+dpo" else 1)
    assert config["r"] == ranks
    assert recipe["settings"]["base"] == "embedded-base" and recipe["settings"]["limit"] is None


def test_the_command_line_defaults_are_the_shipped_recipe():
    """README: ``python -m finetune.align --ship`` regenerates the shipped adapter, so every knob's default must be
    the value the shipped run used."""
    recipe = json.loads((PACKAGE_WEIGHTS / ALIGNED_ADAPTER / "recipe.json").read_text())
    defaults = vars(build_parser().parse_args([]))
    knobs = {k: v for k, v in recipe["settings"].items() if k not in ("out", "ship", "alternative")}
    assert {k: defaults[k] for k in knobs} == knobs
    assert defaults["extra_pairs"] == recipe["settings"].get("extra_pairs", False)
    assert defaults["question_pairs"] == recipe["settings"].get("question_pairs", False)
    assert defaults["hard_pairs"] == recipe["settings"].get("hard_pairs", False)


def test_alternatives_keep_the_history_of_earlier_choices(tmp_path):
    old = {"settings": {"epochs": 3, "out": "x"}, "best_validation": {"sft": 0.5},
           "stages": {"sft": {"validation": [{"epoch": 1, "paired_harmful": 0.4, "paired_benign": 0.6,
                                               "borderline": 0.5, "score": 0.5, "loss": 1.0}]}}}
    newer = {**old, "settings": {"epochs": 4, "extra_pairs": True}, "best_validation": {"sft": 0.7}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    newer["alternatives"] = alternatives_record([str(tmp_path / "old.json")])
    (tmp_path / "new.json").write_text(json.dumps(newer))
    record = alternatives_record([str(tmp_path / "new.json")])
    assert [r["best_validation"]["sft"] for r in record] == [0.7, 0.5]
    assert [r["settings"]["extra_pairs"] for r in record] == [True, False]  # older runs had no supplement
    assert [r["settings"]["question_pairs"] for r in record] == [False, False]
    assert [r["settings"]["check_pairs"] for r in record] == [0, 0]
    assert all("validation_now" not in r for r in record)
    # with a scorer, the adapter beside a recipe.json is scored on today's validation rows
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    scored = alternatives_record([str(tmp_path / "new.json")], score=lambda folder: {"score": str(folder)})
    assert scored[0]["validation_now"] == {"score": str(tmp_path)} and "validation_now" not in scored[1]
    assert "out" not in record[1]["settings"] and "loss" not in record[1]["validation"]["sft"][0]
