"""``analyses.locate --landscape``: R_o of every layer range, the global winner confirmed on
D_o with a bootstrap, where the bound searches land on it, and the split-half check
(``interp.landscape``; the procedure and the split rule: ``docs/locate/LANDSCAPE_PLAN.md``).

    python -m analyses.locate --model embedded --landscape [--landscape-limit 128] [--confirm-top 10]
        [--alpha 1.2] [--alpha-rule fixed|std] [--init 14,22 --init 14,29 | --init-from FILE --all-bands]
        [--n-boot 2000] [--allow-below-unscaled] [--out results/locate]

1. The coarse landscape: every range on ``--landscape-limit`` queries spread over D_o, at
   ``--alpha`` (and, with ``--alpha-rule std``, also at the α the paper's std rule picks from the
   first start: App. A.3.4, steps of ``--alpha-step`` until the lower-bound sweep's std reaches
   ``--target-std``), written start by start to ``landscape-a<alpha>.csv`` (a rerun resumes).
   On two cores, two processes with ``--landscape-part 1/2`` and ``2/2`` (one torch thread each)
   measure half the ranges each; the command without it then merges their files and goes on.
2. The paper's bound search from each start, run on the landscape's values (no new generation),
   and the rank of its result among all ranges: ``starts-rank.csv``.
3. The ``--confirm-top`` best ranges confirmed on the D_o selection (``--limit``/``--sample``;
   all 731 by default): ``confirm.csv``; the winner, the runner-up and each candidate's bootstrap
   probability of being the best (``--n-boot`` query resamples): ``global.json``, beside the
   split-half result on the confirmed ranges and on the whole coarse landscape.
4. ``landscape.png`` (the heatmap with each search's path, its result and the winner) and, with
   two alphas, ``landscapes.png`` side by side.
5. ``located.json`` for the winner, unless its R_o is below the unscaled model's (not a
   safety-layer range by the paper's definition): then the export is refused (exit 2) unless
   ``--allow-below-unscaled``.

Wiring (two lines in ``analyses/locate.py``): ``add_landscape_options(parser)`` in
``parse_args``, and ``if args.landscape: return run_landscape(args, model, queries)`` in ``main``
once the model and queries are loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from analyses.cli import UsageError, positive_int
from analyses.landscape_plot import plot_landscape, plot_landscapes, search_path
from interp.data import prompts_hash
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json
from interp.judge import DEFAULT_JUDGE
from interp.landscape import (
    BelowUnscaledError,
    LandscapeEvaluator,
    check_exportable,
    choose_alpha_std,
    global_location,
    landscape,
    landscape_meta,
    part_starts,
    rank_of,
    split_stability,
)
from interp.locate import BoundSearch, SweepRow, search_bounds
from interp.overrejection import DATASET, over_rejection_prompts
from interp.ranges import LayerRange
from interp.scaling import ALL_COMPONENTS


def add_landscape_options(parser: argparse.ArgumentParser) -> None:
    """The ``--landscape`` options of ``analyses.locate`` (module docstring)."""
    group = parser.add_argument_group("landscape (every range instead of the bound search)")
    group.add_argument("--landscape", action="store_true",
                       help="measure R_o of every layer range, confirm the best on D_o and report the global winner")
    group.add_argument("--landscape-limit", type=positive_int, default=128,
                       help="queries spread over D_o for the coarse landscape (default 128)")
    group.add_argument("--confirm-top", type=int, default=10,
                       help="best coarse ranges confirmed on the D_o selection (--limit; all 731 by default)")
    group.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples of the queries")
    group.add_argument("--alpha-rule", choices=("fixed", "std"), default="fixed",
                       help="std: also the landscape at the alpha of the paper's std rule (App. A.3.4), "
                            "and locate there")
    group.add_argument("--landscape-part", default=None, metavar="K/N",
                       help="measure only part K of N of the coarse landscape's starts (balanced by ranges) and stop; "
                            "run N such processes (e.g. one per core), then the command without it to merge and go on")
    group.add_argument("--allow-below-unscaled", action="store_true",
                       help="export the winner even if its R_o is below the unscaled model's")


def _paths(frame: pd.DataFrame, initials, n_layers: int, args) -> tuple[dict, pd.DataFrame]:
    """Each start's bound search on the landscape's own values, and its rank there."""
    values = {(int(s), int(e)): float(v) for s, e, v in zip(frame["start"], frame["end"], frame["R_o"])}
    unscaled, alpha = float(frame["unscaled_R_o"].iloc[0]), float(frame["alpha"].iloc[0])

    def ro(layer_range, a):
        return unscaled if layer_range is None else values[(layer_range.start, layer_range.end)]

    paths, rows = {}, []
    for initial in initials:
        result = search_bounds(ro, initial, alpha, n_layers, window=getattr(args, "window", 2),
                               upper_offsets=getattr(args, "upper", None), lower_offsets=getattr(args, "lower", None),
                               extend=getattr(args, "extend", False))
        paths[str(initial)] = search_path(result)
        rank, n = rank_of(frame, result.range)
        rows.append({"start": str(initial), "located": str(result.range), "R_o": result.located_r_o,
                     "unscaled_R_o": unscaled, "rank": rank, "n_ranges": n})
    return paths, pd.DataFrame(rows)


def _located_result(location, n_layers: int) -> BoundSearch:
    """The global winner in the located-range schema's shape: one upper row (the winner) and
    the confirmed candidates as the lower rows (offset: their place, best first)."""
    alpha, table = location.alpha, location.candidates
    win = location.winner
    upper = [SweepRow("upper", win, alpha, 0, float(table["R_o"].iloc[0]), winner=True)]
    lower = [SweepRow("lower", LayerRange(int(s), int(e)), alpha, n, float(v), winner=n == 0)
             for n, (s, e, v) in enumerate(zip(table["start"], table["end"], table["R_o"]))]
    return BoundSearch(win, alpha, float(location.unscaled), upper, lower, win, n_layers)


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        part, n_parts = (int(p) for p in text.split("/"))
    except ValueError:
        raise UsageError(f"--landscape-part {text!r}: write it as K/N, e.g. 1/2") from None
    if not 1 <= part <= n_parts:
        raise UsageError(f"--landscape-part {text!r}: K must be in 1..N")
    return part, n_parts


def _alpha_choice(args, model, coarse: list[str], initial, common: dict, out: Path) -> dict:
    """The std rule's record (``choose_alpha_std``), read back from ``alpha_choice.json`` when a
    run (e.g. the other ``--landscape-part``) already made it with the same settings."""
    meta = landscape_meta(model, coarse, args.alpha, ALL_COMPONENTS, args.max_new_tokens, DEFAULT_JUDGE)
    settings = {**{k: meta[k] for k in ("model_fingerprint", "template", "prompts_hash", "judge")}, "start": str(initial),
                "increase": args.alpha > 1, "step": getattr(args, "alpha_step", 0.05),
                "target_std": getattr(args, "target_std", None), "max_steps": getattr(args, "max_alpha_steps", 8),
                "window": getattr(args, "window", 2), "extend": bool(getattr(args, "extend", False)),
                "max_new_tokens": args.max_new_tokens}
    path = out / "alpha_choice.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") == json.loads(json.dumps(settings)):
            return old
    evaluator = LandscapeEvaluator(model, coarse, **{k: v for k, v in common.items() if k != "components"})
    choice = choose_alpha_std(evaluator, initial, increase=settings["increase"], step=settings["step"],
                              target_std=settings["target_std"], max_steps=settings["max_steps"],
                              window=settings["window"], extend=settings["extend"])
    record = {**choice.to_dict(), "settings": settings}
    atomic_write_json(path, record)
    return record


def run_landscape(args, model, queries: list[str]) -> dict:
    """Steps 1-5 of the module docstring; ``queries``: the D_o selection to confirm on."""
    out = Path(args.out)
    n_layers = model.n_layers
    if args.confirm_top < 0:
        raise UsageError(f"--confirm-top must be >= 0, got {args.confirm_top}")
    part = parse_part(getattr(args, "landscape_part", None))
    coarse = over_rejection_prompts(args.landscape_limit, "spread")
    components = tuple(getattr(args, "components", None) or ())
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=getattr(args, "batch_size", None))
    if components:
        common["components"] = components
    initials = list(getattr(args, "initials", None) or [])
    alphas, choice = [args.alpha], None
    if args.alpha_rule == "std":
        if not initials:
            raise UsageError("--alpha-rule std runs the bound search from a start: give --init or --init-from")
        choice = _alpha_choice(args, model, coarse, initials[0], common, out)
        print(f"alpha rule: {choice['alpha']:g} ({'reached' if choice['reached'] else 'did not reach'} the target std "
              f"{choice['target_std']:.2f}); " + ", ".join(f"{t['alpha']:g}: std {t['lower_std']:.2f}"
                                                          for t in choice["trials"]))
        alphas = list(dict.fromkeys([choice["alpha"], args.alpha]))
    frames = {}
    for alpha in alphas:
        name = f"landscape-a{alpha:g}"
        if part is not None:
            path = out / f"{name}.part{part[0]}of{part[1]}.csv"
            landscape(model, coarse, alpha, path=path, starts=part_starts(n_layers, *part), **common)
            print(f"wrote {path} (part {part[0]} of {part[1]}); run without --landscape-part once every part is done")
            continue
        frames[alpha] = landscape(model, coarse, alpha, path=out / f"{name}.csv",
                                  also_from=sorted(out.glob(f"{name}.part*of*.csv")), **common)
    if part is not None:
        return {"part": list(part), "alphas": alphas}
    alpha = alphas[0]  # the rule's alpha when there is one, else --alpha
    frame = frames[alpha]
    paths, starts = _paths(frame, initials, n_layers, args) if initials else ({}, pd.DataFrame())
    written = [atomic_write_csv(out / "starts-rank.csv", starts)] if len(starts) else []
    record: dict = {"alpha": alpha, "alphas": alphas, "n_layers": n_layers, "coarse_queries": len(coarse),
                    "coarse_prompts_hash": prompts_hash(coarse), "alpha_rule": choice,
                    "starts": starts.to_dict("records"),
                    "split_coarse": split_stability(frame, coarse)}
    location = None
    if args.confirm_top > 0:
        location = global_location(model, frame, queries, top=args.confirm_top, n_boot=args.n_boot,
                                   path=out / f"confirm-a{alpha:g}.csv", **common)
        confirmed = pd.read_csv(out / f"confirm-a{alpha:g}.csv", dtype={"flags": str})
        record |= {"global": location.to_dict(), "confirm_queries": len(queries),
                   "confirm_prompts_hash": prompts_hash(queries), "split_confirmed": split_stability(confirmed, queries)}
    chosen = [] if location is None else [("global winner", location.winner, "*")]
    title = f"{model.spec}: R_o landscape"
    written.append(atomic_savefig(out / "landscape.png", plot_landscape(frame, n_layers, paths=paths, chosen=chosen,
                                                                        title=title)))
    if len(alphas) > 1:
        written.append(atomic_savefig(out / "landscapes.png",
                                      plot_landscapes([frames[a] for a in alphas], n_layers, title=title)))
    written.append(atomic_write_json(out / "global.json", record))
    _report(record, location)
    if location is not None:
        try:
            check_exportable(location, args.allow_below_unscaled)
        except BelowUnscaledError as err:
            print("wrote", ", ".join(str(p) for p in written))
            raise UsageError(str(err)) from None
        from interp.export import export_located

        written.append(export_located(
            out / "located.json", _located_result(location, n_layers), model, dataset=DATASET,
            dataset_hash=prompts_hash(queries), n_prompts=len(queries), method="generation (global landscape)",
            template=model.template, max_new_tokens=args.max_new_tokens, components=components or ALL_COMPONENTS,
            alpha_selection=choice,
            extra_metric={"landscape": {"coarse_queries": len(coarse), "top": args.confirm_top,
                                        "p_best": float(location.candidates["p_best"].iloc[0]),
                                        "below_unscaled": bool(location.candidates["below_unscaled"].iloc[0])}},
        ))
    print("wrote", ", ".join(str(p) for p in written))
    return record


def _report(record: dict, location) -> None:
    for row in record["starts"]:
        print(f"bound search from {row['start']}: {row['located']} (R_o {row['R_o']:g}), rank {row['rank']} of "
              f"{row['n_ranges']} on the landscape")
    split = record["split_coarse"]
    print(f"split (coarse landscape): A picks {split['winner_A']}, B picks {split['winner_B']} "
          f"({'same' if split['same_winner'] else 'different'} range)")
    if location is None:
        return
    table = location.candidates
    print(f"global location x{location.alpha:g} on {location.n_queries} queries (unscaled R_o {location.unscaled}):")
    for row in table.itertuples():
        flag = "  BELOW UNSCALED" if row.below_unscaled else ""
        print(f"  [{row.start},{row.end}] R_o {row.R_o} (coarse rank {row.coarse_rank}), "
              f"P(best) {row.p_best:.3f}{flag}")
    print(f"winner {location.winner}, runner-up {location.runner_up}")
    split = record["split_confirmed"]
    print(f"split (confirmed ranges): A picks {split['winner_A']}, B picks {split['winner_B']}; on B, A's winner "
          f"has R_o {split['on_B']['its_R_o']} against B's own {split['on_B']['own_winner_R_o']}")
