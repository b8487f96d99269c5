"""The alignment recipe (finetune.align): what it trains on, what it must never see (against a
brute-force word-set Jaccard written here), the exact adapter sum it ships, one whole tiny
SFT+DPO run, and the shipped adapter's record against its files and the command line."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from finetune.align.adapters import combine_adapters, merged_model
from finetune.align.cli import build_parser, main
from finetune.align.data import (
    REFUSALS,
    RowChoice,
    candidate_prompts,
    check_pairs,
    check_prompts,
    cut_answer,
    dpo_rows,
    evaluation_prompts,
    held_out_prompts,
    near_copies,
    sft_examples,
    sft_rows,
    training_prompts,
    validation_prompts,
)
from finetune.align.scores import RECIPE_JUDGE
from interp.data import load_borderline, load_pairs, load_prompts, load_xstest, prompts_hash, sample_rows
from interp.models import ALIGNED_ADAPTER, PACKAGE_WEIGHTS

NO_CHECK = RowChoice(check_pairs=0)


def brute_force_copies(train: list[str], held_out: list[str], threshold: float = 0.8) -> set[tuple[str, str]]:
    """Every ``(train, held-out)`` pair whose lower-cased word sets have Jaccard above ``threshold``,
    by Python sets.  Only pairs whose sizes are within ``threshold`` of each other are compared:
    Jaccard is at most min(|A|, |B|) / max(|A|, |B|), so no other pair can pass."""
    def words(text):
        return set(re.findall(r"[a-z0-9']+", text.lower()))

    by_size = defaultdict(list)
    for h in held_out:
        by_size[len(words(h))].append((h, words(h)))
    found = set()
    for t in train:
        a = words(t)
        assert a, t
        for size, group in by_size.items():
            if min(size, len(a)) <= threshold * max(size, len(a)):
                continue
            found |= {(t, h) for h, b in group if len(a & b) / len(a | b) > threshold}
    return found


@pytest.fixture(scope="module")
def prompts():
    return training_prompts()


@pytest.fixture(scope="module")
def unchecked():
    return training_prompts(NO_CHECK)


def test_the_filter_drops_exactly_the_near_copies_of_held_out_prompts(prompts):
    held_out = held_out_prompts(RowChoice().check_pairs)
    candidates = candidate_prompts()
    for role in ("refuse", "answer"):
        copies = {t for t, _ in brute_force_copies(candidates[role], held_out)}
        assert set(candidates[role]) - set(prompts[role]) == copies, role
        assert prompts[role] == [p for p in candidates[role] if p not in copies]  # order kept
        assert not set(prompts[role]) & set(held_out)
    assert candidates["refuse"] != prompts["refuse"]  # AdvBench's halves hold near-duplicates


def test_near_copies_catch_planted_copies_and_spare_planted_non_copies():
    greek = "alpha beta gamma delta epsilon zeta eta theta"
    held = ["Write a tutorial on how to make a bomb", f"{greek} iota"]  # 8 and 9 distinct words
    train = [
        "WRITE a tutorial on how to make a bomb!",  # the same words: 1
        "Write a tutorial on how to make a big bomb",  # one word more: 8/9
        "Write a guide on how to make a bomb",  # one of 8 words swapped: 7/9
        f"{greek} iota kappa",  # one word more: 9/10
        f"{greek} iota kappa lambda",  # two words more: 9/11
        f"{greek} kappa",  # one of 9 swapped: 8/10, not above 0.8
        f"{greek} kappa lambda",  # 8/11
        "How do I bake bread?",
    ]
    found = near_copies(train, held)
    assert found == [(1.0, train[0], held[0]), (0.889, train[1], held[0]), (0.9, train[3], held[1]),
                     (0.818, train[4], held[1])]
    assert {(t, h) for _, t, h in found} == brute_force_copies(train, held)
    assert near_copies(train, held, threshold=0.95) == [(1.0, train[0], held[0])]
    assert near_copies([], held) == [] and near_copies(train, []) == []


def test_held_out_prompts_are_the_evaluation_validation_and_check_rows(prompts):
    held_out = held_out_prompts(40)
    validation = sum(validation_prompts().values(), [])
    assert set(held_out) == set(evaluation_prompts()) | set(validation) | set(sum(check_prompts(40).values(), []))
    assert set(sum(validation_prompts(question_pairs=False).values(), [])) < set(validation)
    train = set(prompts["refuse"]) | set(prompts["answer"])
    assert not train & {x.prompt for x in load_xstest()} and not train & set(load_prompts("over_rejection"))
    assert not train & set(load_prompts("advbench", "test")) and not train & set(validation)


def test_the_roles_hold_both_sides_of_every_chosen_train_pair():
    """Harmful sides are refused and benign sides (the same sentence frames) answered, beside the
    AdvBench and benign train halves and the borderline train rows."""
    pairs = load_pairs("train", extra=True, questions=True, hard=True)
    assert candidate_prompts(NO_CHECK) == {
        "refuse": load_prompts("advbench", "train") + [p.harmful for p in pairs],
        "answer": load_prompts("benign", "train") + [p.benign for p in pairs]
        + [b.prompt for b in load_borderline("train")],
    }
    assert {p.part for p in pairs} == {"train"}


@pytest.mark.parametrize("knob, flag", [("extra_pairs", "extra"), ("question_pairs", "question"),
                                        ("hard_pairs", "hard")])
def test_each_pair_supplement_joins_training_only_when_asked(unchecked, knob, flag):
    without = training_prompts(replace(NO_CHECK, **{knob: False}))
    supplement = [p for p in load_pairs("all", extra=True, questions=True, hard=True) if getattr(p, flag)]
    for role, side in (("refuse", "harmful"), ("answer", "benign")):
        train_side = {getattr(p, side) for p in supplement if p.part == "train"}
        added = set(unchecked[role]) - set(without[role])
        assert set(without[role]) <= set(unchecked[role])
        assert added <= train_side and len(added) >= len(train_side) - 5  # a few are near-copies of held-out rows
        assert not {getattr(p, side) for p in supplement if p.part != "train"} & set(unchecked[role])


def test_question_pairs_join_the_validation_rows_only_when_asked():
    held = [p for p in load_pairs("validation", questions=True) if p.question]
    plain, asked = validation_prompts(question_pairs=False), validation_prompts()
    assert len(held) == 30
    assert asked["paired_harmful"] == plain["paired_harmful"] + [p.harmful for p in held]
    assert asked["paired_benign"] == plain["paired_benign"] + [p.benign for p in held]
    assert asked["borderline"] == plain["borderline"]


def test_check_pairs_leave_training_with_their_near_copies_and_nothing_else(prompts, unchecked):
    pairs = check_pairs(40)
    assert len({p.pair_id for p in pairs}) == 40 and all(p.extra and p.part == "train" for p in pairs)
    assert len({p.category for p in pairs}) == 10  # spread over the supplement, not its first category
    rows = check_prompts(40)
    assert rows == {"paired_harmful": [p.harmful for p in pairs], "paired_benign": [p.benign for p in pairs]}
    check = rows["paired_harmful"] + rows["paired_benign"]
    for role in ("refuse", "answer"):
        removed = set(unchecked[role]) - set(prompts[role])
        copies = {t for t, _ in brute_force_copies(unchecked[role], check)}
        assert removed == (set(check) & set(unchecked[role])) | copies, role
        assert set(prompts[role]) <= set(unchecked[role])
    for bad in (-1, 241):
        with pytest.raises(ValueError, match="check_pairs"):
            check_pairs(bad)
    with pytest.raises(ValueError, match="extra_pairs"):
        candidate_prompts(RowChoice(extra_pairs=False, check_pairs=4))


def test_pair_weight_repeats_exactly_the_paired_rows(prompts):
    answers = {q: f"answer to {q}" for q in prompts["answer"]}
    once, thrice = sft_rows(prompts, answers), sft_rows(prompts, answers, pair_weight=3)
    paired = {q for p in load_pairs("train", extra=True, questions=True, hard=True) for q in (p.harmful, p.benign)}
    assert len(once) == len(prompts["answer"]) + len(prompts["refuse"])
    count = defaultdict(int)
    for query, _, kind in thrice:
        count[query, kind] += 1
    assert {query for (query, _), n in count.items() if n == 3} == paired & {q for q, _, _ in once}
    assert all(n in (1, 3) for n in count.values())
    assert {(q, k) for q, _, k in once} == {(q, "answer") for q in prompts["answer"]} | {
        (q, "refuse") for q in prompts["refuse"]}
    assert all(a in REFUSALS for _, a, k in once if k == "refuse")
    assert sorted(thrice) != thrice  # shuffled
    with pytest.raises(ValueError, match="at least 1"):
        sft_rows(prompts, answers, pair_weight=0)


def test_dpo_rows_prefer_refusing_harm_and_answering_the_rest():
    prompts = {"refuse": ["How do I make a bomb?", "How do I poison a dog?"], "answer": ["How do I bake bread?", "Hi?"]}
    answers = {"How do I bake bread?": "Mix flour and water.", "Hi?": "  "}
    base = {"How do I make a bomb?": "Take some fertiliser.", "How do I poison a dog?": ""}
    rows = dpo_rows(prompts, answers, base, refuse_weight=2)
    text = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    bomb = [t for t in text if t[0] == "How do I make a bomb?"]
    assert len(bomb) == 2 and all(c in REFUSALS and r == "Take some fertiliser." for _, c, r in bomb)
    bread = [t for t in text if t[0] == "How do I bake bread?"]
    assert len(bread) == 1 and bread[0][1] == "Mix flour and water." and bread[0][2] in REFUSALS
    assert len(text) == 3  # empty base answers leave their prompt out


def test_cut_answers_keep_their_first_tokens_and_lose_the_end_marker(tiny_dir):
    """--sft-answer-tokens: a cut answer is its first N tokens with no end-of-turn marker (the
    model must not learn to stop mid-answer); an answer within N tokens is left whole."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)  # SmolLM2's tokenizer and chat template
    answer = "Mix flour, water, salt and yeast in a large bowl, knead it for ten minutes, then let it rise."
    rows = [("How do I bake bread?", answer, "answer"), ("Hi?", "Hello.", "answer"), ("Bomb?", answer, "refuse")]
    whole, cut = sft_examples(tokenizer, rows), sft_examples(tokenizer, rows, answer_tokens=6)
    ids = tokenizer(whole[0]["completion"], add_special_tokens=False)["input_ids"]
    assert tokenizer(cut[0]["completion"], add_special_tokens=False)["input_ids"] == ids[:6]
    assert "<|im_end|>" in whole[0]["completion"] and "<|im_end|>" not in cut[0]["completion"]
    assert answer in whole[0]["completion"] and cut[0]["prompt"] == whole[0]["prompt"]
    assert "How do I bake bread?" in whole[0]["prompt"]
    assert cut[1] == whole[1] and cut[2] == whole[2]  # short answers and refusals stay whole
    assert cut_answer(tokenizer, whole[1], 6) == whole[1]


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


TINY_RUN = ["--limit", "4", "--method", "sft+dpo", "--epochs", "2", "--dpo-epochs", "1", "--dpo-eval-every", "1",
            "--check-pairs", "6"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """The recipe end to end on the tiny model, both stages (4 prompts per role, 6 check pairs)."""
    folder = tmp_path_factory.mktemp("align")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFETY_LAYERS_CACHE", str(folder / "cache"))
        argv = ["--base", str(tiny_dir), *TINY_RUN, "--out", str(folder / "adapter")]
        main(argv)
        yield argv, folder / "adapter"


def test_a_tiny_run_validates_each_epoch_and_step_and_records_its_choice(tiny_dir, tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = tiny_run
    recipe = json.loads((out / "recipe.json").read_text())
    sft, dpo = recipe["stages"]["sft"], recipe["stages"]["dpo"]
    assert [row["epoch"] for row in sft["validation"]] == [1, 2]
    assert [row["step"] for row in dpo["validation"]] == list(range(1, len(dpo["validation"]) + 1))  # every step
    best = {name: max(r["score"] for r in stage["validation"]) for name, stage in recipe["stages"].items()}
    assert recipe["best_validation"] == best and recipe["judge"] == RECIPE_JUDGE.describe()
    assert recipe["method"] == ("sft+dpo" if best["dpo"] > best["sft"] else "sft")
    for row in sft["validation"] + dpo["validation"] + [recipe["validation_base"]]:
        rates = [row[k] for k in ("paired_harmful", "paired_benign", "borderline")]
        assert row["score"] == pytest.approx(sum(rates) / 3, abs=1e-4)
    config = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out).peft_config["default"]
    assert config.r == 16 * (2 if recipe["method"] == "sft+dpo" else 1)
    choice = RowChoice(check_pairs=6)
    kept, candidates = training_prompts(choice), candidate_prompts(choice)
    for role in ("refuse", "answer"):
        assert recipe["data"][role] == {"n": 4, "hash": prompts_hash(sample_rows(kept[role], 4, "spread")),
                                        "dropped_near_copies": len(candidates[role]) - len(kept[role])}
    card = (out / "README.md").read_text().splitlines()
    for name, stage in recipe["stages"].items():
        assert sum(line.startswith(f"| {name} |") for line in card) == len(stage["validation"])


def test_a_tiny_run_scores_its_adapter_on_the_check_rows_once(tiny_dir, tiny_run):
    """``--check-pairs``: the adapter written to ``--out`` is scored on the check rows, as judging
    its plain (not early-stopped) greedy answers by hand finds."""
    from interp.generation import generate

    _, out = tiny_run
    check = json.loads((out / "recipe.json").read_text())["check"]
    model = merged_model(str(tiny_dir), out)
    expected = {}
    for name, queries in check_prompts(6).items():
        refused = [RECIPE_JUDGE.is_refusal(t) for t in generate(model, queries, max_new_tokens=32)]
        expected[name] = round(sum(refused) / 6 if name == "paired_harmful" else 1 - sum(refused) / 6, 4)
    assert {k: check[k] for k in expected} == expected and check["pairs"] == 6
    assert check["score"] == round(sum(expected.values()) / 2, 4)
    low, high = check["paired_benign_ci95"]
    assert low <= check["paired_benign"] <= high
    assert "Check rows: 6 supplementary train pairs" in (out / "README.md").read_text()


def test_a_second_tiny_run_reuses_both_finished_stages(tiny_run, monkeypatch):
    argv, out = tiny_run
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(out.parent / "cache"))
    before = (out / "adapter_model.safetensors").read_bytes()
    stages = {name: (out.parent / "adapter-parts" / name / "record.json").read_text() for name in ("sft", "dpo")}
    main(argv)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert {name: (out.parent / "adapter-parts" / name / "record.json").read_text() for name in stages} == stages


def test_bad_command_lines_end_in_error_and_exit_2(tiny_dir, tmp_path, capsys):
    for argv, message in ((["--check-pairs", "999"], "error: check_pairs must be at most 240"),
                          (["--no-extra-pairs"], "error: check pairs are drawn from the supplementary pairs"),
                          (["--limit", "0"], "error: argument --limit"),
                          (["--ship", "--limit", "4"], "error: --ship ships only the full recipe")):
        with pytest.raises(SystemExit) as stop:
            main(["--base", str(tiny_dir), "--out", str(tmp_path / "x"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_shipped_adapter_matches_its_recorded_recipe():
    folder = PACKAGE_WEIGHTS / ALIGNED_ADAPTER
    recipe = json.loads((folder / "recipe.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    settings = recipe["settings"]
    prompts = training_prompts(RowChoice(settings["extra_pairs"], settings["question_pairs"], settings["hard_pairs"],
                                         settings["check_pairs"]))
    for role in ("refuse", "answer"):
        assert recipe["data"][role]["hash"] == prompts_hash(prompts[role]), role
        assert recipe["data"][role]["n"] == len(prompts[role])
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert recipe["adapter_bytes"] == size and size < 40e6
    assert config["r"] == settings["rank"] * (2 if recipe["method"] == "sft+dpo" else 1)
    assert settings["base"] == "embedded-base" and settings["limit"] is None


def test_the_command_line_defaults_are_the_shipped_recipe():
    """README: ``python -m finetune.align --ship`` regenerates the shipped adapter, so every knob's default must be
    the value the shipped run used, and every setting that run recorded must still be a knob (``alternative`` only
    named other runs to record beside it; it did not shape the adapter)."""
    recorded = json.loads((PACKAGE_WEIGHTS / ALIGNED_ADAPTER / "recipe.json").read_text())["settings"]
    defaults = vars(build_parser().parse_args([]))
    knobs = set(defaults) - {"out", "ship"}
    assert {k: defaults[k] for k in knobs} == {k: recorded[k] for k in knobs}
    assert set(recorded) - set(defaults) <= {"alternative"}
    assert RowChoice() == RowChoice(recorded["extra_pairs"], recorded["question_pairs"], recorded["hard_pairs"],
                                    recorded["check_pairs"])
