"""Locate the safety layers by scaling (Li et al. §3.4-3.5): the upper- then lower-bound sweep.

    python -m analyses.locate --model embedded [--init 6,12 | --init-from results/existence/existence.json]
        [--alpha 1.2 | --choose-alpha] [--window 2] [--fast [--keep 2] | --estimate-only]
        [--components all|paper-code|q,k,v,...] [--limit N [--spread]] [--template chat|alpaca] [--out results/locate]

R_o is the number of over-rejection queries (``interp.overrejection``; ``--limit`` of them, the first or ``--spread``)
the scaled model refuses, greedy with ``--max-new-tokens`` (16, the paper's code).  The initial
range is ``--init``, or the suggestion of the existence analysis (``--init-from``, default
``results/existence/existence.json``).  ``--fast`` scores every candidate with the first-step
estimate (summed refusal-opener probability) and confirms the ``--keep`` best of each sweep by
generation; ``--estimate-only`` skips the confirmation.  ``--choose-alpha`` applies the paper's
α rule (steps of ``--alpha-step`` away from 1 until the std of R_o over the lower-bound sweep
reaches ``--target-std``), in the direction of ``--alpha``.

Writes under ``--out``: ``located.json`` (``interp.export``; read by fine-tuning),
``sweeps.csv`` (one row per evaluated configuration), ``sweeps.png`` (R_o against the bounds),
and ``cache/ro_cache_*.json``: every evaluated configuration's R_o, so an interrupted run
continues where it stopped (the file name hashes the model, prompts and settings).
``--components paper-code`` leaves ``o_proj`` unscaled, as the official code did (PAPER.md §2).

The computation is ``locate_layers``; ``main`` only parses arguments and does the I/O.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interp.data import prompts_hash
from interp.locate import (
    RoCache,
    choose_alpha,
    estimate_ro,
    generation_ro,
    locate,
    lowest_layer,
)
from interp.overrejection import DATASET, DEFAULT_MAX_NEW_TOKENS, FirstStepEstimator, over_rejection_prompts, pearson
from interp.ranges import LayerRange, LayerRangeError
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
    lo, hi = (int(p) for p in text.split(","))
    if lo > hi:
        raise ValueError(f"offsets {text!r}: the first must not exceed the second")
    return list(range(lo, hi + 1))


def initial_from_existence(path: str | Path, spec: str | None = None) -> LayerRange:
    """The suggested initial range in an ``analyses.existence`` JSON (the entry for ``spec`` if
    there is one, else the first model's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no existence result at {path}; run `python -m analyses.existence` or pass --init START,END"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run the existence analysis") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not models:
        raise ValueError(f"{path} holds no 'models' entries: not an existence-analysis result")
    entry = next((m for m in models if m.get("model") == spec), models[0])
    suggestion = (entry.get("suggested_range") or {}).get("range")
    if suggestion is None:
        reason = (entry.get("suggested_range") or {}).get("reason", "no reason recorded")
        raise LayerRangeError(f"{path}: the existence analysis suggested no range for {entry.get('model')} "
                              f"({reason}); pass --init START,END")
    return LayerRange(int(suggestion[0]), int(suggestion[1]))


def locate_layers(
    model,
    queries: list[str],
    initial: LayerRange,
    *,
    alpha: float = 1.2,
    window: int = 2,
    upper_offsets=None,
    lower_offsets=None,
    method: str = "generation",
    keep: int = 2,
    components=ALL_COMPONENTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    alpha_rule: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run the search on ``model``.  ``method``: ``generation`` (R_o from generated text),
    ``fast`` (first-step estimate, best ``keep`` per sweep confirmed by generation) or
    ``estimate`` (first-step estimate only).  ``alpha_rule``: ``choose_alpha`` keyword arguments
    (``step``, ``target_std``, ``max_steps``) to pick α, stepping in ``alpha``'s direction.
    Returns ``result`` (``LocateResult``), ``alpha_choice`` (or None), ``method_name`` and
    ``cache_hits``."""
    if method not in ("generation", "fast", "estimate"):
        raise ValueError(f"unknown method {method!r}")
    initial.check(model.n_layers)
    meta = {
        "model_fingerprint": model.fingerprint(), "prompts_hash": prompts_hash(queries), "n_prompts": len(queries),
        "template": model.template, "components": list(components), "max_new_tokens": max_new_tokens,
    }
    caches = []

    def cached(fn, kind):
        fn = announced(fn, kind, len(queries)) if progress else fn
        if cache_dir is None:
            return fn
        cache = RoCache(fn, cache_dir, {**meta, "kind": kind})
        caches.append(cache)
        return cache

    fine = coarse = None
    if method in ("generation", "fast"):
        fine = cached(generation_ro(model, queries, components=components, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=False), "generation")
    if method in ("fast", "estimate"):
        offsets = lower_offsets if lower_offsets is not None else list(range(-window, window + 1))
        start = lowest_layer(initial, model.n_layers, lower_offsets=offsets)
        estimator = _LazyEstimator(model, queries, start, batch_size, progress)
        coarse = cached(estimate_ro(estimator, kind="mass", components=components), "first_step_mass")
    ro, confirm = (fine, None) if method == "generation" else (coarse, fine if method == "fast" else None)
    kwargs = dict(window=window, upper_offsets=upper_offsets, lower_offsets=lower_offsets, confirm=confirm, keep=keep)
    alpha_choice = None
    if alpha_rule is not None:
        alpha_choice = choose_alpha(ro, initial, model.n_layers, increase=alpha > 1, **alpha_rule, **kwargs)
        result = alpha_choice.result
    else:
        result = locate(ro, initial, alpha, model.n_layers, **kwargs)
    method_name = {"generation": "generation", "fast": "first_step_mass:generation",
                   "estimate": "first_step_mass"}[method]
    return {"result": result, "alpha_choice": alpha_choice, "method_name": method_name,
            "cache_hits": sum(c.hits for c in caches)}


def announced(fn, kind: str, n: int):
    """``fn`` that prints each configuration it evaluates (cached ones are not evaluated), so a
    sweep of minutes shows where it is."""
    counter = {"calls": 0}

    def wrapper(layer_range, alpha):
        start = time.perf_counter()
        value = fn(layer_range, alpha)
        counter["calls"] += 1
        what = "unscaled" if layer_range is None else f"{layer_range} x {alpha:g}"
        print(f"  [{kind} #{counter['calls']}] {what}: R_o {value:g} / {n} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    return wrapper


class _LazyEstimator:
    """Builds the ``FirstStepEstimator`` on first use, so a fully cached run loads nothing."""

    def __init__(self, model, queries, start, batch_size, progress):
        self.args, self.estimator = (model, queries, start, batch_size, progress), None

    def estimate(self, *args, **kwargs):
        if self.estimator is None:
            model, queries, start, batch_size, progress = self.args
            self.estimator = FirstStepEstimator(model, queries, start, batch_size=batch_size, progress=progress)
        return self.estimator.estimate(*args, **kwargs)


def estimate_agreement(result) -> dict | None:
    """Pearson r of the coarse estimate with confirmed R_o over the rows that have both."""
    rows = [r for r in result.rows if r.r_o is not None and r.estimate is not None]
    if len(rows) < 2:
        return None
    return {"n_rows": len(rows), "pearson": pearson([r.r_o for r in rows], [r.estimate for r in rows])}


def plot_sweeps(result, title: str, measure_label: str = "R_o"):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rows, bound, label in (
        (axes[0], result.upper, "end", f"upper bound (start fixed at {result.initial.start})"),
        (axes[1], result.lower, "start", f"lower bound (end fixed at {result.upper_end})"),
    ):
        xs = [getattr(r.range, bound) for r in rows]
        measured = [(x, r.r_o) for x, r in zip(xs, rows) if r.r_o is not None]
        if measured:
            ax.plot(*zip(*measured), marker="o", label=measure_label)
        if any(r.estimate is not None for r in rows):
            ax.plot(xs, [r.estimate for r in rows], marker="x", linestyle="--", label="first-step estimate")
        for x, r in zip(xs, rows):
            if r.winner:
                value = r.r_o if r.r_o is not None else r.estimate
                ax.scatter([x], [value], s=200, marker="*", color="red", zorder=5, label=f"winner {r.range}")
        ax.axhline(result.baseline, color="grey", linestyle=":", label=f"baseline {result.baseline:.4g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"{bound} layer of the scaled range")
        ax.set_title(label)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("R_o (refused over-rejection queries)")
    fig.suptitle(title)
    return fig


def write_outputs(out: Path, run: dict, model, queries, args, components) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp.export import export_located
    from interp.io import atomic_savefig, atomic_write_csv

    result, choice = run["result"], run["alpha_choice"]
    agreement = estimate_agreement(result)
    written = [export_located(
        out / "located.json", result, model, dataset=args.dataset, dataset_hash=prompts_hash(queries),
        n_prompts=len(queries), method=run["method_name"], template=model.template,
        max_new_tokens=None if args.estimate_only else args.max_new_tokens, components=components,
        alpha_selection=None if choice is None else choice.to_dict(),
        extra_metric={"estimate_agreement": agreement} if agreement else None,
    )]
    frame = result.to_frame()
    if choice is not None:  # every α the rule tried, not only the chosen one
        import pandas as pd

        frame = pd.concat([r.to_frame().assign(trial_alpha=a) for a, _, r in choice.trials], ignore_index=True)
    written.append(atomic_write_csv(out / "sweeps.csv", frame))
    label = "summed first-step refusal mass" if args.estimate_only else "R_o (generated)"
    title = f"{model.spec}: alpha {result.alpha:g}, {len(queries)} prompts, {run['method_name']}"
    fig = plot_sweeps(result, title, label)
    written.append(atomic_savefig(out / "sweeps.png", fig))
    plt.close(fig)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init", help="initial range START,END (0-indexed, inclusive)")
    start.add_argument("--init-from", help=f"existence-analysis JSON to take the suggested range from "
                                           f"(default {DEFAULT_EXISTENCE})")
    parser.add_argument("--alpha", type=float, default=1.2, help="scale; > 1 maximises R_o, < 1 minimises it")
    parser.add_argument("--choose-alpha", action="store_true", help="pick alpha by the paper's std rule")
    parser.add_argument("--alpha-step", type=float, default=0.05)
    parser.add_argument("--target-std", type=float, default=None,
                        help="lower-sweep std to reach (default: 17.5 scaled to the number of prompts / 721)")
    parser.add_argument("--max-alpha-steps", type=int, default=8)
    parser.add_argument("--window", type=int, default=2, help="offsets -W..W for both sweeps")
    parser.add_argument("--upper-offsets", help="offsets of the upper sweep as LO,HI (overrides --window)")
    parser.add_argument("--lower-offsets", help="offsets of the lower sweep as LO,HI, e.g. --lower-offsets=-1,3 (Table 1; write the = when LO is negative)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true", help="first-step estimate, best --keep per sweep confirmed")
    mode.add_argument("--estimate-only", action="store_true", help="first-step estimate, no generation")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--components", default="all", help="all, paper-code (no o_proj: the official code's bug), "
                                                            "or a list such as q,k,v,o")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--limit", type=int, default=None, help="use N over-rejection queries (the first N; see --spread)")
    parser.add_argument("--spread", action="store_true", help="with --limit: N queries evenly spaced over the set, not the first N")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype (default float32; bfloat16 halves memory on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/locate")
    args = parser.parse_args(argv)

    from interp.models import dtype_named, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    components = parse_components(args.components)
    queries = over_rejection_prompts(args.limit, dataset=args.dataset, spread=args.spread)
    model = load_model(args.model, device=args.device, dtype=dtype_named(args.dtype), template=args.template)
    initial = LayerRange.parse(args.init) if args.init else initial_from_existence(
        args.init_from or DEFAULT_EXISTENCE, args.model)
    alpha_rule = None
    if args.choose_alpha:
        target = args.target_std if args.target_std is not None else 17.5 * len(queries) / 721
        alpha_rule = {"step": args.alpha_step, "target_std": target, "max_steps": args.max_alpha_steps}
    out = Path(args.out)
    method = "fast" if args.fast else "estimate" if args.estimate_only else "generation"
    run = locate_layers(
        model, queries, initial, alpha=args.alpha, window=args.window,
        upper_offsets=parse_offsets(args.upper_offsets), lower_offsets=parse_offsets(args.lower_offsets),
        method=method, keep=args.keep, components=components, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, cache_dir=out / "cache", alpha_rule=alpha_rule,
    )
    written = write_outputs(out, run, model, queries, args, components)

    result, choice = run["result"], run["alpha_choice"]
    print(f"{args.model}: {len(queries)} {args.dataset} prompts, template {model.template}, components "
          f"{','.join(components)}, R_o by {run['method_name']} ({run['cache_hits']} values from the cache)")
    if choice is not None:
        for a, std, r in choice.trials:
            print(f"  alpha {a:g}: lower-sweep std {std:.2f} (target {choice.target_std:.2f}), range {r.range}")
        if not choice.reached:
            print(f"  the target std was not reached; using the last alpha tried, {choice.alpha:g}")
    print(result.table())
    agreement = estimate_agreement(result)
    if agreement:
        print(f"first-step estimate vs generated R_o over {agreement['n_rows']} confirmed rows: "
              f"Pearson r = {agreement['pearson'] if agreement['pearson'] is None else round(agreement['pearson'], 3)}")
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
