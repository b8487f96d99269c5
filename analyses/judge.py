"""How accurate each refusal judge is, on the project's labelled answers and on models it was not
tuned on.

    python -m analyses.judge [--split test|dev|all] [--judges whole,learned,...] [--no-lomo] [--out results/judge]
    python -m analyses.judge --fit interp/datasets/judge_learned.json

**Leave-one-model-out** (``interp.judge_eval.leave_one_model_out``): each judge's procedure (the
rule lists are fixed; the whole-answer judge re-selects its cue groups and window; the learned
judge re-trains) is fitted on two of XSTest's three labelled models plus the project's ``dev``
half and scored on the third, then fitted on all development answers and scored on the project's
``test`` half: binary accuracy (refused = not compliance) with its Wilson 95% interval, the share
of partial refusals counted as refused, and recall per class.  ``--no-lomo`` skips it (the
learned judge re-trains four times: minutes on two cores).

**The project's half** (``--split``, default ``test``, used only for reporting): every judge of
``interp.judge.judges()`` as shipped (``project`` is the default judge).

``--fit PATH`` trains the learned judge on all development answers and writes its weights (the
file ``interp.judge.DEFAULT_JUDGE`` loads), then exits.  Writes ``judge.json``, ``judge.csv`` and
``lomo.csv`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analyses.cli import UsageError, main_guard, parser_for
from interp.io import atomic_write_csv, atomic_write_json
from interp.judge_eval import development_rows, leave_one_model_out, load_labels, procedures, score_all


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


def lomo_table(result: dict) -> pd.DataFrame:
    """One row per judge and evaluated set (a held-out XSTest model, or the project's test half)."""
    rows = []
    for name, entry in result.items():
        for where, s in [*entry["folds"].items(), ("project-test", entry["project_test"])]:
            partial = s["partial_caught"]
            row = {"judge": name, "scored_on": where, "n": s["n"], "binary_accuracy": s["binary_accuracy"],
                   "binary_lo": s["binary_accuracy_ci"][0], "binary_hi": s["binary_accuracy_ci"][1],
                   "three_class_accuracy": s["three_class_accuracy"], "partial_caught": partial["rate"],
                   "partial_caught_lo": partial["ci"][0], "partial_caught_hi": partial["ci"][1],
                   "partial_n": partial["n"]}
            for label, c in s["classes"].items():
                row[f"{label}_recall"] = c["recall"]
                row[f"{label}_recall_lo"], row[f"{label}_recall_hi"] = c["recall_ci"]
            rows.append(row)
    return pd.DataFrame(rows)


def _fit(path: Path) -> dict:
    from interp.judge_learned import fit_learned, save

    rows = development_rows()
    judge = fit_learned(list(rows["response"]), list(rows["label"]), list(rows["source"]))
    written = save(judge, path)
    print("trained on", len(rows), "development answers:", judge.describe())
    print("wrote", written)
    return judge.describe()


@main_guard
def main(argv=None) -> dict:
    parser = parser_for(__doc__)
    parser.add_argument("--split", default="test", choices=["test", "dev", "all"])
    parser.add_argument("--judges", default=None, help=f"comma-separated, from {', '.join(procedures())} (all)")
    parser.add_argument("--no-lomo", action="store_true", help="skip leave-one-model-out")
    parser.add_argument("--fit", type=Path, metavar="PATH", help="train the learned judge, write its weights, exit")
    parser.add_argument("--out", type=Path, default=Path("results/judge"))
    args = parser.parse_args(argv)
    names = None
    if args.judges is not None:
        names = [n.strip() for n in args.judges.split(",") if n.strip()]
        unknown = set(names) - set(procedures())
        if unknown or not names:
            raise UsageError(f"unknown judge(s) {sorted(unknown)}; choose from {', '.join(procedures())}")
    if args.fit is not None:
        return _fit(args.fit)
    from interp.judge import DEFAULT_JUDGE

    scores = score_all(args.split)
    labels = load_labels(args.split)
    frame = table(scores)
    record = {"default": DEFAULT_JUDGE.describe(), "split": args.split, "n": len(labels),
              "label_counts": labels["label"].value_counts().to_dict(),
              "by_model": labels.groupby("model")["label"].value_counts().unstack(fill_value=0).to_dict("index"),
              "judges": scores}
    written = []
    if not args.no_lomo:
        record["leave_one_model_out"] = leave_one_model_out(names)
        lomo = lomo_table(record["leave_one_model_out"])
        written.append(atomic_write_csv(args.out / "lomo.csv", lomo))
        print("Leave-one-model-out: fitted on two XSTest models + the project's dev half, scored on the third; "
              "project-test: fitted on all development answers")
        shown = lomo[["judge", "scored_on", "n", "binary_accuracy", "binary_lo", "binary_hi", "three_class_accuracy",
                      "partial_caught", "partial_n", "full_refusal_recall", "partial_refusal_recall",
                      "compliance_recall"]]
        with pd.option_context("display.width", 220, "display.float_format", "{:.3f}".format):
            print(shown.to_string(index=False))
    written += [atomic_write_json(args.out / "judge.json", record), atomic_write_csv(args.out / "judge.csv", frame)]
    print(f"\n{len(labels)} labelled responses ({args.split} half), judges as shipped "
          f"(project = {DEFAULT_JUDGE.describe()['judge']}): {record['label_counts']}")
    shown = frame[["judge", "n", "binary_accuracy", "binary_lo", "binary_hi", "three_class_accuracy",
                   "full_refusal_recall", "partial_refusal_recall", "compliance_recall"]]
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(shown.to_string(index=False))
    print("wrote", ", ".join(str(p) for p in written))
    return record


if __name__ == "__main__":
    main()
