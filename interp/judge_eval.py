"""How accurate a refusal judge is, on answers labelled by hand, and on models it was not tuned on.

Two labelled sets, three classes each (``compliance``, ``full_refusal``, ``partial_refusal``):

- ``interp/datasets/refusal_labels.csv``: greedy answers (32 new tokens) of the embedded models,
  labelled by the guide in ``interp/datasets/SOURCES.md`` and split by a hash of each id into a
  ``dev`` half (development: used to write and choose rules) and a ``test`` half (reporting only);
- ``interp/datasets/xstest_judge_labels.csv``: XSTest's human labels of three other models'
  full answers (GPT-4, Llama-2-70b-chat without and with its original system prompt; Röttger
  et al. 2024, CC BY 4.0), long answers with preambles, warnings and partial refusals.

``score(judge, rows)`` gives binary accuracy (refused = not compliance) and three-class
accuracy, precision and recall per class, each with a Wilson 95% interval, and the confusion
matrix.  ``leave_one_model_out()`` measures every judge the honest way: a judge's *procedure*
(``PROCEDURES``: a fixed rule list is its own procedure; the whole-answer judge re-runs its
selection, the learned one its training) is fitted on two XSTest models plus the project's
``dev`` half and scored on the third model; then fitted on all development answers (three models
and ``dev``) and scored on the project's ``test`` half.
"""

from __future__ import annotations

import pandas as pd

from interp.data import DATA_DIR, DataError
from interp.judge import LABELS, RefusalMatcher
from interp.stats import wilson

LABELS_FILE = "refusal_labels.csv"
XSTEST_FILE = "xstest_judge_labels.csv"
XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig")
PROJECT_DEV = "project-dev"


def _read(name: str) -> pd.DataFrame:
    path = DATA_DIR / name
    if not path.is_file():
        raise DataError(f"no labelled set at {path}")
    frame = pd.read_csv(path, keep_default_na=False)
    bad = set(frame["label"]) - set(LABELS)
    if bad:
        raise DataError(f"{path}: unknown labels {sorted(bad)}")
    return frame


def load_labels(split: str = "all") -> pd.DataFrame:
    """The project's labelled answers (columns: id, split, model, source, prompt, response, label)."""
    frame = _read(LABELS_FILE)
    if split != "all":
        if split not in ("dev", "test"):
            raise DataError(f"unknown split {split!r}; choose dev, test or all")
        frame = frame[frame["split"] == split]
    return frame.reset_index(drop=True)


def load_xstest_labels(models=XSTEST_MODELS) -> pd.DataFrame:
    """XSTest's labelled answers of ``models`` (columns: id, model, type, prompt, response, label)."""
    unknown = set(models) - set(XSTEST_MODELS)
    if unknown:
        raise DataError(f"unknown XSTest model(s) {sorted(unknown)}; choose from {', '.join(XSTEST_MODELS)}")
    frame = _read(XSTEST_FILE)
    return frame[frame["model"].isin(models)].reset_index(drop=True)


def development_rows(held_out: str | None = None) -> pd.DataFrame:
    """Development answers with a ``source`` column: every XSTest model but ``held_out``, and the
    project's ``dev`` half (source ``project-dev``)."""
    xstest = load_xstest_labels(tuple(m for m in XSTEST_MODELS if m != held_out))
    dev = load_labels("dev").assign(source=PROJECT_DEV)
    rows = pd.concat([xstest.assign(source=xstest["model"]), dev], ignore_index=True)
    return rows[["source", "response", "label"]]


def predict(judge, texts) -> list[str]:
    """Every text's label (in one call when the judge labels many at once)."""
    texts = [str(t) for t in texts]
    many = getattr(judge, "classify_many", None)
    return many(texts) if many else [judge.classify(t) for t in texts]


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": [lo, hi]}


def score_predictions(predicted: list[str], truth: list[str]) -> dict:
    """Binary and three-class accuracy, per-class precision and recall (Wilson intervals)."""
    n = len(truth)
    binary = sum((p != "compliance") == (t != "compliance") for p, t in zip(predicted, truth))
    per_class = {}
    for label in LABELS:
        tp = sum(p == label and t == label for p, t in zip(predicted, truth))
        n_pred = sum(p == label for p in predicted)
        n_true = sum(t == label for t in truth)
        per_class[label] = {"support": n_true, "precision": tp / n_pred if n_pred else None,
                            "recall": tp / n_true if n_true else None,
                            "recall_ci": list(wilson(tp, n_true)), "precision_ci": list(wilson(tp, n_pred))}
    truly_refused = [p != "compliance" for p, t in zip(predicted, truth) if t != "compliance"]
    partial_caught = [p != "compliance" for p, t in zip(predicted, truth) if t == "partial_refusal"]
    confusion = pd.crosstab(pd.Series(truth, name="label"), pd.Series(predicted, name="predicted"))
    return {
        "n": n,
        "binary_accuracy": binary / n,
        "binary_accuracy_ci": list(wilson(binary, n)),
        "three_class_accuracy": sum(p == t for p, t in zip(predicted, truth)) / n,
        "refusal_recall": _rate(sum(truly_refused), len(truly_refused)),
        "partial_caught": _rate(sum(partial_caught), len(partial_caught)),
        "classes": per_class,
        "confusion": {t: {p: int(v) for p, v in row.items()} for t, row in confusion.to_dict("index").items()},
    }


def score(judge, rows: pd.DataFrame) -> dict:
    """Accuracy of ``judge`` on labelled ``rows`` (module docstring)."""
    return score_predictions(predict(judge, rows["response"]), list(rows["label"]))


def _fixed(judge):
    return lambda rows: judge


def _fit_whole(rows: pd.DataFrame):
    from interp.judge_whole import select

    return select(list(rows["response"]), list(rows["label"]), list(rows["source"]))


def _fit_learned(rows: pd.DataFrame):
    from interp.judge_learned import fit_learned

    return fit_learned(list(rows["response"]), list(rows["label"]), list(rows["source"]))


def procedures() -> dict:
    """Every judge's fitting procedure (development rows -> judge): the rule lists are fixed, the
    whole-answer judge re-selects its cue groups and window, the learned judge re-trains."""
    from interp.judge_baselines import BASELINES

    fixed = {"opening": RefusalMatcher(name="opening"), **BASELINES}
    return {"whole": _fit_whole, "learned": _fit_learned, **{k: _fixed(v) for k, v in fixed.items()}}


def leave_one_model_out(names=None) -> dict:
    """``{judge: {"folds": {model: score}, "project_test": score, "fitted": {fold: describe()}}}``
    (module docstring); ``names`` picks judges of ``procedures()``."""
    available = procedures()
    names = list(available) if names is None else list(names)
    unknown = set(names) - set(available)
    if unknown:
        raise DataError(f"unknown judge(s) {sorted(unknown)}; choose from {', '.join(available)}")
    xstest, test = load_xstest_labels(), load_labels("test")
    result = {}
    for name in names:
        fit, entry = available[name], {"folds": {}, "fitted": {}}
        for held in XSTEST_MODELS:
            judge = fit(development_rows(held))
            entry["folds"][held] = score(judge, xstest[xstest["model"] == held])
            entry["fitted"][held] = judge.describe()
        judge = fit(development_rows())
        entry["project_test"] = score(judge, test)
        entry["fitted"]["all"] = judge.describe()
        result[name] = entry
    return result


def score_all(split: str = "test") -> dict[str, dict]:
    """``score`` of every judge of ``interp.judge.judges()`` on one half of the project's set."""
    from interp.judge import judges

    rows = load_labels(split)
    return {name: score(judge, rows) for name, judge in judges().items()}
