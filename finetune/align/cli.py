"""``python -m finetune.align``: run the recipe, choose the adapter on validation, write its record.

Stages are kept under ``<out>-parts/`` (checkpoints, validation log, record) and reused when their
settings match, so an interrupted run resumes.  ``--out`` receives the chosen adapter, its
``recipe.json`` (every setting, the data hashes, every validation score, the check record) and its
card; ``--ship`` copies it into ``interp/weights/`` (what the repository commits).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import finetune.align as package
from analyses.cli import positive_int
from finetune.align.adapters import combine_adapters, merged_model
from finetune.align.card import adapter_card
from finetune.align.data import RowChoice, candidate_prompts, training_prompts
from finetune.align.scores import RECIPE_JUDGE, check_record, validation_scores
from finetune.align.stages import best_checkpoint, dpo_stage, sft_stage, stage_record
from interp.data import prompts_hash, sample_rows
from interp.models import ALIGNED_ADAPTER, EMBEDDED_NAME, PACKAGE_WEIGHTS, cache_dir, load_model

METHODS = ("sft", "sft+dpo")
SFT_SETTINGS = ("epochs", "lr", "rank", "answer_tokens", "sft_answer_tokens", "pair_weight", "extra_pairs",
                "question_pairs", "hard_pairs", "check_pairs", "seed", "base", "limit")
"""What stage 1 depends on: a finished stage is reused only when these match."""
DPO_SETTINGS = SFT_SETTINGS + ("dpo_epochs", "dpo_lr", "beta", "dpo_eval_every", "dpo_refuse_weight")
SELECTION = ("per stage, the epoch with the best mean of the three validation rates; then the stage with the better "
             "best epoch (ties: sft). No test half, D_o or XSTest prompt is used.")


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped recipe (a test holds them to ``recipe.json``)."""
    shipped = RowChoice()
    parser = argparse.ArgumentParser(prog="python -m finetune.align", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=cache_dir() / ALIGNED_ADAPTER)
    parser.add_argument("--method", default="sft", choices=METHODS)
    parser.add_argument("--epochs", type=int, default=3, help="stage-1 epochs (each one validated)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dpo-epochs", type=int, default=1)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-refuse-weight", type=int, default=1,
                        help="how many times each harmful (refuse) pair appears in the DPO data")
    parser.add_argument("--dpo-eval-every", type=int, default=26,
                        help="validate (and checkpoint) the DPO stage every N steps; 0: once per epoch")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--pair-weight", type=int, default=3,
                        help="how many times each paired train row (both sides) appears in the SFT data")
    parser.add_argument("--sft-answer-tokens", type=int, default=16,
                        help="SFT on the first N tokens of each answer only (cut_answer); 0: whole answers")
    parser.add_argument("--extra-pairs", action=argparse.BooleanOptionalAction, default=shipped.extra_pairs,
                        help="train on the supplementary train-only pairs too (paired_prompts_extra.csv)")
    parser.add_argument("--question-pairs", action=argparse.BooleanOptionalAction, default=shipped.question_pairs,
                        help="train on the question-frame pairs' train split and validate on their validation split "
                             "too (paired_questions.csv)")
    parser.add_argument("--hard-pairs", action=argparse.BooleanOptionalAction, default=shipped.hard_pairs,
                        help="train on the train-only hard-benign-twin pairs too (paired_prompts_hard.csv: the benign "
                             "side keeps the harmful side's alarming words)")
    parser.add_argument("--check-pairs", type=int, default=shipped.check_pairs,
                        help="hold N supplementary pairs out of training and score the chosen adapter on them once, "
                             "after every choice (check_pairs: an estimate free of the validation's winner's curse)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="embedded-base", help="the model to align (a tiny one for tests)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="N prompts per role and validation set (smoke test)")
    parser.add_argument("--ship", action="store_true", help="copy the adapter into interp/weights/ (committed)")
    return parser


def main(argv=None):
    from finetune.data import answers_for
    from interp.io import atomic_write_json, atomic_write_text
    from interp.provenance import versions

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ship and (args.base != "embedded-base" or args.limit is not None):
        parser.error("--ship ships only the full recipe on embedded-base")
    choice = RowChoice(args.extra_pairs, args.question_pairs, args.hard_pairs, args.check_pairs)
    try:
        candidates = candidate_prompts(choice)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.time()
    torch.set_grad_enabled(True)
    parts = Path(f"{args.out}-parts")

    kept = training_prompts(choice)
    prompts = {role: sample_rows(rows, args.limit, "spread") for role, rows in kept.items()}
    base = load_model(args.base, device="cpu", bridge=False)
    answers = dict(zip(prompts["answer"], answers_for(base, prompts["answer"], max_new_tokens=args.answer_tokens)))
    base_scores = validation_scores(base, args.limit, args.question_pairs)
    print(f"validation of the base model: {base_scores}", flush=True)

    sft_settings = {k: getattr(args, k) for k in SFT_SETTINGS}
    sft = stage_record(parts / "sft", sft_settings)
    if sft is None:
        sft = {"settings": sft_settings, **sft_stage(
            base, prompts, answers, parts / "sft", validate=lambda: validation_scores(base, args.limit, args.question_pairs),
            epochs=args.epochs, lr=args.lr, rank=args.rank, seed=args.seed, pair_weight=args.pair_weight,
            answer_tokens=args.sft_answer_tokens)}
        atomic_write_json(parts / "sft" / "record.json", sft)
    stages = {"sft": sft}
    if args.method == "sft+dpo":
        dpo_settings = {k: getattr(args, k) for k in DPO_SETTINGS}
        dpo = stage_record(parts / "dpo", dpo_settings)
        if dpo is None:
            stage1 = merged_model(args.base, parts / "sft" / "adapter")
            harmful = prompts["refuse"]
            base_answers = dict(zip(harmful, answers_for(base, harmful, max_new_tokens=args.answer_tokens)))
            dpo = {"settings": dpo_settings, **dpo_stage(
                stage1, prompts, answers, base_answers, parts / "dpo",
                validate=lambda: validation_scores(stage1, args.limit, args.question_pairs),
                epochs=args.dpo_epochs, lr=args.dpo_lr, beta=args.beta, rank=args.rank, seed=args.seed,
                refuse_weight=args.dpo_refuse_weight, eval_every=args.dpo_eval_every)}
            atomic_write_json(parts / "dpo" / "record.json", dpo)
        stages["dpo"] = dpo

    best = {name: best_checkpoint(stage["validation"])["score"] for name, stage in stages.items()}
    chosen = max(best, key=lambda name: (best[name], name == "sft"))  # ties: the simpler method
    shutil.rmtree(args.out, ignore_errors=True)
    if chosen == "sft":
        shutil.copytree(parts / "sft" / "adapter", args.out)
    else:
        combine_adapters(load_model(args.base, device="cpu", bridge=False).hf_model,
                         [parts / "sft" / "adapter", parts / "dpo" / "adapter"], [1.0, 1.0], args.out)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    check = check_record(merged_model(args.base, args.out), args.check_pairs) if args.check_pairs else None
    if check:
        print(f"check rows ({args.check_pairs} held-out train pairs, after the choice): {check}", flush=True)
    record = {
        "base_model": EMBEDDED_NAME,
        "recipe": "python -m finetune.align " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": "sft" if chosen == "sft" else "sft+dpo",
        "settings": vars(args) | {"out": str(args.out)},
        "data": {role: {"n": len(q), "hash": prompts_hash(q),
                        "dropped_near_copies": len(candidates[role]) - len(kept[role])} for role, q in prompts.items()},
        "validation_base": base_scores,
        "selection": SELECTION,
        "judge": RECIPE_JUDGE.describe(),  # what every validation and check score was judged by
        "best_validation": best,
        "check": check,
        "stages": {name: {k: v for k, v in stage.items() if k != "history"} for name, stage in stages.items()},
        "adapter_bytes": size,
        "seconds_total": round(time.time() - start, 1),  # this run's; a resumed run reuses finished stages
        "train_seconds": round(sum(row.get("train_runtime", 0) for stage in stages.values()
                                   for row in stage.get("history", [])), 1),
        "versions": versions(),
    }
    atomic_write_json(args.out / "recipe.json", record)
    atomic_write_text(args.out / "README.md", adapter_card(record))  # replaces PEFT's empty template
    print(f"adapter ({record['method']}, {size / 1e6:.1f} MB) written to {args.out} in {record['seconds_total']:.0f} s")
    if args.ship:
        target = PACKAGE_WEIGHTS / ALIGNED_ADAPTER
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(args.out, target)
        print(f"copied to {target}")
