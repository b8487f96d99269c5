"""How accurate each refusal judge is, on responses labelled by hand.

    python -m analyses.judge [--split test|dev|all] [--out results/judge]

Scores the project's matcher and the field's baselines (GCG's prefix list, refusal_direction's
list, XSTest's ``startswith`` rule; ``interp.judge_baselines``) on the labelled set
(``interp/datasets/refusal_labels.csv``): binary accuracy (refused = not compliance) with its 95%
interval, three-class accuracy, and precision and recall per class.  The ``test`` half (the
default) is used only for this report; the matcher was changed looking at the ``dev`` half.
Writes ``judge.json`` and ``judge.csv`` under ``--out`` and prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analyses.cli import main_guard, parser_for
from interp.io import atomic_write_csv, atomic_write_json
from interp.judge_eval import load_labels, score_all


def table(scores: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, s in scores.items():
        row = {"judge": name, "n": s["n"], "binary_accuracy": s["binary_accuracy"],
               "binary_lo": s["binary_accuracy_ci"][0], "binary_hi": s["binary_accuracy_ci"][1],
               "three_class_accuracy": s["three_class_accuracy"]}
        for label, c in s["classes"].items():
            row[f"{label}_precision"] = c["precision"]
            row[f"{label}_recall"] = c["recall"]
            row[f"{label}_support"] = c["support"]
        rows.append(row)
    return pd.DataFrame(rows)


@main_guard
def main(argv=None) -> dict:
    parser = parser_for(__doc__)
    parser.add_argument("--split", default="test", choices=["test", "dev", "all"])
    parser.add_argument("--out", type=Path, default=Path("results/judge"))
    args = parser.parse_args(argv)
    scores = score_all(args.split)
    labels = load_labels(args.split)
    frame = table(scores)
    record = {"split": args.split, "n": len(labels), "label_counts": labels["label"].value_counts().to_dict(),
              "by_model": labels.groupby("model")["label"].value_counts().unstack(fill_value=0).to_dict("index"),
              "judges": scores}
    written = [atomic_write_json(args.out / "judge.json", record), atomic_write_csv(args.out / "judge.csv", frame)]
    print(f"{len(labels)} labelled responses ({args.split} half): {record['label_counts']}")
    shown = frame[["judge", "n", "binary_accuracy", "binary_lo", "binary_hi", "three_class_accuracy",
                   "full_refusal_recall", "partial_refusal_recall", "compliance_recall"]]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(shown.to_string(index=False))
    print("wrote", ", ".join(str(p) for p in written))
    return record


if __name__ == "__main__":
    main()
