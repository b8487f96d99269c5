"""The safety-alignment recipe that makes the shipped ``embedded`` model from SmolLM2-135M-Instruct.

The original SmolLM2-135M-Instruct answers most harmful requests, so the paper's phenomena (which
live in *aligned* models) cannot be studied on it directly.  This recipe aligns it offline, on two
CPU cores, so that its refusals follow **harm, not wording**: harmful requests are trained to a
refusal, benign requests written in the same sentence frames (and borderline-safe ones) to the
base model's own answer.

- ``finetune.align.data``: the rows by role, the validation and check rows, the held-out prompts
  no training row may nearly copy, and the SFT and DPO rows built from them;
- ``finetune.align.scores``: the validation score every choice is made on, and the check record;
- ``finetune.align.stages``: stage 1 (SFT of a LoRA adapter) and stage 2 (DPO on top of it), each
  validated as it trains and resumable;
- ``finetune.align.adapters``: float16 adapter files, the exact sum of both stages' adapters
  (PEFT's ``add_weighted_adapter(combination_type="cat")``, ranks added), merging;
- ``finetune.align.card``: the model card written from ``recipe.json``;
- ``finetune.align.cli``: ``python -m finetune.align [--method sft+dpo] [--ship]``, whose defaults
  are the shipped recipe.

**Choosing knobs on the validation split only.**  Each stage keeps its checkpoint with the best
mean of three validation rates (paired validation harmful refused, paired validation benign
answered, borderline validation answered; greedy, the project judge); the method is the stage
whose best checkpoint scores higher (ties: SFT).  Every score is recorded in ``recipe.json``.  The
best of several noisy scores over-estimates the adapter it picks, so ``--check-pairs N`` holds N
supplementary train pairs out of training and scores the chosen adapter on them once, after the
choice (``recipe.json``'s ``check``).  Never trained on and never used to choose anything: the
test halves and test pairs, D_o and XSTest.
"""
