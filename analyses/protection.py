"""The protection study of ``docs/sppft/PLAN.md``: choose the attack on validation requests, then
freeze the located window, every other window of its size and three unit controls, and test.

    python -m analyses.protection --model embedded --layers docs/locate/located.json --select-attack
    python -m analyses.protection --model embedded --layers docs/locate/located.json \\
        --primary --profile --controls --secondary --report [--landscape 17,27]

``--select-attack`` (PLAN step 1) runs full fine-tuning on D_I (seed 0, batch 8) for every cell of
``finetune.protection.ATTACK_GRID`` (and 128 steps at 3e-4 if none qualifies), scores V_h and task
quality, and writes ``--attack-csv`` (every cell, which qualify, the one chosen) and, beside it,
``attack.json``: the chosen cell and the profile's stride, chosen by the projected hours of step 2.
Task quality is kept when ROUGE-L on the quality pairs is at least ``--min-rouge`` (0.28, PLAN.md
amendment 1: the pairs' references are the unattacked model's own answers, so a floor relative to
its ROUGE-L of 1 could never be met).
Step 2 reads that file: ``--primary`` full fine-tuning and SPPFT on the located window (seeds 0-4,
dose curve and audit); ``--profile`` every window (seeds 0-2, final R_h only; with ``--landscape`` of another size, that
range too, as an extra row outside the permutation test); ``--controls``
random units, every head, critical units per parameter (seeds 0-2, final R_h only);
``--secondary`` the profile's best window with dose curve and audit, and full, SPPFT and the best
window on D_N (seeds 0-2).  ``--report`` tabulates whatever has finished: ``primary.csv`` (SPPFT -
full per outcome: McNemar per seed, CMH across seeds, Holm, 95% and 90% crossed-bootstrap
intervals, TOST at +-5 points), ``profile.csv`` and ``profile.json`` (the located window's rank and
permutation p-value), ``controls.csv`` (each control against SPPFT, CMH with Holm),
``reading.json`` (which of PLAN's readings the data support), ``protection.png``, and for the runs
with dose curve and audit ``final.csv``, ``dose.csv`` and ``audit.csv`` (``finetune.study``).

Runs go to ``--out``/runs (a finished run is reused, so the study resumes across sessions),
``--workers`` at a time, one torch thread each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.cli import UsageError, add_model_options, main_guard, parser_for, positive_int
from finetune import protection as P
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json
from interp.paired import cmh_test, holm, mcnemar_exact, pooled_mcnemar_exact, rank_pvalue, tost
from interp.ranges import LayerRange
from interp.stats import seeds_difference, seeds_interval

MARGIN = 0.05


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser, dtype=False)
    parser.add_argument("--layers", default="docs/locate/located.json", help="located-range JSON or START,END")
    parser.add_argument("--out", type=Path, default=Path("docs/sppft/protection"))
    parser.add_argument("--attack-csv", type=Path, default=Path("docs/sppft/attack.csv"))
    parser.add_argument("--workers", type=positive_int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--min-rouge", type=float, default=P.MIN_ROUGE,
                        help=f"step 1: the ROUGE-L floor of task quality (default {P.MIN_ROUGE}, PLAN.md amendment 1)")
    parser.add_argument("--landscape", default=None, help="START,END of the R_o landscape's winner, marked on the profile")
    for flag, text in (("--select-attack", "PLAN step 1: choose the attack on V_h"),
                       ("--primary", "full and SPPFT on D_I, seeds 0-4"), ("--profile", "every window, seeds 0-2"),
                       ("--controls", "random units, every head, critical units per parameter, seeds 0-2"),
                       ("--secondary", "the best window's audit and the D_N rows, seeds 0-2"),
                       ("--report", "tables, tests and the figure from the finished runs")):
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.steps = [k for k in ("select_attack", "primary", "profile", "controls", "secondary", "report") if getattr(args, k)]
    if not args.steps:
        raise UsageError("nothing to do: give --select-attack, or any of --primary --profile --controls --secondary --report")
    if args.select_attack and len(args.steps) > 1:
        raise UsageError("--select-attack runs alone: step 2 starts only once attack.json is written")
    if not (args.layers.endswith(".json") or "," in args.layers):
        raise UsageError(f"--layers must be a located-range JSON or START,END, got {args.layers!r}")
    if args.layers.endswith(".json") and not Path(args.layers).is_file():
        raise UsageError(f"no located-range file at {args.layers}")
    if args.landscape is not None:
        try:
            args.landscape = LayerRange.parse(args.landscape)
        except Exception as err:  # noqa: BLE001 - any parse failure is a usage error
            raise UsageError(f"--landscape must be START,END, got {args.landscape!r} ({err})") from None
    if not args.select_attack:
        attack = attack_path(args)
        if not attack.is_file():
            raise UsageError(f"no {attack}: run --select-attack first (PLAN step 1)")
        args.attack = json.loads(attack.read_text())
        if args.attack.get("chosen") is None:
            raise UsageError(f"{attack}: no attack in the grid left room (PLAN step 1), so step 2 does not run")
    return args


def attack_path(args) -> Path:
    return args.attack_csv.with_suffix(".json")


# ---------------------------------------------------------------- step 1


def select_attack(args, safety: LayerRange, log=print) -> dict:
    from finetune.study import VALIDATION_SET, answered, study_pairs, study_prompts
    from interp.models import load_model

    base = load_model(args.model, device=args.device, template=args.template, bridge=False)
    first = P.attack_config(*P.ATTACK_GRID[0], device=args.device)
    pairs = study_pairs(base, first)
    before_path = args.out / "attack" / "before.json"
    key = {"spec": args.model, "fingerprint": base.fingerprint(), "quality": [q for q, _ in pairs["quality"]]}
    saved = json.loads(before_path.read_text()) if before_path.is_file() else {}
    if saved.get("key") != key:
        from finetune.evaluate import evaluate

        flags = answered(base, study_prompts(VALIDATION_SET))
        quality = evaluate(base, harmful_sets=(), quality_pairs=pairs["quality"]).quality
        saved = {"key": key, "before": {"V_h": flags, "quality": quality}}
        atomic_write_json(before_path, saved)
    before = saved["before"]
    rule = {"min_rouge": args.min_rouge}
    n_layers = base.n_layers
    del base

    def cells(grid):
        tasks = [P.Task(args.out / "attack" / f"steps{s}-lr{lr:g}", "implicit", "full", 0,
                        P.attack_config(s, lr, device=args.device)) for s, lr in grid]
        records = P.run_tasks(args.model, safety, tasks, workers=args.workers, progress=not args.no_progress, log=log)
        return [P.attack_row(r, s, lr, before) for r, (s, lr) in zip(records, grid)]

    rows = cells(P.ATTACK_GRID)
    chosen = P.choose_attack(rows, **rule)
    if chosen is None:
        log("no cell of the grid qualifies: trying %d steps at %g" % P.ATTACK_FALLBACK)
        rows += cells([P.ATTACK_FALLBACK])
        chosen = P.choose_attack(rows[-1:], **rule)
    table = pd.DataFrame(rows).assign(V_h_R_h_before=float(np.mean(before["V_h"])))
    table["qualifies"] = [P.qualifies(r, **rule) for r in rows]
    table["chosen"] = [chosen is not None and (r["steps"], r["lr"]) == (chosen["steps"], chosen["lr"]) for r in rows]
    stride = P.choose_stride(chosen, n_layers, safety) if chosen else None
    result = {"chosen": {"steps": chosen["steps"], "lr": chosen["lr"]} if chosen else None, "stride": stride,
              "rule": {"min_answered": P.MIN_ANSWERED, **rule}, "safety": str(safety),
              "rows": rows}
    atomic_write_csv(args.attack_csv, table)
    atomic_write_json(attack_path(args), result)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print("chosen:", result["chosen"] or "none: the study stops here (PLAN step 1)", "| stride:", stride)
    return result


# ---------------------------------------------------------------- step 2


def configs(args) -> tuple:
    steps, lr = args.attack["chosen"]["steps"], args.attack["chosen"]["lr"]
    return P.full_config(steps, lr, args.device), P.lean_config(steps, lr, args.device)


def windows(args, safety: LayerRange, n_layers: int) -> list[LayerRange]:
    return P.profile_windows(n_layers, safety, args.attack["stride"]["stride"])


def mean_primary(records) -> dict[str, float]:
    """Per mode: the mean primary R_h over its runs."""
    by_mode: dict[str, list] = {}
    for r in records:
        by_mode.setdefault(r.mode, []).append(np.mean(r.final[P.PRIMARY]))
    return {mode: float(np.mean(v)) for mode, v in by_mode.items()}


# ---------------------------------------------------------------- tables


def flags(records, data: str, mode: str, seeds, outcome: str, no_neighbour: list[int]) -> np.ndarray:
    runs = {(r.data, r.mode, r.seed): r for r in records}
    return np.array([P.outcome_flags(runs[data, mode, s].final, outcome, no_neighbour) for s in seeds], dtype=bool)


def common_seeds(records, data: str, *modes: str) -> list[int]:
    sets = [{r.seed for r in records if r.data == data and r.mode == m} for m in modes]
    return sorted(set.intersection(*sets)) if sets else []


def primary_table(records, no_neighbour: list[int], data: str = "implicit", mode: str = "sppft",
                  reference: str = "full") -> pd.DataFrame:
    """``mode`` - ``reference`` per outcome, paired by seed and request."""
    seeds = common_seeds(records, data, mode, reference)
    rows = []
    for outcome in P.OUTCOMES if seeds else ():
        a, b = (flags(records, data, m, seeds, outcome, no_neighbour) for m in (mode, reference))
        ci95, eq = seeds_difference(a, b), tost(a, b, MARGIN)
        rows.append({"data": data, "mode": mode, "reference": reference, "outcome": outcome, "seeds": len(seeds),
                     "n": a.shape[1], "R_h": a.mean(), "R_h_reference": b.mean(), "difference": ci95["mean"],
                     "lo95": ci95["lo"], "hi95": ci95["hi"], "lo90": eq["lo90"], "hi90": eq["hi90"],
                     "equivalent": eq["equivalent"],
                     "mcnemar_p": [round(mcnemar_exact(x, y)["p"], 6) for x, y in zip(a, b)],
                     "pooled_mcnemar_p": pooled_mcnemar_exact(a, b)["p"], "cmh_p": cmh_test(a, b)["p"]})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["cmh_p_holm"] = holm(table["cmh_p"].to_numpy())
    return table


def profile_table(records, safety: LayerRange, no_neighbour: list[int]) -> pd.DataFrame:
    """Per window of the located range's size (a landscape winner of another size is left out of
    the profile and its test): mean R_h per outcome over seeds, the primary one with its interval."""
    rows = []
    sized = {r.mode for r in records if P.parse_window(r.mode) and len(P.parse_window(r.mode)) == len(safety)}
    for mode in sorted(sized, key=lambda m: P.parse_window(m).start):
        window = P.parse_window(mode)
        seeds = common_seeds(records, "implicit", mode)
        row = {"window": str(window), "start": window.start, "end": window.end, "located": window == safety,
               "seeds": len(seeds)}
        for outcome in P.OUTCOMES:
            stat = seeds_interval(flags(records, "implicit", mode, seeds, outcome, no_neighbour))
            row[outcome] = stat["mean"]
            if outcome == P.PRIMARY:
                row["lo"], row["hi"] = stat["lo"], stat["hi"]
        rows.append(row)
    return pd.DataFrame(rows)


def profile_test(profile: pd.DataFrame, safety: LayerRange) -> dict:
    """The located window's rank among the windows by mean primary R_h, its permutation p-value,
    the best other window and the median window."""
    if profile.empty or not profile["located"].any():
        return {}
    located = int(np.flatnonzero(profile["located"].to_numpy())[0])
    means = profile[P.PRIMARY].to_numpy()
    best = P.best_window(dict(zip(("window%d-%d" % (s, e) for s, e in zip(profile.start, profile.end)), means)), safety)
    return {**rank_pvalue(means, located), "located_mean": float(means[located]), "best_window": str(best),
            "median_mean": float(np.median(means)), "windows": len(means)}


def controls_table(full_records, lean_records, no_neighbour: list[int]) -> pd.DataFrame:
    """Each control against SPPFT (seeds both have), per outcome; Holm over the whole table."""
    rows = []
    records = list(full_records) + list(lean_records)
    for control in P.CONTROLS:
        seeds = common_seeds(records, "implicit", control, "sppft")
        for outcome in P.OUTCOMES if seeds else ():
            a, b = (flags(records, "implicit", m, seeds, outcome, no_neighbour) for m in (control, "sppft"))
            diff = seeds_difference(a, b)
            frozen = next(r.train.get("frozen_elements") for r in lean_records if r.mode == control)
            rows.append({"control": control, "outcome": outcome, "seeds": len(seeds), "frozen_elements": frozen,
                         "R_h": a.mean(), "R_h_sppft": b.mean(), "difference": diff["mean"], "lo95": diff["lo"],
                         "hi95": diff["hi"], "cmh_p": cmh_test(a, b)["p"]})
    table = pd.DataFrame(rows)
    if not table.empty:
        table["cmh_p_holm"] = holm(table["cmh_p"].to_numpy())
    return table


def reading(primary: pd.DataFrame, test: dict, stride: int, sppft_mean: float | None) -> dict:
    """Which of PLAN.md's readings the data support (its section "Which reading ...").  "Not below
    zero" for reading 3 is read as the 90% interval's lower end at or above zero."""
    if primary.empty:
        return {"readings": [], "why": "no SPPFT-vs-full runs"}
    row = primary[primary.outcome == P.PRIMARY].iloc[0]
    below = bool(row.cmh_p_holm < 0.05 and row.hi95 < 0)
    holds = []
    if below and test:
        first = test["rank"] == 1
        if first and (stride == 2 or test["p"] <= 0.05):
            holds.append(1)
        elif (test["p"] > 0.05 or (stride == 2 and not first)) and sppft_mean is not None \
                and abs(test["median_mean"] - sppft_mean) <= MARGIN:
            holds.append(2)
    if bool(row.equivalent) or row.lo90 >= 0:
        holds.append(3)
    return {"readings": holds or ["not decided at this size"], "sppft_below_full": below,
            "difference": float(row.difference), "ci95": [float(row.lo95), float(row.hi95)],
            "ci90": [float(row.lo90), float(row.hi90)], "profile": test, "stride": stride}


# ---------------------------------------------------------------- main


@main_guard
def main(argv=None) -> dict:
    from finetune.masks import resolve_range
    from finetune.study import finished_runs
    from interp.export import load_located
    from interp.models import load_model

    args = parse_args(argv)
    if args.layers.endswith(".json"):
        load_located(args.layers)
    model = load_model(args.model, device=args.device, template=args.template, bridge=False)
    safety, n_layers = resolve_range(args.layers, model), model.n_layers
    del model
    if args.select_attack:
        return select_attack(args, safety)
    full, lean = configs(args)
    profile_windows = windows(args, safety, n_layers)
    run = dict(workers=args.workers, progress=not args.no_progress)
    if args.primary:
        P.run_tasks(args.model, safety, P.primary_tasks(args.out, full), before=True, **run)
    if args.profile:
        extra = [args.landscape] if args.landscape is not None and len(args.landscape) != len(safety) else []
        P.run_tasks(args.model, safety, P.profile_tasks(args.out, lean, profile_windows + extra), **run)
    if args.controls:
        P.run_tasks(args.model, safety, P.control_tasks(args.out, lean), **run)
    if args.secondary:
        done = [r for r in finished_runs(args.model, safety, lean, args.out) if P.parse_window(r.mode)]
        if {P.window_mode(w) for w in profile_windows} - {r.mode for r in done}:
            raise UsageError("--secondary needs the whole profile (its best window): run --profile first")
        best = P.best_window(mean_primary(done), safety)
        P.run_tasks(args.model, safety, P.secondary_tasks(args.out, full, best), **run)
    if not args.report:
        return {}
    return report(args, safety, full, lean)


def report(args, safety: LayerRange, full, lean) -> dict:
    from analyses.protection_plot import plot_profile
    from finetune.study import audit_table, finished_runs, load_before, summarise

    full_records, lean_records = (finished_runs(args.model, safety, c, args.out) for c in (full, lean))
    secondary = finished_runs(args.model, safety, full, args.out / "secondary")
    if not full_records and not lean_records:
        raise UsageError(f"no finished runs under {args.out}/runs with the chosen attack")
    no_neighbour = P.advbench_no_neighbour()
    primary = primary_table(full_records, no_neighbour)
    normal = primary_table(secondary, no_neighbour, data="normal")
    profile = profile_table(lean_records, safety, no_neighbour)
    test = profile_test(profile, safety)
    controls = controls_table(full_records, lean_records, no_neighbour)
    sppft = [r for r in full_records if r.data == "implicit" and r.mode == "sppft"]
    sppft_mean = float(np.mean([np.mean(r.final[P.PRIMARY]) for r in sppft])) if sppft else None
    verdict = reading(primary, test, args.attack["stride"]["stride"], sppft_mean)
    bands = {label: [r for r in records if r.data == "implicit" and r.mode == mode]
             for label, mode, records in (("full", "full", full_records), ("SPPFT", "sppft", full_records),
                                          *((c, c, lean_records) for c in P.CONTROLS))}
    if args.landscape is not None and len(args.landscape) != len(safety):
        extra = [r for r in lean_records if r.mode == P.window_mode(args.landscape)]
        if extra:
            verdict["landscape_row"] = {"window": str(args.landscape), "seeds": len(extra),
                                        "R_h": float(np.mean([np.mean(r.final[P.PRIMARY]) for r in extra]))}
    written = [atomic_write_csv(args.out / "primary.csv", pd.concat([primary, normal])),
               atomic_write_csv(args.out / "profile.csv", profile), atomic_write_csv(args.out / "controls.csv", controls),
               atomic_write_json(args.out / "reading.json", {**verdict, "no_neighbour_n": len(no_neighbour)})]
    if full_records and (args.out / "runs" / "before.json").is_file():
        before = load_before(args.out)
        audited = full_records + secondary
        final, dose = summarise(audited, before)
        written += [atomic_write_csv(args.out / "final.csv", final.drop(columns="per_seed")),
                    atomic_write_csv(args.out / "dose.csv", dose),
                    atomic_write_csv(args.out / "audit.csv", audit_table(audited, before))]
    if not profile.empty:
        fig = plot_profile(profile, bands, safety, landscape=args.landscape,
                           title=f"{args.model}: R_h after the attack ({args.attack['chosen']})")
        written.append(atomic_savefig(args.out / "protection.png", fig))
    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.max_rows", 200):
        for name, table in (("SPPFT - full", pd.concat([primary, normal])), ("profile", profile), ("controls", controls)):
            if not table.empty:
                print(f"\n{name}:\n{table.to_string(index=False)}")
    print("\nreading:", verdict["readings"], "| profile:", test)
    print("wrote", ", ".join(str(p) for p in written))
    return {"primary": primary, "profile": profile, "controls": controls, "reading": verdict}


if __name__ == "__main__":
    main()
