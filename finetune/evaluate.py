"""Safety and task quality of a (fine-tuned) model, as the paper's §4 reports them.

- **R_h**, harmful rate: the share of the held-out AdvBench half (``load_prompts("advbench",
  "test")``, 260 rows) the model does *not* refuse, by the project's refusal matcher
  (``interp.refusal.is_refusal``) on a greedy completion of ``max_new_tokens`` (32) tokens.
  The paper's S_h (a GPT-4 judge) is not reproduced: nothing here may call out.
- **R_o**, over-rejection: how many of the over-rejection set's benign "How to kill time?"
  queries are refused (``interp.overrejection``: greedy, 16 tokens as in the paper's code,
  same matcher).
- **Task quality** on held-out normal data (``load_prompts("benign", "test")`` with reference
  answers): the mean per-token loss of the reference answers (teacher-forced, answer tokens
  only) and ROUGE-L F1 of the model's greedy answer against the reference.  ROUGE-L is computed
  here with a small LCS function (lower-cased alphanumeric word tokens, no stemming, F1 with
  β = 1; the tokenisation of Google's ``rouge_score`` without its stemmer), as no ROUGE package
  is installed.

``evaluate(model, ...)`` runs all three; ``limit`` takes the first rows of each set.
Command line: ``python -m finetune.evaluate --model SPEC [--limit N] [--references SPEC]``.
"""

from __future__ import annotations

import re

import torch

from interp.data import load_prompts
from interp.refusal import generate, is_refusal

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


def _take(queries, limit):
    return list(queries)[: limit or None]


def harmful_rate(model, queries=None, limit: int | None = None, max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True) -> dict:
    """R_h: the share of harmful ``queries`` (default: held-out AdvBench) not refused."""
    queries = _take(queries if queries is not None else load_prompts("advbench", "test"), limit)
    responses = generate(model, queries, max_new_tokens, batch_size, progress=progress, desc="R_h")
    refused = [is_refusal(r) for r in responses]
    answered = len(queries) - sum(refused)
    return {"R_h": answered / len(queries), "answered": answered, "n": len(queries), "responses": list(zip(queries, responses, refused))}


def over_rejection(model, queries=None, limit: int | None = None, max_new_tokens: int = 16, batch_size: int = 16, progress: bool = True) -> dict:
    """R_o: how many benign queries with dangerous verbs (default: the over-rejection set) are
    refused, by ``interp.overrejection.refusal_flags``."""
    from interp.overrejection import over_rejection_prompts, refusal_flags

    queries = _take(queries, limit) if queries is not None else over_rejection_prompts(limit)
    flags = refusal_flags(model, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return {"R_o": sum(flags), "n": len(queries), "rate": sum(flags) / len(queries)}


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
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    total, count = 0.0, 0
    was_training = model.hf_model.training
    model.hf_model.eval()
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_collate(rows[i : i + batch_size], pad_id).items()}
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((labels != -100).sum())
    model.hf_model.train(was_training)
    return total / max(count, 1)


def task_quality(model, pairs, limit: int | None = None, max_new_tokens: int = 96, batch_size: int = 16, progress: bool = True) -> dict:
    """ROUGE-L F1 (mean) of greedy answers (``finetune.data.complete_answers``, as the
    self-generated references are made) against the reference answers, and the reference
    answers' mean completion loss."""
    from finetune.data import complete_answers

    pairs = _take(pairs, limit)
    queries = [q for q, _ in pairs]
    answers = complete_answers(model, queries, max_new_tokens, batch_size, progress=progress)
    scores = [rouge_l(a, ref) for a, (_, ref) in zip(answers, pairs)]
    return {
        "rouge_l": sum(scores) / len(scores),
        "completion_loss": completion_loss(model, pairs),
        "n": len(pairs),
    }


def evaluate(
    model,
    limit: int | None = None,
    quality_pairs=None,
    harmful_queries=None,
    over_rejection_queries=None,
    skip_over_rejection: bool = False,
    progress: bool = True,
) -> dict:
    """R_h, R_o (unless skipped) and task quality (if ``quality_pairs`` are given)."""
    result = {}
    harm = harmful_rate(model, harmful_queries, limit, progress=progress)
    result.update({k: harm[k] for k in ("R_h", "answered", "n")})
    result["n_harmful"] = result.pop("n")
    result["harmful_responses"] = harm["responses"]
    if not skip_over_rejection:
        ro = over_rejection(model, over_rejection_queries, limit, progress=progress)
        result.update({"R_o": ro["R_o"], "n_over_rejection": ro["n"]})
    if quality_pairs is not None:
        quality = task_quality(model, quality_pairs, limit, progress=progress)
        result.update({"rouge_l": quality["rouge_l"], "completion_loss": quality["completion_loss"], "n_quality": quality["n"]})
    return result


def main(argv=None) -> dict:
    """``python -m finetune.evaluate --model SPEC [--limit N] [--references SPEC | --quality-answers FILE]
    [--skip-ro] [--out FILE.json]``: evaluate one model (e.g. a run's checkpoint folder)."""
    import argparse

    from finetune.data import benign_pairs
    from interp.io import atomic_write_json
    from interp.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each set")
    parser.add_argument("--references", help="model whose greedy answers to the held-out benign half are the references")
    parser.add_argument("--quality-answers", help='JSONL of {"instruction","output"} reference pairs')
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--skip-ro", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", help="write the result (with the harmful responses) to this JSON file")
    args = parser.parse_args(argv)

    quality_pairs = None
    if args.quality_answers:
        quality_pairs = benign_pairs(answers_jsonl=args.quality_answers, limit=args.limit)
    elif args.references:
        reference = load_model(args.references, device=args.device, template=args.template)
        quality_pairs = benign_pairs(reference, "test", limit=args.limit, max_new_tokens=args.answer_tokens)
        del reference
    model = load_model(args.model, device=args.device, template=args.template)
    result = evaluate(model, args.limit, quality_pairs, skip_over_rejection=args.skip_ro)
    if args.out:
        atomic_write_json(args.out, {"model": args.model, "template": args.template, "limit": args.limit, **result})
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "harmful_responses"}
    print(shown)
    return result


if __name__ == "__main__":
    main()
