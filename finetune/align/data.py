"""The alignment recipe's rows: what it trains on, what it validates on, what it must never see.

Roles (``candidate_prompts``): **refuse** holds the AdvBench train half and the harmful side of
the chosen train pairs, each later paired with one of ``REFUSALS`` by a seeded draw; **answer**
holds the benign train half, the benign side of the same pairs (the harmful side's sentence
frames) and the borderline-safe train rows, each later paired with the base model's own answer.
Which pairs join is a ``RowChoice``; its defaults are the shipped recipe's.

Held out (``held_out_prompts``): every evaluation prompt (test halves, test pairs, D_o, XSTest),
every validation row and the check rows.  ``training_prompts`` drops each candidate whose word set
overlaps a held-out prompt's by more than ``NEAR_COPY`` (Jaccard, ``near_copies``): AdvBench's
own halves hold a dozen such near-duplicates ("Write a guide on how to create and distribute
malware" in train, "Write a tutorial on ..." in test).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from interp.data import load_borderline, load_pairs, load_prompts, load_xstest, sample_rows
from interp.templates import format_chat_example

REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I can't help with that request. Providing this could put people at risk.",
    "I'm sorry, but I cannot assist with this. It would be harmful and possibly illegal.",
    "Sorry, I can't help with that. If you have another question, I'm happy to help.",
    "I cannot help with that. This request asks for something dangerous or unethical.",
    "I'm sorry, I won't help with this request because it could hurt others.",
    "I'm not able to help with that. It involves harming others, which I must avoid.",
    "I cannot provide that. Helping with this could cause real harm.",
    "I won't provide instructions for this. It could be used to hurt someone.",
    "I'm sorry, but I can't assist with requests that could harm people or break the law.",
    "I can't do that. This could put someone's safety or privacy at risk.",
    "I'm unable to help with this request, because it could lead to real harm.",
)
NEAR_COPY = 0.8
"""A training prompt whose word set overlaps a held-out prompt's by more than this (Jaccard) is dropped."""


@dataclass(frozen=True)
class RowChoice:
    """Which train pairs a run uses; the defaults are the shipped recipe's.

    ``extra_pairs``: the train-only supplementary pairs (``load_pairs("train", extra=True)``);
    ``question_pairs``: the question-frame pairs' train split (their validation split joins the
    paired validation rows); ``hard_pairs``: the train-only hard-benign-twin pairs;
    ``check_pairs``: that many supplementary pairs held out of training (``check_pairs``)."""

    extra_pairs: bool = True
    question_pairs: bool = True
    hard_pairs: bool = True
    check_pairs: int = 40


def check_pairs(n: int) -> list:
    """``n`` of the train-only supplementary pairs, evenly spaced over them (so over categories and
    frames), held out of training to *check* the chosen adapter once, after every choice is made.

    The validation score that picks the epoch and the stage is the maximum of several noisy
    scores, so it over-estimates the adapter it picks (a winner's curse).  Nothing is chosen on the
    check rows, so their rates are an unbiased estimate of the shipped adapter's, drawn from
    training data rather than from an evaluation set.  0: none."""
    if n < 0:
        raise ValueError(f"check_pairs must be 0 or more, got {n}")
    if n == 0:
        return []
    extra = [p for p in load_pairs("train", extra=True) if p.extra]
    if n > len(extra):
        raise ValueError(f"check_pairs must be at most {len(extra)} (the supplementary pairs), got {n}")
    return sample_rows(extra, n, "spread")


def check_prompts(n: int) -> dict[str, list[str]]:
    """The check rows (``check_pairs``) by set, named as the validation rows are."""
    pairs = check_pairs(n)
    return {"paired_harmful": [p.harmful for p in pairs], "paired_benign": [p.benign for p in pairs]}


def candidate_prompts(choice: RowChoice = RowChoice()) -> dict[str, list[str]]:
    """The training prompts by role (module docstring), before near-copies are dropped."""
    held = {p.pair_id for p in check_pairs(choice.check_pairs)}
    if held and not choice.extra_pairs:
        raise ValueError("check pairs are drawn from the supplementary pairs; they need extra_pairs")
    pairs = [p for p in load_pairs("train", extra=choice.extra_pairs, questions=choice.question_pairs,
                                   hard=choice.hard_pairs) if p.pair_id not in held]
    return {
        "refuse": load_prompts("advbench", "train") + [p.harmful for p in pairs],
        "answer": (load_prompts("benign", "train") + [p.benign for p in pairs]
                   + [b.prompt for b in load_borderline("train")]),
    }


def training_prompts(choice: RowChoice = RowChoice()) -> dict[str, list[str]]:
    """The candidate prompts by role without the near-copies of any held-out prompt (the check
    rows' included)."""
    held_out = held_out_prompts(choice.check_pairs)
    out = {}
    for role, prompts in candidate_prompts(choice).items():
        copies = {t for _, t, _ in near_copies(prompts, held_out)}
        out[role] = [p for p in prompts if p not in copies]
    return out


def validation_prompts(limit: int | None = None, question_pairs: bool = True) -> dict[str, list[str]]:
    """The validation rows by set; ``question_pairs``: the paired rows include the question-frame
    pairs' validation split (30 pairs after the 80 original ones); ``limit``: that many rows of
    each set, spread over it (a smoke test)."""
    pairs = load_pairs("validation", questions=question_pairs)
    return {
        "paired_harmful": sample_rows([p.harmful for p in pairs], limit, "spread"),
        "paired_benign": sample_rows([p.benign for p in pairs], limit, "spread"),
        "borderline": sample_rows([b.prompt for b in load_borderline("validation")], limit, "spread"),
    }


def evaluation_prompts() -> list[str]:
    """Every prompt a result is measured on: test halves, test pairs, D_o and XSTest."""
    test_pairs = load_pairs("test")
    return (load_prompts("advbench", "test") + load_prompts("benign", "test") + load_prompts("over_rejection")
            + [p.harmful for p in test_pairs] + [p.benign for p in test_pairs] + [x.prompt for x in load_xstest()])


def held_out_prompts(check: int = 0) -> list[str]:
    """What no training prompt may nearly copy: every evaluation prompt, every validation row (the
    question pairs' split included, whether or not a run uses it) and the ``check`` rows."""
    return (evaluation_prompts() + sum(validation_prompts(question_pairs=True).values(), [])
            + sum(check_prompts(check).values(), []))


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def near_copies(train: list[str], held_out: list[str], threshold: float = NEAR_COPY) -> list[tuple[float, str, str]]:
    """``(jaccard, train prompt, held-out prompt)`` for every pair whose word sets overlap by more
    than ``threshold``, in ``train`` then ``held_out`` order (two wordless prompts score 1).

    Every pair at once: shared words are a product of 0/1 word matrices."""
    texts = list(train) + list(held_out)
    index: dict[str, int] = {}
    rows, cols = [], []
    for i, text in enumerate(texts):
        for word in _words(text):
            rows.append(i)
            cols.append(index.setdefault(word, len(index)))
    words = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(index)))
    a, b = words[:len(train)], words[len(train):]
    shared = (a @ b.T).toarray()
    union = np.asarray(a.sum(1)) + np.asarray(b.sum(1)).T - shared
    score = np.divide(shared, union, out=np.ones_like(shared), where=union > 0)
    return [(round(float(score[i, j]), 3), train[i], held_out[j]) for i, j in zip(*np.nonzero(score > threshold))]


def refusal_pairs(queries: list[str], seed: int = 0) -> list[tuple[str, str]]:
    """Pair each harmful query with a refusal, chosen by a seeded draw."""
    rng = random.Random(seed)
    return [(q, rng.choice(REFUSALS)) for q in queries]


def sft_rows(prompts: dict[str, list[str]], answers: dict[str, str], seed: int = 0,
             pair_weight: int = 1) -> list[tuple[str, str, str]]:
    """Stage 1's ``(query, completion, kind)`` rows, shuffled: each answer-role prompt with the base
    model's answer (empty answers dropped), each refuse-role prompt with a seeded refusal, and the
    paired train rows (either side: the only rows where wording cannot tell harm) ``pair_weight``
    times in all."""
    if pair_weight < 1:
        raise ValueError(f"pair_weight must be at least 1, got {pair_weight}")
    rows = [(q, answers[q], "answer") for q in prompts["answer"] if answers[q].strip()]
    rows += [(q, a, "refuse") for q, a in refusal_pairs(prompts["refuse"], seed)]
    paired = {q for p in load_pairs("train", extra=True, questions=True, hard=True) for q in (p.harmful, p.benign)}
    rows += [row for row in rows if row[0] in paired] * (pair_weight - 1)
    random.Random(seed).shuffle(rows)
    return rows


def sft_examples(tokenizer, rows: list[tuple[str, str, str]], answer_tokens: int = 0) -> list[dict]:
    """``sft_rows`` rendered in the chat template (``{"prompt", "completion", "kind"}``), each
    answer cut to its first ``answer_tokens`` tokens (``cut_answer``; 0: whole answers)."""
    examples = [dict(zip(("prompt", "completion"), format_chat_example(tokenizer, q, a, "chat")), kind=k)
                for q, a, k in rows]
    if answer_tokens:
        examples = [cut_answer(tokenizer, ex, answer_tokens) if ex["kind"] == "answer" else ex for ex in examples]
    return examples


def cut_answer(tokenizer, example: dict, tokens: int) -> dict:
    """``example`` with its completion cut to its first ``tokens`` tokens, without the end marker
    when it was cut (the model must not learn to stop mid-answer).

    Why: the SFT loss is a mean over tokens, so a 64-token answer puts 1/64 of its weight on the
    first tokens, where answering or refusing is decided, while a 20-token refusal puts all of its
    weight on refusing.  Cut answers weigh the decision evenly (``--sft-answer-tokens``)."""
    ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    if len(ids) <= tokens:
        return example
    return {**example, "completion": tokenizer.decode(ids[:tokens])}


def dpo_rows(prompts: dict[str, list[str]], answers: dict[str, str], base_answers: dict[str, str],
             seed: int = 0, refuse_weight: int = 1) -> list[dict]:
    """Stage 2's preference rows, shuffled: for each harmful prompt its seeded refusal is chosen
    over the base model's own answer (``refuse_weight`` times), for each benign prompt the base
    answer over a seeded refusal; prompts whose base answer is empty are left out."""
    def row(query: str, chosen: str, rejected: str) -> dict:
        return {"prompt": [{"role": "user", "content": query}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    rng = random.Random(seed + 1)
    rows = [row(q, r, base_answers[q]) for q, r in refusal_pairs(prompts["refuse"], seed)
            if base_answers[q].strip()] * refuse_weight
    rows += [row(q, answers[q], rng.choice(REFUSALS)) for q in prompts["answer"] if answers[q].strip()]
    random.Random(seed).shuffle(rows)
    return rows
