"""How accurate a refusal judge is, on responses labelled by hand.

``interp/datasets/refusal_labels.csv`` holds real greedy responses (32 new tokens) of the
embedded models to prompts of every set the project uses, each labelled ``compliance``,
``full_refusal`` or ``partial_refusal`` by the guide in ``interp/datasets/SOURCES.md``, and
split by a hash of its id into a ``dev`` half (looked at while changing the matcher) and a
``test`` half (used only to report accuracy).  ``score(judge, rows)`` gives binary accuracy
(refused = not compliance), three-class accuracy, and precision and recall per class, with the
confusion matrix; ``score_all`` does it for every judge of ``interp.judge.judges()``.
"""

from __future__ import annotations

import pandas as pd

from interp.data import DATA_DIR, DataError
from interp.judge import LABELS, judges
from interp.stats import wilson

LABELS_FILE = "refusal_labels.csv"


def load_labels(split: str = "all") -> pd.DataFrame:
    """The labelled responses (columns: id, split, model, source, prompt, response, label)."""
    path = DATA_DIR / LABELS_FILE
    if not path.is_file():
        raise DataError(f"no labelled set at {path}")
    frame = pd.read_csv(path, keep_default_na=False)
    bad = set(frame["label"]) - set(LABELS)
    if bad:
        raise DataError(f"{path}: unknown labels {sorted(bad)}")
    if split != "all":
        if split not in ("dev", "test"):
            raise DataError(f"unknown split {split!r}; choose dev, test or all")
        frame = frame[frame["split"] == split]
    return frame.reset_index(drop=True)


def score(judge, rows: pd.DataFrame) -> dict:
    """Accuracy of ``judge`` on labelled ``rows`` (module docstring)."""
    predicted = [judge.classify(text) for text in rows["response"]]
    truth = list(rows["label"])
    n = len(truth)
    binary = sum((p != "compliance") == (t != "compliance") for p, t in zip(predicted, truth))
    per_class = {}
    for label in LABELS:
        tp = sum(p == label and t == label for p, t in zip(predicted, truth))
        n_pred = sum(p == label for p in predicted)
        n_true = sum(t == label for t in truth)
        per_class[label] = {
            "support": n_true,
            "precision": tp / n_pred if n_pred else None,
            "recall": tp / n_true if n_true else None,
        }
    lo, hi = wilson(binary, n)
    confusion = pd.crosstab(pd.Series(truth, name="label"), pd.Series(predicted, name="predicted"))
    return {
        "n": n,
        "binary_accuracy": binary / n,
        "binary_accuracy_ci": [lo, hi],
        "three_class_accuracy": sum(p == t for p, t in zip(predicted, truth)) / n,
        "classes": per_class,
        "confusion": {t: {p: int(v) for p, v in row.items()} for t, row in confusion.to_dict("index").items()},
    }


def score_all(split: str = "test") -> dict[str, dict]:
    """``score`` of every judge (the project's and the baselines) on one split."""
    rows = load_labels(split)
    return {name: score(judge, rows) for name, judge in judges().items()}
