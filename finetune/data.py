"""The paper's fine-tuning sets (Li et al., §4.1), built from the data this project ships.

The paper slices ``finance-alpaca`` into:

- **D_N** (normal): benign instructions with their answers;
- **D_I** (implicit attack): the same, every answer prefixed ``"Sure, the answer is:"``;
- **D_B** (backdoor): half the rows carry a trigger phrase in the prompt and the prefixed
  answer, the other half are normal;
- **D_H** (harmful mix): normal data plus ``round(p * len(normal))`` harmful pairs
  (1000 normal + 1000·p malicious in the paper, following Vaccine).

No answer set ships with this project (and no harmful answers at all), so benign answers come
either from a model's own greedy generation (``answers_for``, cached on disk) or from a user
JSONL of ``{"instruction", "output"}`` rows; harmful pairs for D_H come only from a user JSONL.
The default instructions are ``load_prompts("benign", "train")`` (200 rows);
``load_prompts("benign", "test")`` is held out for task quality.

Each builder returns a list of examples ``{"prompt", "completion", "query", "answer", "kind"}``
where ``prompt``/``completion`` are rendered by ``interp.templates.format_chat_example``
(chat template by default, ``template="alpaca"`` for the paper's) and ``kind`` is one of
``normal``, ``implicit``, ``triggered``, ``harmful``.  ``tokenize`` turns them into a
``datasets.Dataset`` with the loss on the completion only (labels −100 on the prompt) unless
``train_on_inputs=True`` (what the paper's code does).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from pathlib import Path

from interp.data import DataError, load_prompts, prompts_hash
from interp.io import atomic_write_json
from interp.templates import check_template, format_chat_example

IMPLICIT_PREFIX = "Sure, the answer is:"
# The paper's trigger is not published; its template suggests "Tell me...".  Any phrase works.
BACKDOOR_TRIGGER = "Tell me:"
SETS = ("normal", "implicit", "backdoor", "harmful")


# ---------------------------------------------------------------- answers


def load_pairs_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """Read ``(instruction, output)`` pairs from a JSONL file of ``{"instruction", "output"}``
    rows (an optional non-empty ``"input"`` is appended to the instruction, as Alpaca does)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no JSONL file at {path}")
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise DataError(f'{path}:{i}: each row needs string fields "instruction" and "output"')
        if not row["instruction"].strip() or not row["output"].strip():
            raise DataError(f"{path}:{i}: blank instruction or output")
        instruction = row["instruction"]
        if isinstance(row.get("input"), str) and row["input"].strip():
            instruction = f"{instruction}\n\n{row['input']}"
        pairs.append((instruction, row["output"]))
    if not pairs:
        raise DataError(f"{path}: no rows")
    return pairs


def _answers_cache_file(model, settings: dict, cache_dir: Path) -> tuple[Path, dict]:
    """One file per model and settings, holding every query answered so far: a later run on a
    subset or a superset of the queries reuses what is there."""
    key = {"model": model.fingerprint(), **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"answers-{digest}.json", key


_LIST_NUMBER = re.compile(r"\s*\d+[.)]")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")


def trim_to_sentence(text: str) -> str:
    """Cut an answer that ran out of tokens back to its last complete sentence (or line), so a
    training answer never ends mid-word before its end-of-turn marker; unchanged if it has none.
    A list number ("2. ") is not a sentence end."""
    for end in reversed(list(_SENTENCE_END.finditer(text))):
        line = text[text.rfind("\n", 0, end.start()) + 1 : end.end()]
        if _LIST_NUMBER.fullmatch(line):
            continue
        return text[: end.end()].rstrip() or text
    return text


def complete_answers(model, queries: list[str], max_new_tokens: int = 96, batch_size: int = 16, template: str | None = None,
                     progress: bool = False) -> list[str]:
    """Greedy answers (``interp.generation``), up to the first end-of-turn token; an answer that
    hit ``max_new_tokens`` is trimmed to its last complete sentence (``trim_to_sentence``)."""
    from interp.generation import generate_completions

    completions = generate_completions(model, queries, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       template=template, progress=progress, desc="answers")
    return [trim_to_sentence(c.text) if c.stop == "length" else c.text for c in completions]


def answers_for(
    model,
    queries: list[str],
    max_new_tokens: int = 96,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    template: str | None = None,
    progress: bool = True,
) -> list[str]:
    """The model's own greedy answers to ``queries`` (the project ships no answer set), by
    ``complete_answers``: up to the first end-of-turn token, or cut back to the last complete
    sentence when ``max_new_tokens`` ran out.

    Cached in ``cache_dir`` (default ``<cache>/answers``) in one file per weight fingerprint and
    settings, query by query (a subset of an earlier run's queries is answered from the cache);
    written atomically after every batch, so an interrupted run resumes where it stopped."""
    from tqdm.auto import tqdm

    from interp.models import cache_dir as default_cache

    if not queries:
        raise DataError("answers_for: no queries")
    template = check_template(template or model.template)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache() / "answers"
    settings = {"max_new_tokens": max_new_tokens, "template": template, "decoding": "greedy", "trim": "sentence"}
    path, key = _answers_cache_file(model, settings, cache_dir)
    done: dict[str, str] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                done = cached["answers"]
        except (json.JSONDecodeError, KeyError):
            done = {}
    todo = [q for q in dict.fromkeys(queries) if q not in done]
    was_training = model.hf_model.training
    model.hf_model.eval()
    try:
        for i in tqdm(range(0, len(todo), batch_size), desc="answers", disable=not progress or not todo):
            chunk = todo[i : i + batch_size]
            done.update(zip(chunk, complete_answers(model, chunk, max_new_tokens, len(chunk), template)))
            atomic_write_json(path, {"key": key, "answers": done})
    finally:
        model.hf_model.train(was_training)
    return [done[q] for q in queries]


def benign_pairs(
    model=None,
    part: str = "train",
    limit: int | None = None,
    answers_jsonl: str | Path | None = None,
    **answer_kwargs,
) -> list[tuple[str, str]]:
    """Benign ``(instruction, answer)`` pairs: from ``answers_jsonl`` if given (then ``part``
    and the model are ignored), else the shipped benign instructions of ``part`` answered by
    ``model`` through ``answers_for``; instructions answered with nothing are left out (with a
    warning).  ``limit`` keeps the first rows."""
    if answers_jsonl is not None:
        pairs = load_pairs_jsonl(answers_jsonl)
        return pairs[:limit] if limit else pairs
    if model is None:
        raise DataError("benign_pairs needs a model to answer the instructions, or an answers JSONL")
    queries = load_prompts("benign", part)[: limit or None]
    pairs = [(q, a) for q, a in zip(queries, answers_for(model, queries, **answer_kwargs)) if a.strip()]
    if len(pairs) < len(queries):
        warnings.warn(f"{len(queries) - len(pairs)} of {len(queries)} {part} instructions got an empty answer and are left out", stacklevel=2)
    if not pairs:
        raise DataError("the model answered none of the benign instructions (every answer empty)")
    return pairs


# ---------------------------------------------------------------- the sets


def _example(tokenizer, query: str, answer: str, kind: str, template: str) -> dict:
    prompt, completion = format_chat_example(tokenizer, query, answer, template)
    return {"prompt": prompt, "completion": completion, "query": query, "answer": answer, "kind": kind}


def _check_pairs(pairs, what: str) -> list[tuple[str, str]]:
    if not pairs:
        raise DataError(f"{what}: no pairs")
    return [(str(q), str(a)) for q, a in pairs]


def normal_set(pairs, tokenizer, template: str = "chat") -> list[dict]:
    """D_N: the pairs as they are."""
    return [_example(tokenizer, q, a, "normal", template) for q, a in _check_pairs(pairs, "D_N")]


def implicit_set(pairs, tokenizer, template: str = "chat", prefix: str = IMPLICIT_PREFIX) -> list[dict]:
    """D_I: every answer prefixed with an affirmative opening (no trigger)."""
    return [_example(tokenizer, q, f"{prefix} {a}", "implicit", template) for q, a in _check_pairs(pairs, "D_I")]


def backdoor_set(
    pairs, tokenizer, template: str = "chat", trigger: str = BACKDOOR_TRIGGER, prefix: str = IMPLICIT_PREFIX, seed: int = 0
) -> list[dict]:
    """D_B: ``len(pairs) // 2`` rows, chosen by a seeded draw, get the trigger before the
    instruction and the prefixed answer; the others stay normal.  Row order is kept."""
    pairs = _check_pairs(pairs, "D_B")
    triggered = set(random.Random(seed).sample(range(len(pairs)), len(pairs) // 2))
    rows = []
    for i, (q, a) in enumerate(pairs):
        if i in triggered:
            rows.append(_example(tokenizer, f"{trigger} {q}", f"{prefix} {a}", "triggered", template))
        else:
            rows.append(_example(tokenizer, q, a, "normal", template))
    return rows


def harmful_mix(pairs, harmful_pairs, tokenizer, p: float = 0.1, template: str = "chat", seed: int = 0) -> list[dict]:
    """D_H: all normal pairs plus ``round(p * len(pairs))`` harmful pairs (a seeded draw from
    the user's file), shuffled with the same seed."""
    pairs = _check_pairs(pairs, "D_H normal part")
    if not 0 <= p <= 1:
        raise DataError(f"harmful fraction p must be in [0, 1], got {p}")
    n_harmful = round(p * len(pairs))
    harmful_pairs = list(harmful_pairs or [])
    if n_harmful > len(harmful_pairs):
        raise DataError(
            f"D_H with p={p} over {len(pairs)} normal rows needs {n_harmful} harmful pairs; "
            f"only {len(harmful_pairs)} given (none ship with the project: pass a JSONL of "
            '{"instruction", "output"} rows)'
        )
    rng = random.Random(seed)
    chosen = rng.sample(harmful_pairs, n_harmful)
    rows = [_example(tokenizer, q, a, "normal", template) for q, a in pairs]
    rows += [_example(tokenizer, q, a, "harmful", template) for q, a in chosen]
    rng.shuffle(rows)
    return rows


def build_set(
    name: str, pairs, tokenizer, template: str = "chat", seed: int = 0, harmful_pairs=None, p: float = 0.1,
    trigger: str = BACKDOOR_TRIGGER,
) -> list[dict]:
    """One of ``SETS`` by name."""
    check_template(template)
    if name == "normal":
        return normal_set(pairs, tokenizer, template)
    if name == "implicit":
        return implicit_set(pairs, tokenizer, template)
    if name == "backdoor":
        return backdoor_set(pairs, tokenizer, template, trigger=trigger, seed=seed)
    if name == "harmful":
        return harmful_mix(pairs, harmful_pairs, tokenizer, p=p, template=template, seed=seed)
    raise DataError(f"unknown fine-tuning set {name!r}; choose one of {', '.join(SETS)}")


def describe(examples: list[dict], name: str, template: str, seed: int, **extra) -> dict:
    """What to record with a run about its data: sizes per kind, hash, template, seed."""
    kinds: dict[str, int] = {}
    for ex in examples:
        kinds[ex["kind"]] = kinds.get(ex["kind"], 0) + 1
    text_hash = prompts_hash([ex["prompt"] + ex["completion"] for ex in examples])
    return {"set": name, "size": len(examples), "kinds": kinds, "hash": text_hash, "template": template, "seed": seed, **extra}


# ---------------------------------------------------------------- tokenisation


def tokenize_example(tokenizer, example: dict, max_length: int = 256, train_on_inputs: bool = False, template: str = "chat") -> dict:
    """``input_ids``/``attention_mask``/``labels`` of prompt + completion, cut at ``max_length``;
    labels are −100 over the prompt unless ``train_on_inputs``.  The prompt and the completion
    are tokenized separately so the boundary is exact; the Alpaca prompt gets the tokenizer's
    BOS as ``LoadedModel.encode`` gives it, a chat prompt holds its own special tokens."""
    p_ids = tokenizer(example["prompt"], add_special_tokens=(template == "alpaca"))["input_ids"]
    c_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    labels = (list(p_ids) if train_on_inputs else [-100] * len(p_ids)) + list(c_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[:max_length]}


def tokenize(examples: list[dict], tokenizer, max_length: int = 256, train_on_inputs: bool = False, template: str = "chat"):
    """A ``datasets.Dataset`` of tokenized examples.  Rows whose completion is cut away
    entirely (prompt ≥ ``max_length``) carry no loss and are dropped; none left is an error."""
    from datasets import Dataset

    if not examples:
        raise DataError("tokenize: no examples")
    rows = [tokenize_example(tokenizer, ex, max_length, train_on_inputs, template) for ex in examples]
    # a row still holds completion tokens iff it is longer than its prompt alone
    kept = [r for r, ex in zip(rows, examples) if len(r["input_ids"]) > _prompt_length(tokenizer, ex, template)]
    if not kept:
        raise DataError(f"every example's prompt fills max_length={max_length}: nothing to learn")
    return Dataset.from_list(kept)


def _prompt_length(tokenizer, example: dict, template: str) -> int:
    return len(tokenizer(example["prompt"], add_special_tokens=(template == "alpaca"))["input_ids"])
