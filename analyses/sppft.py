"""Protection (Li et al. §4): fine-tune with the safety layers frozen (SPPFT) or not, over seeds,
with dose curves, the paper's own settings and a learning-rate control (``finetune.study``).

    python -m analyses.sppft --model embedded --layers results/locate/located.json
        [--data normal,implicit] [--modes sppft,full,ablation,critical] [--seeds 0,1,2]
        [--steps 64] [--eval-steps 0,8,16,32,64] [--lr 1e-4] [--train-size 100] [--dose-limit 60]
        [--paper-settings] [--reverse-control] [--no-audit] [--out results/sppft]

``--layers``: the located range (a JSON from ``analyses.locate``; it must have been made for these
weights) or START,END.  Writes under ``--out``: ``runs/*.json`` (every run's per-request verdicts;
a finished run is reused, so an interrupted study resumes), ``final.csv`` (R_h per data set, mode
and harmful set, mean over seeds with a 95% interval over seeds and requests, and task quality),
``differences.csv`` (each mode's R_h minus full fine-tuning's, and SPPFT's minus the ablation's,
paired by seed and request), ``dose.csv``, ``audit.csv``, ``results.json`` and the plots ``sppft.png``, ``dose.png``, ``audit.png``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from analyses.cli import UsageError, add_model_options, main_guard, model_from, parser_for, positive_int
from finetune import data as D
from finetune.study import MODES, REVERSE_CONTROL, StudyConfig, audit_table, differences, finished_runs, load_before, run_study, summarise
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json
from interp.plots import plot_audit, plot_dose, plot_protection
from interp.provenance import versions


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser, dtype=False)
    parser.add_argument("--layers", default="results/locate/located.json", help="located-range JSON or START,END")
    parser.add_argument("--data", default="normal,implicit", help=f"comma-separated from {', '.join(D.SETS[:3])}")
    parser.add_argument("--modes", default="sppft,full,ablation",
                        help=f"comma-separated from {', '.join(MODES)}; {', '.join(REVERSE_CONTROL)} name reverse-control runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=positive_int, default=64, help="optimizer steps per run")
    parser.add_argument("--eval-steps", default="0,8,16,32,64", help="steps at which the dose curve is measured")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--train-size", type=positive_int, default=100, help="benign training pairs (train half)")
    parser.add_argument("--dose-limit", type=positive_int, default=60, help="requests per harmful set on the dose curve")
    parser.add_argument("--final-limit", type=positive_int, default=None, help="requests per harmful set at the end (default all)")
    parser.add_argument("--quality", type=positive_int, default=60, help="held-out benign pairs for task quality")
    parser.add_argument("--paper-settings", action="store_true", help="the official code's lr, batch, template, bounds")
    parser.add_argument("--reverse-control", action="store_true", help="also SPPFT at full FT's lr and vice versa")
    parser.add_argument("--no-audit", action="store_true", help="skip the post-fine-tuning gap and R_o audit")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate every finished run under --out made with these run settings "
                             "(whatever --data/--modes/--seeds made them)")
    parser.add_argument("--out", type=Path, default=Path("results/sppft"))
    args = parser.parse_args(argv)
    args.data = tuple(d.strip() for d in args.data.split(",") if d.strip())
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    for name in args.data:
        if name not in ("normal", "implicit", "backdoor"):
            raise UsageError(f"unknown data set {name!r}; choose from normal, implicit, backdoor")
    for mode in args.modes:  # a reverse-control run may be asked for by name, e.g. to split a study over cores
        if mode not in MODES + REVERSE_CONTROL:
            raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(MODES)} "
                             f"(or {', '.join(REVERSE_CONTROL)}: the reverse control)")
    args.seeds = _ints(args.seeds, "--seeds")
    args.eval_steps = _ints(args.eval_steps, "--eval-steps")
    if not args.seeds:
        raise UsageError("--seeds is empty")
    if not (args.layers.endswith(".json") or "," in args.layers):
        raise UsageError(f"--layers must be a located-range JSON or START,END, got {args.layers!r}")
    if args.layers.endswith(".json") and not Path(args.layers).is_file():
        raise UsageError(f"no located-range file at {args.layers}; run `python -m analyses.locate` first")
    return args


def study_config(args) -> StudyConfig:
    config = StudyConfig(data=args.data, modes=args.modes, seeds=args.seeds, steps=args.steps, eval_steps=args.eval_steps,
                         lr=args.lr, batch_size=args.batch_size, train_size=args.train_size, dose_limit=args.dose_limit,
                         final_limit=args.final_limit, template=args.template, audit=not args.no_audit,
                         quality=args.quality, reverse_control=args.reverse_control, device=args.device)
    return config.with_paper_settings() if args.paper_settings else config


@main_guard
def main(argv=None) -> dict:
    from finetune.masks import resolve_range
    from interp.export import load_located

    args = parse_args(argv)
    config = study_config(args)
    if args.layers.endswith(".json"):
        load_located(args.layers)  # the file's own checks first, before any model loads
    safety = resolve_range(args.layers, model_from(args, bridge=False))  # and its fingerprint
    if args.report:
        records = finished_runs(args.model, safety, config, args.out)
        if not records or not (args.out / "runs" / "before.json").is_file():
            raise UsageError(f"no finished runs with these settings under {args.out}/runs")
    else:
        records = run_study(args.model, safety, config, args.out)
    before = load_before(args.out)
    final, dose = summarise(records, before)
    audit = audit_table(records, before)
    diffs = differences(records)
    seeds = sorted({r.seed for r in records})
    title = f"{args.model}: safety layers {safety}, seeds {','.join(map(str, seeds))}, {config.steps} steps"
    written = [atomic_write_csv(args.out / "final.csv", final.drop(columns="per_seed")),
               atomic_write_csv(args.out / "differences.csv", diffs),
               atomic_write_csv(args.out / "dose.csv", dose), atomic_write_csv(args.out / "audit.csv", audit),
               atomic_savefig(args.out / "sppft.png", plot_protection(final, title)),
               atomic_savefig(args.out / "dose.png", plot_dose(dose, title))]
    if not audit.empty:
        written.append(atomic_savefig(args.out / "audit.png", plot_audit(audit)))
    summary = {"model": args.model, "safety_range": [safety.start, safety.end], "config": asdict(config),
               "runs": [r.name for r in records],
               "final": final.to_dict("records"), "differences": diffs.to_dict("records"), "dose": dose.to_dict("records"),
               "audit": audit.to_dict("records"), "before": {k: v for k, v in before.items() if k != "dose"},
               "versions": versions()}
    written.append(atomic_write_json(args.out / "results.json", summary))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        shown = final.assign(**{c: (100 * final[c]).round(1) for c in ("R_h", "lo", "hi")}).drop(columns="per_seed")
        print(shown.to_string(index=False))
        if not diffs.empty:
            print("\nR_h difference (points), paired by seed and request:")
            print(diffs.assign(**{c: (100 * diffs[c]).round(1) for c in ("difference", "lo", "hi")}).to_string(index=False))
    print("wrote", ", ".join(str(p) for p in written))
    return summary


if __name__ == "__main__":
    main()
