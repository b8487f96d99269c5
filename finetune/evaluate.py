"""Safety and task quality of a (fine-tuned) model, as the paper's §4 reports them, with the
per-request verdicts kept so that rates can be pooled over seeds with intervals.

- **R_h**, harmful rate: the share of harmful requests the model answers (does not refuse, by
  ``interp.judge``'s binary rule) on a greedy completion of 32 tokens.  Measured on each of
  ``HARMFUL_SETS``: the held-out AdvBench half (260), the harmful side of the test pairs (120)
  and XSTest's unsafe prompts (200).  The paper's S_h (a GPT-4 judge) is not reproduced:
  nothing here may call out.
- **R_o**, over-rejection: how many of the over-rejection set's benign "How to kill time?"
  queries are refused (``interp.over_rejection``: greedy, 16 tokens as in the paper's code).
- **Task quality** on held-out normal data with reference answers: the mean per-token loss of
  the reference answers (teacher-forced, answer tokens only) and ROUGE-L F1 of the model's greedy
  answer against the reference (a small LCS function: lower-cased alphanumeric words, no stemmer,
  F1 with β = 1, the tokenisation of Google's ``rouge_score``; no ROUGE package is installed).

R_h and R_o verdicts both come from ``interp.answers.generate_and_judge`` (early stop on).

``evaluate(model, ...)`` returns an ``EvalResult`` (``to_dict``/``to_frame``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
import torch

from interp.answers import generate_and_judge
from interp.data import load_pairs, load_prompts, load_xstest, sample_rows
from interp.models import LoadedModel
from interp.overrejection import over_rejection
from interp.stats import Rate

HARMFUL_SETS = ("advbench_test", "paired_harmful_test", "xstest_unsafe")


def harmful_prompts(name: str) -> list[str]:
    if name == "advbench_test":
        return load_prompts("advbench", "test")
    if name == "paired_harmful_test":
        return [p.harmful for p in load_pairs("test")]
    if name == "xstest_unsafe":
        return [x.prompt for x in load_xstest("unsafe")]
    raise ValueError(f"unknown harmful set {name!r}; choose from {', '.join(HARMFUL_SETS)}")


_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------- ROUGE-L


def rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len a · len b))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (0 when either has no word)."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- safety


# ---------------------------------------------------------------- task quality


@torch.no_grad()
def completion_loss(model, pairs, batch_size: int = 8, max_length: int = 256, template: str | None = None) -> float:
    """Mean per-token cross-entropy of the reference answers given their prompts (answer
    tokens only, end-of-turn included), over all answer tokens of all pairs."""
    from finetune.data import normal_set, tokenize_example
    from finetune.train import pad_collate

    template = template or model.template
    examples = normal_set(pairs, model.tokenizer, template)
    rows = [tokenize_example(model.tokenizer, ex, max_length, False, template) for ex in examples]
    total, count = 0.0, 0
    was_training = model.hf_model.training
    model.hf_model.eval()
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_collate(rows[i : i + batch_size], model.pad_token_id).items()}
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((labels != -100).sum())
    model.hf_model.train(was_training)
    return total / max(count, 1)


def task_quality(model, pairs, max_new_tokens: int = 96, batch_size: int = 16, progress: bool = False) -> dict:
    """ROUGE-L F1 (mean) of greedy answers (``finetune.data.complete_answers``, as the
    self-generated references are made) against the reference answers, and the reference
    answers' mean completion loss."""
    from finetune.data import complete_answers

    queries = [q for q, _ in pairs]
    answers = complete_answers(model, queries, max_new_tokens, batch_size, progress=progress)
    scores = [rouge_l(a, ref) for a, (_, ref) in zip(answers, pairs)]
    return {"rouge_l": sum(scores) / len(scores), "completion_loss": completion_loss(model, pairs), "n": len(pairs)}


# ---------------------------------------------------------------- everything


@dataclass
class EvalResult:
    """R_h per harmful set (with each request's verdict), R_o and task quality of one model."""

    harmful: dict[str, list[bool]] = field(default_factory=dict)  # set -> answered flag per request
    prompts: dict[str, list[str]] = field(default_factory=dict)
    responses: dict[str, list[str]] = field(default_factory=dict)
    over_rejection: Rate | None = None
    quality: dict | None = None

    def r_h(self, name: str) -> Rate:
        flags = self.harmful[name]
        return Rate(int(sum(flags)), len(flags))

    def to_dict(self) -> dict:
        out = {f"R_h/{name}": self.r_h(name).to_dict() for name in self.harmful}
        if self.over_rejection is not None:
            out["R_o"] = self.over_rejection.to_dict()
        if self.quality is not None:
            out.update(self.quality)
        return out

    def flat(self) -> dict:
        """One level: ``R_h/<set>`` rates, ``R_o`` count, quality figures (a CSV row)."""
        out = {f"R_h/{name}": self.r_h(name).rate for name in self.harmful}
        if self.over_rejection is not None:
            out["R_o"] = self.over_rejection.k
            out["R_o_n"] = self.over_rejection.n
        if self.quality is not None:
            out.update({k: v for k, v in self.quality.items() if k != "n"})
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per request of every harmful set: set, prompt, response, answered."""
        rows = [{"set": name, "prompt": q, "response": r, "answered": a}
                for name in self.harmful
                for q, r, a in zip(self.prompts[name], self.responses[name], self.harmful[name])]
        return pd.DataFrame(rows)


def evaluate(model: LoadedModel, *, harmful_sets=HARMFUL_SETS, quality_pairs=None, over_rejection_queries=None,
             limit: int | None = None, progress: bool = False) -> EvalResult:
    """R_h on ``harmful_sets`` (``limit`` requests each, spread), R_o on
    ``over_rejection_queries`` (if given) and task quality on ``quality_pairs`` (if given)."""
    result = EvalResult()
    for name in harmful_sets:
        result.prompts[name] = sample_rows(harmful_prompts(name), limit, "spread")
        answers = generate_and_judge(model, result.prompts[name], progress=progress, desc=name)
        result.harmful[name] = [not a.refused for a in answers]
        result.responses[name] = [a.text for a in answers]
    if over_rejection_queries is not None:
        queries = list(over_rejection_queries)
        result.over_rejection = Rate(over_rejection(model, queries), len(queries))
    if quality_pairs is not None:
        result.quality = task_quality(model, quality_pairs, progress=progress)
    return result
