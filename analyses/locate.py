"""Locate the safety layers by scaling (Li et al. §3.4-3.5): the upper- then lower-bound sweep.

    python -m analyses.locate --model embedded [--init 6,12 [--init 14,22 ...] | --init-from FILE [--all-bands]]
        [--alpha 1.2 | --choose-alpha] [--window 2 | --upper-offsets=-3,3 --lower-offsets=-2,4]
        [--method prune|generation|fast|estimate] [--components all|paper-code|q,k,v,...]
        [--limit N [--sample first|spread]] [--template chat|alpaca] [--out results/locate]

R_o is the number of over-rejection queries (all 731 of D_o, or ``--limit`` of them) the scaled
model refuses, greedy with ``--max-new-tokens`` (16, the paper's code), judged by
``interp.judge``.  The initial range is ``--init``, or from an existence analysis (``--init-from``):
the band where the aligned model's paired gap exceeds the base model's on validation pairs when
the file holds one (the wording control), else the unpaired onset rule's suggestion.
The search is local, so where it starts can decide what it finds.  Several starts (``--init``
given more than once, or ``--all-bands``: every distinct validation band of the existence file,
where the paired gap's difference is above zero and where the two models' intervals part) each
run into ``--out/start-A-B/`` and the range with the best R_o (the search's own objective) is
written to ``--out``, with ``starts.csv`` listing every start.
``--method`` (``interp.ro_search``): ``prune`` (default; generated R_o, with candidates the
first-step bound proves cannot win skipped), ``generation`` (every candidate generated), ``fast``
(first-step estimate, ``--keep`` best per sweep generated) or ``estimate``.
``--choose-alpha`` applies the paper's α rule (steps of ``--alpha-step`` away from 1 until the std
of R_o over the lower-bound sweep reaches ``--target-std``, by default 17.5 per 721 queries).
``--components paper-code`` leaves ``o_proj`` unscaled, as the official code did (PAPER.md §2).

``--landscape`` (``analyses.landscape``, ``interp.landscape``) replaces the local search by a global one:
R_o of every range [i, j] on ``--landscape-limit`` spread queries, the best ``--confirm-top`` confirmed
on the ``--limit`` selection (all of D_o by default) with a bootstrap probability of being best, a
split-half check, and each start's bound search replayed on the table with the rank of its result.

Writes under ``--out``: ``located.json`` (``interp.export``; read by fine-tuning), ``sweeps.csv``,
``sweeps.png`` and ``cache/ro_cache_*.json`` (every evaluated configuration, so an interrupted or
widened run continues where it stopped; the starts of one run share it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from analyses.cli import (
    UsageError,
    add_limit_options,
    add_model_options,
    main_guard,
    model_from,
    parser_for,
    positive_int,
)
from analyses.landscape import add_landscape_options, run_landscape
from analyses.plots import plot_sweeps
from interp.data import prompts_hash
from interp.export import export_located
from interp.io import atomic_savefig, atomic_write_csv
from interp.overrejection import DATASET, DEFAULT_MAX_NEW_TOKENS, over_rejection_prompts
from interp.ranges import LayerRange, LayerRangeError
from interp.ro_search import METHODS, LocationRun, best_run, locate_safety_layers
from interp.scaling import ALL_COMPONENTS, PAPER_CODE_COMPONENTS, check_components

DEFAULT_EXISTENCE = "results/existence/existence.json"


def parse_components(text: str) -> tuple[str, ...]:
    if text == "all":
        return ALL_COMPONENTS
    if text == "paper-code":
        return PAPER_CODE_COMPONENTS
    return check_components(tuple(p.strip() for p in text.split(",") if p.strip()))


def parse_offsets(text: str | None):
    """``"-1,3"`` -> offsets -1..3 (inclusive)."""
    if text is None:
        return None
    try:
        lo, hi = (int(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"offsets {text!r}: write them as LO,HI, e.g. --lower-offsets=-1,3") from None
    if lo > hi:
        raise UsageError(f"offsets {text!r}: the first must not exceed the second")
    return list(range(lo, hi + 1))


def initials_from_existence(path: str | Path, spec: str | None = None) -> list[LayerRange]:
    """Every distinct start an existence JSON offers for ``spec``: the validation bands where the
    paired gap's difference is above zero and where the two models' gap intervals part (in that
    order), or, without them, ``initial_from_existence``'s single start."""
    first = initial_from_existence(path, spec)
    data = json.loads(Path(path).read_text())
    entry = next((m for m in data["models"] if m.get("model") == spec), data["models"][0])
    if paired_band(data, entry.get("model")) is None or (data.get("config") or {}).get("pairs_part", "test") == "test":
        return [first]
    starts = [first]
    band = paired_band(data, entry.get("model"), "non_overlapping")
    if band is not None and LayerRange(int(band[0]), int(band[1])) not in starts:
        starts.append(LayerRange(int(band[0]), int(band[1])))
    return starts


def initial_from_existence(path: str | Path, spec: str | None = None) -> LayerRange:
    """The initial range from an ``analyses.existence`` JSON (the entry for ``spec`` if there is
    one, else the first model's).

    Wording-controlled first: the band where the model's paired gap exceeds the compared model's,
    when the file holds a paired comparison made on pairs other than the test pairs (a test split
    chooses nothing).  Otherwise the unpaired onset rule's suggestion (the paper's start), whose
    harmful and benign sets also differ in wording."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no existence result at {path}; run `python -m analyses.existence` or pass --init START,END")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); re-run the existence analysis") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not models:
        raise UsageError(f"{path} holds no 'models' entries: not an existence-analysis result")
    entry = next((m for m in models if m.get("model") == spec), models[0])
    band = paired_band(data, entry.get("model"))
    part = (data.get("config") or {}).get("pairs_part", "test")
    if band is not None and part != "test":
        print(f"{path}: starting from the layers where the paired gap of {entry.get('model')} exceeds the base "
              f"model's ({part} pairs): [{band[0]},{band[1]}]")
        return LayerRange(int(band[0]), int(band[1]))
    suggestion = (entry.get("suggested_range") or {}).get("range")
    if suggestion is not None:
        return LayerRange(int(suggestion[0]), int(suggestion[1]))
    reason = (entry.get("suggested_range") or {}).get("reason", "no reason recorded")
    if band is None:
        raise LayerRangeError(f"{path}: the existence analysis suggested no range for {entry.get('model')} "
                              f"({reason}) and holds no paired comparison to fall back on; pass --init START,END")
    raise LayerRangeError(f"{path}: no unpaired suggestion for {entry.get('model')} ({reason}), and its paired band "
                          "comes from the test pairs, which may not choose anything; re-run the existence analysis "
                          "with --pairs-part validation, or pass --init START,END")


def paired_band(data: dict, model: str | None, kind: str = "difference_above_zero") -> list[int] | None:
    """A band of layers from an existence JSON's ``paired.comparison`` (the rule's gap definition,
    raw): where ``model``'s paired gap exceeds the compared model's (``difference_above_zero``) or
    where the two models' intervals do not overlap (``non_overlapping``); ``None`` if there is none."""
    comparison = (data.get("paired") or {}).get("comparison") or {}
    if comparison.get("a") != model:
        return None
    gap = (data.get("config") or {}).get("gap", "code")
    return ((comparison.get("bands") or {}).get(f"gap_{gap}") or {}).get(kind)


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init", action="append",
                       help="initial range START,END (0-indexed, inclusive); give it again for more starts")
    start.add_argument("--init-from", help=f"existence-analysis JSON with the suggested range (default {DEFAULT_EXISTENCE})")
    parser.add_argument("--all-bands", action="store_true",
                        help="with --init-from: start from every distinct validation band of the file and keep "
                             "the range with the best R_o")
    parser.add_argument("--alpha", type=float, default=1.2, help="scale; > 1 maximises R_o, < 1 minimises it")
    parser.add_argument("--choose-alpha", action="store_true", help="pick alpha by the paper's std rule")
    parser.add_argument("--alpha-step", type=float, default=0.05)
    parser.add_argument("--target-std", type=float, default=None, help="lower-sweep std to reach (default 17.5 x prompts / 721)")
    parser.add_argument("--max-alpha-steps", type=positive_int, default=8)
    parser.add_argument("--window", type=int, default=2, help="offsets -W..W for both sweeps")
    parser.add_argument("--upper-offsets", help="offsets of the upper sweep as LO,HI (overrides --window)")
    parser.add_argument("--lower-offsets", help="offsets of the lower sweep as LO,HI (write --lower-offsets=-1,3)")
    parser.add_argument("--extend", action="store_true",
                        help="widen a sweep past its window while its winner sits at the window's edge")
    parser.add_argument("--method", default="prune", choices=METHODS)
    parser.add_argument("--keep", type=positive_int, default=2, help="with --method fast: rows generated per sweep")
    parser.add_argument("--components", default="all", help="all, paper-code (no o_proj), or a list such as q,k,v,o")
    add_limit_options(parser, "of D_o")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: from free memory")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("results/locate"))
    parser.add_argument("--ship", action="store_true",
                        help="also copy located.json beside the shipped aligned adapter (interp.shipped_located)")
    add_landscape_options(parser)
    args = parser.parse_args(argv)
    if args.ship and args.model != "embedded":
        raise UsageError("--ship is for the shipped aligned model (--model embedded) only")
    args.components = parse_components(args.components)
    args.upper = parse_offsets(args.upper_offsets)
    args.lower = parse_offsets(args.lower_offsets)
    if args.alpha <= 0 or args.alpha == 1:
        raise UsageError(f"--alpha must be > 0 and differ from 1, got {args.alpha}")
    if args.landscape and args.confirm_top < 0:
        raise UsageError(f"--confirm-top must be >= 0, got {args.confirm_top}")
    if args.all_bands and args.init:
        raise UsageError("--all-bands reads its starts from an existence file; use it with --init-from, not --init")
    if args.init:
        args.initials = list(dict.fromkeys(LayerRange.parse(text) for text in args.init))
    elif args.landscape and not args.init_from:
        args.initials = []  # the starts only replay the bound search on the landscape
    elif args.all_bands:
        args.initials = initials_from_existence(args.init_from or DEFAULT_EXISTENCE, args.model)
    else:
        args.initials = [initial_from_existence(args.init_from or DEFAULT_EXISTENCE, args.model)]
    return args


def write_outputs(out: Path, run: LocationRun, model, queries, args) -> list[Path]:
    result, choice = run.result, run.alpha_choice
    written = [export_located(
        out / "located.json", result, model, dataset=DATASET, dataset_hash=prompts_hash(queries),
        n_prompts=len(queries), method=run.method_name, template=model.template,
        max_new_tokens=None if args.method == "estimate" else args.max_new_tokens, components=args.components,
        alpha_selection=None if choice is None else choice.to_dict(), extra_metric={"search": run.to_dict()},
    )]
    frame = result.to_frame()
    if choice is not None:  # every α the rule tried, not only the chosen one
        frame = pd.concat([r.to_frame().assign(trial_alpha=a) for a, _, r in choice.trials], ignore_index=True)
    written.append(atomic_write_csv(out / "sweeps.csv", frame))
    label = "summed first-step refusal mass" if args.method == "estimate" else "R_o (generated)"
    title = f"{model.spec}: alpha {result.alpha:g}, {len(queries)} prompts, {run.method_name}"
    written.append(atomic_savefig(out / "sweeps.png", plot_sweeps(result, title, label)))
    return written


@main_guard
def main(argv=None) -> LocationRun:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = over_rejection_prompts(args.limit, args.sample)
    model = model_from(args)
    if args.landscape:
        return run_landscape(args, model, queries)
    alpha_rule = None
    if args.choose_alpha:
        target = args.target_std if args.target_std is not None else 17.5 * len(queries) / 721
        alpha_rule = {"step": args.alpha_step, "target_std": target, "max_steps": args.max_alpha_steps}
    for initial in args.initials:  # a bad range fails before any search runs
        initial.check(model.n_layers)
    runs = []
    for initial in args.initials:
        if len(args.initials) > 1:
            print(f"start {initial} ({len(runs) + 1} of {len(args.initials)})")
        runs.append(locate_safety_layers(
            model, queries, initial, alpha=args.alpha, window=args.window, upper_offsets=args.upper,
            lower_offsets=args.lower, method=args.method, keep=args.keep, components=args.components,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, cache_dir=args.out / "cache",
            alpha_rule=alpha_rule, extend=args.extend,
        ))
    if len(runs) == 1:
        run = runs[0]
        written = write_outputs(args.out, run, model, queries, args)
    else:
        for initial, each in zip(args.initials, runs):
            write_outputs(args.out / f"start-{initial.start}-{initial.end}", each, model, queries, args)
        best = best_run(runs)
        run = runs[best]
        starts = pd.DataFrame([{"start": str(initial), "located": str(each.result.range),
                                "R_o": each.result.located_r_o, "baseline_R_o": each.result.baseline,
                                "chosen": n == best, "folder": f"start-{initial.start}-{initial.end}"}
                               for n, (initial, each) in enumerate(zip(args.initials, runs))])
        written = write_outputs(args.out, run, model, queries, args) + [atomic_write_csv(args.out / "starts.csv", starts)]
        print(starts.to_string(index=False))
        print(f"chosen: {run.result.range} from the start {args.initials[best]} "
              f"({'highest' if args.alpha > 1 else 'lowest'} R_o of the {len(runs)} starts)")
    if args.ship:
        import shutil

        from interp.models import aligned_adapter_dir

        written.append(Path(shutil.copyfile(args.out / "located.json", aligned_adapter_dir() / "located.json")))
    print(f"{args.model}: {len(queries)} {DATASET} prompts, template {model.template}, components "
          f"{','.join(args.components)}, R_o by {run.method_name}: {run.n_generated} configurations generated, "
          f"{run.n_pruned} pruned (margin {run.prune_margin}), {run.cache_hits} from the cache, {run.seconds:.0f} s")
    if run.alpha_choice is not None:
        for a, std, r in run.alpha_choice.trials:
            print(f"  alpha {a:g}: lower-sweep std {std:.2f} (target {run.alpha_choice.target_std:.2f}), range {r.range}")
    print(run.result.table())
    print("wrote", ", ".join(str(p) for p in written))
    return run


if __name__ == "__main__":
    main()
