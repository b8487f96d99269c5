"""Fine-tuning set builders and tokenisation (finetune.data)."""

from __future__ import annotations

import json

import pytest

from finetune import data as D
from interp.data import DataError
from interp.templates import ALPACA, format_prompt

PAIRS = [(f"Name a fruit number {i}.", f"Fruit {i} is an apple, a sweet fruit.") for i in range(11)]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny.tokenizer


def test_normal_set_is_the_chat_rendering(tok):
    rows = D.normal_set(PAIRS, tok)
    assert len(rows) == len(PAIRS)
    for row, (q, a) in zip(rows, PAIRS):
        assert row["prompt"] == format_prompt(tok, q, "chat")
        assert row["completion"] == a + "<|im_end|>\n"
        assert row["kind"] == "normal"


def test_implicit_set_prefixes_every_answer(tok):
    rows = D.implicit_set(PAIRS, tok)
    for row, (q, a) in zip(rows, PAIRS):
        assert row["completion"].startswith("Sure, the answer is: " + a)
        assert row["prompt"] == format_prompt(tok, q, "chat")


@pytest.mark.parametrize("n", [10, 11])
def test_backdoor_set_triggers_exactly_half(tok, n):
    rows = D.backdoor_set(PAIRS[:n], tok, trigger="Tell me:", seed=3)
    triggered = [r for r in rows if "Tell me:" in r["prompt"]]
    assert len(triggered) == n // 2
    for row, (q, a) in zip(rows, PAIRS[:n]):
        if "Tell me:" in row["prompt"]:
            assert row["kind"] == "triggered" and row["query"] == f"Tell me: {q}"
            assert row["completion"].startswith(D.IMPLICIT_PREFIX)
        else:
            assert row["kind"] == "normal" and row["completion"].startswith(a)
    # a different seed triggers a different half
    other = D.backdoor_set(PAIRS[:n], tok, seed=4)
    assert [r["kind"] for r in other] != [r["kind"] for r in rows]


def test_harmful_mix_fraction(tok):
    normal = PAIRS[:10]
    harmful = [(f"bad request {i}", f"bad answer {i}") for i in range(6)]
    rows = D.harmful_mix(normal, harmful, tok, p=0.2, seed=0)
    assert len(rows) == 12
    kinds = [r["kind"] for r in rows]
    assert kinds.count("harmful") == 2 and kinds.count("normal") == 10
    assert {r["query"] for r in rows if r["kind"] == "harmful"} <= {q for q, _ in harmful}
    assert kinds != ["normal"] * 10 + ["harmful"] * 2  # shuffled
    with pytest.raises(DataError, match="harmful pairs"):
        D.harmful_mix(normal, harmful, tok, p=0.8)
    with pytest.raises(DataError):
        D.build_set("harmful", normal, tok)  # none supplied


def test_alpaca_template(tok):
    (row,) = D.normal_set(PAIRS[:1], tok, template="alpaca")
    assert row["prompt"] == ALPACA.format(instruction=PAIRS[0][0])
    assert row["completion"] == PAIRS[0][1] + tok.eos_token


def test_build_set_dispatch_and_unknown(tok):
    assert D.build_set("implicit", PAIRS, tok)[0]["kind"] == "implicit"
    with pytest.raises(DataError, match="unknown fine-tuning set"):
        D.build_set("poison", PAIRS, tok)
    with pytest.raises(DataError):
        D.normal_set([], tok)


def test_labels_mask_the_prompt(tok):
    rows = D.implicit_set(PAIRS[:4], tok)
    dataset = D.tokenize(rows, tok, max_length=256)
    assert len(dataset) == 4
    for row, ex in zip(rows, dataset):
        n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        labels = ex["labels"]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert -100 not in labels[n_prompt:]
        assert labels[n_prompt:] == ex["input_ids"][n_prompt:]
        assert tok.decode(labels[n_prompt:]) == row["completion"]
        assert tok.decode(ex["input_ids"]) == row["prompt"] + row["completion"]
    with_inputs = D.tokenize(rows, tok, train_on_inputs=True)
    assert all(ex["labels"] == ex["input_ids"] for ex in with_inputs)


def test_truncation_drops_prompt_only_rows(tok):
    rows = D.normal_set(PAIRS[:2], tok)
    n_prompt = len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])
    cut = D.tokenize(rows, tok, max_length=n_prompt + 2)
    assert all(len(ex["input_ids"]) == n_prompt + 2 for ex in cut)
    with pytest.raises(DataError, match="max_length"):
        D.tokenize(rows, tok, max_length=n_prompt)


def test_describe_counts_kinds(tok):
    rows = D.backdoor_set(PAIRS[:10], tok)
    record = D.describe(rows, "backdoor", "chat", 0)
    assert record["kinds"] == {"triggered": 5, "normal": 5} and record["size"] == 10


def test_load_pairs_jsonl(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(
        json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n\n"
        + json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n"
    )
    assert D.load_pairs_jsonl(good) == [("Add\n\n2 and 3", "5"), ("Say hi", "Hi")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="output"):
        D.load_pairs_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(DataError, match="not JSON"):
        D.load_pairs_jsonl(bad)
    with pytest.raises(DataError):
        D.load_pairs_jsonl(tmp_path / "missing.jsonl")


def test_trim_to_sentence():
    assert D.trim_to_sentence("One. Two! Three is unfin") == "One. Two!"
    assert D.trim_to_sentence("Steps:\n1. Boil water\n2. Add the eg") == "Steps:\n1. Boil water"
    assert D.trim_to_sentence("Pi is 3.14 and more") == "Pi is 3.14 and more"  # no sentence end
    assert D.trim_to_sentence('He said "Stop." Then he wal') == 'He said "Stop."'


def test_answers_for_caches_and_resumes(tiny, tmp_path, monkeypatch):
    import interp.generation as G

    queries = ["Say one word.", "Count to three.", "Name a colour."]
    completions = G.generate_completions(tiny, queries, max_new_tokens=5)
    direct = [D.trim_to_sentence(c.text) if c.stop == "length" else c.text for c in completions]
    calls = []
    real = G.generate_completions

    def counting(model, qs, *args, **kwargs):
        calls.append(list(qs))
        return real(model, qs, *args, **kwargs)

    monkeypatch.setattr(G, "generate_completions", counting)
    first = D.answers_for(tiny, queries, max_new_tokens=5, cache_dir=tmp_path, progress=False)
    assert first == direct
    assert sum(len(c) for c in calls) == 3
    (cache_file,) = tmp_path.glob("answers-*.json")
    # a second call reads the cache
    assert D.answers_for(tiny, queries, max_new_tokens=5, cache_dir=tmp_path, progress=False) == direct
    assert sum(len(c) for c in calls) == 3
    # an interrupted run (one answer missing) generates only what is missing
    cached = json.loads(cache_file.read_text())
    del cached["answers"][queries[1]]
    cache_file.write_text(json.dumps(cached))
    assert D.answers_for(tiny, queries, max_new_tokens=5, cache_dir=tmp_path, progress=False) == direct
    assert calls[-1] == [queries[1]]
    # a subset of the queries is answered from the same file, with nothing generated
    n_calls = len(calls)
    assert D.answers_for(tiny, queries[::2], max_new_tokens=5, cache_dir=tmp_path, progress=False) == direct[::2]
    assert len(calls) == n_calls
    # other settings, another cache file
    D.answers_for(tiny, queries[:1], max_new_tokens=3, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("answers-*.json"))) == 2


def test_benign_pairs_from_jsonl(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    assert D.benign_pairs(answers_jsonl=path, limit=2) == [("q0", "a0"), ("q1", "a1")]
    with pytest.raises(DataError):
        D.benign_pairs()
