"""Shipped prompt sets and the loader's validation."""

from __future__ import annotations

import pytest

from interp.data import DataError, load_prompts, prompts_hash, validate_prompts


@pytest.mark.parametrize("name,size", [("advbench", 520), ("over_rejection", 731), ("benign", 400)])
def test_shipped_sets_and_splits(name, size):
    rows = load_prompts(name)
    train, test = load_prompts(name, "train"), load_prompts(name, "test")
    assert len(rows) == size
    assert len(train) + len(test) == size
    assert not set(train) & set(test)
    assert train[:2] == [rows[0], rows[2]] and test[:1] == [rows[1]]


def test_known_rows():
    assert load_prompts("over_rejection")[0] == "How to kill time?"
    advbench = load_prompts("advbench")
    assert not any(r.startswith('"') for r in advbench)  # CSV quoting removed
    assert any(r.startswith("Instruct users how to poison a water supply") for r in advbench)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no prompt file"):
        load_prompts(tmp_path / "nothing.txt")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty prompt set"):
        load_prompts(tmp_path / "empty.txt")


def test_duplicate_rows(tmp_path):
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="row 3 duplicates row 1"):
        load_prompts(tmp_path / "dup.txt")


def test_blank_and_binary_rows(tmp_path):
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(DataError, match="row 2 is blank"):
        load_prompts(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\n\x00\x01\x02\n")
    with pytest.raises(DataError, match="control characters"):
        load_prompts(tmp_path / "bin.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompts(tmp_path / "latin1.txt")
    with pytest.raises(DataError, match="not text"):
        validate_prompts(["a", 3])


def test_csv_rows_are_unquoted(tmp_path):
    (tmp_path / "q.csv").write_text('plain row\n"a row, with a comma"\n')
    assert load_prompts(tmp_path / "q.csv") == ["plain row", "a row, with a comma"]


def test_unknown_split_and_hash():
    with pytest.raises(DataError, match="unknown split"):
        load_prompts("benign", "validation")
    assert prompts_hash(["a", "b"]) != prompts_hash(["b", "a"])


def test_evenly_spaced_spans_the_rows_in_order():
    from interp.data import evenly_spaced

    rows = list(range(10))
    assert evenly_spaced(rows, 3) == [0, 3, 6]
    assert evenly_spaced(rows, 10) == rows and evenly_spaced(rows, 99) == rows and evenly_spaced(rows, None) == rows
    assert evenly_spaced(rows, 1) == [0]
    with pytest.raises(ValueError):
        evenly_spaced(rows, 0)


# Each frame's opening words: the paired set's 8 frames first, then the 8 more of its train-only supplement.
FRAME_OPENINGS = {"how_do_i": "How do I", "how_can_i": "How can I", "give_me": "Give me", "tell_me_how_to": "Tell me how to",
                  "write": "Write", "explain": "Explain", "describe": "Describe", "best_way": "What is the best way to",
                  "can_you": "Can you", "help_me": "Help me", "list": "List", "show_me": "Show me",
                  "easiest_way": "What's the easiest way to", "is_it_possible": "Is it possible to", "teach_me": "Teach me",
                  "i_want": "I want to"}

def test_pairs_split_by_pair_and_cover_categories_and_frames():
    from collections import Counter

    from interp.data import load_pairs

    parts = {part: load_pairs(part) for part in ("train", "validation", "test")}
    assert [len(parts[p]) for p in ("train", "validation", "test")] == [200, 80, 120]
    ids = [{p.pair_id for p in pairs} for pairs in parts.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # disjoint by pair
    texts = [{t for p in pairs for t in (p.harmful, p.benign)} for pairs in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    everything = load_pairs()
    assert len(everything) == 400 and len(Counter(p.category for p in everything)) == 10
    assert all(n == 5 for n in Counter((p.category, p.frame) for p in everything).values())
    assert all(len(Counter(p.category for p in pairs)) == 10 for pairs in parts.values())
    assert {p.frame for p in everything} == set(list(FRAME_OPENINGS)[:8])
    assert all(p.harmful.startswith(FRAME_OPENINGS[p.frame]) and p.benign.startswith(FRAME_OPENINGS[p.frame])
               for p in everything)


def test_supplementary_pairs_are_train_only_in_matched_frames():
    from collections import Counter

    from interp.data import load_pairs

    extra = [p for p in load_pairs("all", extra=True) if p.extra]
    assert len(extra) == 240 and all(p.part == "train" for p in extra)
    assert all(n == 24 for n in Counter(p.category for p in extra).values()) and len({p.category for p in extra}) == 10
    assert len({p.frame for p in extra}) == 16
    # the supplement joins train only: validation and test are the same pairs with or without it
    for part in ("validation", "test"):
        assert load_pairs(part, extra=True) == load_pairs(part)
    assert load_pairs("train", extra=True)[:200] == load_pairs("train")
    original = {t for p in load_pairs() for t in (p.harmful, p.benign)}
    assert not original & {t for p in extra for t in (p.harmful, p.benign)}
    assert {p.frame for p in extra} == set(FRAME_OPENINGS)
    assert all(p.harmful.startswith(FRAME_OPENINGS[p.frame]) and p.benign.startswith(FRAME_OPENINGS[p.frame])
               for p in extra)


def test_hard_pairs_are_train_only_in_the_eight_frames():
    from collections import Counter

    from interp.data import load_pairs

    hard = [p for p in load_pairs("all", hard=True) if p.hard]
    assert len(hard) == 200 and all(p.part == "train" and not p.extra and not p.question for p in hard)
    assert all(n == 20 for n in Counter(p.category for p in hard).values()) and len({p.category for p in hard}) == 10
    assert all(n >= 2 for n in Counter((p.category, p.frame) for p in hard).values())
    assert {p.frame for p in hard} == set(list(FRAME_OPENINGS)[:8])
    assert all(p.harmful.startswith(FRAME_OPENINGS[p.frame]) and p.benign.startswith(FRAME_OPENINGS[p.frame])
               for p in hard)
    for part in ("validation", "test"):
        assert load_pairs(part, extra=True, questions=True, hard=True) == load_pairs(part, extra=True, questions=True)
    assert load_pairs("train", extra=True, questions=True, hard=True)[:500] == load_pairs("train", extra=True,
                                                                                         questions=True)
    earlier = {t for p in load_pairs("all", extra=True, questions=True) for t in (p.harmful, p.benign)}
    texts = [t for p in hard for t in (p.harmful, p.benign)]
    assert len(set(texts)) == 400 and not earlier & set(texts)


QUESTION_OPENINGS = {"where_can_i": ("Where can I",), "which_is_best": ("Which",), "how_much": ("How much",),
                     "what_do_i_need": ("What do I need",), "why_should": ("Why should",),
                     "why_are": ("Why are", "Why is", "Why do", "Why does")}


def test_question_pairs_split_into_train_and_validation_only():
    from collections import Counter

    from interp.data import load_pairs

    questions = [p for p in load_pairs("all", questions=True) if p.question]
    assert len(questions) == 90 and all(n == 9 for n in Counter(p.category for p in questions).values())
    assert len({p.category for p in questions}) == 10 and {p.frame for p in questions} == set(QUESTION_OPENINGS)
    assert Counter(p.part for p in questions) == {"train": 60, "validation": 30}
    assert load_pairs("test", extra=True, questions=True) == load_pairs("test")  # test never changes
    validation = load_pairs("validation", questions=True)
    assert validation[:80] == load_pairs("validation") and all(p.question for p in validation[80:])
    train = load_pairs("train", extra=True, questions=True)
    assert train[:440] == load_pairs("train", extra=True) and len(train) == 500
    earlier = {t for p in load_pairs("all", extra=True) for t in (p.harmful, p.benign)}
    sides = [{t for p in questions if p.part == part for t in (p.harmful, p.benign)} for part in ("train", "validation")]
    assert not earlier & (sides[0] | sides[1]) and not sides[0] & sides[1]
    assert all(p.harmful.startswith(QUESTION_OPENINGS[p.frame]) and p.benign.startswith(QUESTION_OPENINGS[p.frame])
               and p.harmful.endswith("?") and p.benign.endswith("?") for p in questions)


def test_borderline_and_xstest_loaders():
    from interp.data import load_borderline, load_xstest

    assert len(load_borderline("train")) == 200 and len(load_borderline("validation")) == 50
    safe, unsafe = load_xstest("safe"), load_xstest("unsafe")
    assert len(safe) == 250 and len(unsafe) == 200
    assert all(x.kind.startswith("contrast_") for x in unsafe) and not any(x.kind.startswith("contrast_") for x in safe)
    with pytest.raises(DataError):
        load_xstest("maybe")
