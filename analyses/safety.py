"""Safety report: how often a model refuses harmful requests, answers benign ones (in the same
sentence frames, and in XSTest's contrasts), and over-refuses benign requests with dangerous words.

    python -m analyses.safety --model embedded --out results/safety [--limit N [--sample first|spread]]
        [--sets advbench_test,xstest_safe,...] [--template chat] [--max-new-tokens 32]

The sets, the judge and the intervals are ``interp.safety``'s.  Writes ``summary.json`` (model
and fingerprint, judge, settings, per-set counts per class with 95% intervals, XSTest per type),
``summary.csv`` and ``responses.csv`` (set, type, prompt, response, label, refused) under ``--out``.
``--rejudge FOLDER`` judges an earlier report's responses again with the current judge.
"""

from __future__ import annotations

from pathlib import Path

from analyses.cli import (
    UsageError,
    add_limit_options,
    add_model_options,
    main_guard,
    model_from,
    parser_for,
    positive_int,
)
from interp.io import atomic_write_csv, atomic_write_json
from interp.safety import SAFETY_SETS, SafetyReport, safety_report


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser)
    add_limit_options(parser)
    parser.add_argument("--sets", default=",".join(SAFETY_SETS), help=f"comma-separated, from {', '.join(SAFETY_SETS)}")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results/safety"))
    parser.add_argument("--rejudge", type=Path, metavar="FOLDER",
                        help="judge the responses of an earlier report again (no model, no generation)")
    args = parser.parse_args(argv)
    if args.rejudge is not None and not (args.rejudge / "responses.csv").is_file():
        raise UsageError(f"no responses.csv in {args.rejudge}")
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in args.sets if s not in SAFETY_SETS]
    if unknown or not args.sets:
        raise UsageError(f"unknown safety set(s) {unknown}; choose from {', '.join(SAFETY_SETS)}")
    return args


def write_report(out: Path, report: SafetyReport) -> list[Path]:
    return [
        atomic_write_json(out / "summary.json", report.to_dict()),
        atomic_write_csv(out / "summary.csv", report.to_frame()),
        atomic_write_csv(out / "responses.csv", report.responses),
    ]


def format_table(report: SafetyReport) -> str:
    frame = report.to_frame()
    lines = [f"{'set':<22}{'goal':>7}{'n':>6}{'refused':>9}{'partial':>9}   rate that matters (95% CI)"]
    for row in frame.to_dict("records"):
        goal_rate = row["refused_rate"] if row["goal"] != "answer" else row["answered_rate"]
        lo, hi = (row["refused_lo"], row["refused_hi"]) if row["goal"] != "answer" else (1 - row["refused_hi"], 1 - row["refused_lo"])
        what = {"refuse": "refused", "answer": "answered", "count": "refused"}[row["goal"]]
        lines.append(f"{row['set']:<22}{row['goal']:>7}{row['n']:>6}{row['refused']:>9}{row['partial_refusal']:>9}   "
                     f"{what} {goal_rate:.1%} ({lo:.1%}-{hi:.1%})")
    lines.append(f"judge: {report.settings['judge']['judge']} ({report.settings['judge']['binary_rule']})")
    return "\n".join(lines)


@main_guard
def main(argv=None) -> SafetyReport:
    args = parse_args(argv)
    if args.rejudge is not None:
        report = SafetyReport.read(args.rejudge).rejudged()
    else:
        report = safety_report(model_from(args), args.sets, args.limit, args.sample, args.max_new_tokens,
                               args.batch_size)
    written = write_report(args.out, report)
    print(format_table(report))
    print("wrote", ", ".join(str(p) for p in written))
    return report


if __name__ == "__main__":
    main()
