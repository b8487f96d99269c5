"""Existence of safety layers (Li et al. §3.1-3.3): per-layer cosine similarity of normal and
malicious prompts, the N-M vs N-N angle gap, linear separability, and a suggested initial range;
with ``--pairs``, the same on harmful/benign pairs written in the same sentence frames.

    python -m analyses.existence --model embedded --compare embedded-base [--pairs [--pairs-part test]]
        [--n 100] [--normal FILE] [--malicious FILE] [--template chat|alpaca] [--out results/existence]

Unpaired (the paper's design): the first ``--n`` of the benign train half against the first
``--n`` of the AdvBench train half, unless files are given.  Paired (``--pairs``): the harmful and
benign sides of the paired set's ``--pairs-part`` split (default ``test``: pairs no model was tuned
on); the bootstrap resamples whole pairs and the probe's folds never split one; the first two
models are also compared layer by layer (``interp.existence.gap_difference``).

Writes under ``--out``: ``existence.json`` (settings, per model the per-layer table and the
suggested range; with ``--pairs`` a ``paired`` section and the comparison's bands),
``layers_<model>.csv`` (and ``paired_layers_<model>.csv``), ``similarity.png``, ``gap.png``,
``probe.png`` (and ``paired_gap.png``, ``paired_gap_centred.png``, ``paired_difference.png``,
``paired_probe.png``); activations are cached under ``OUT/activations/``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from analyses.cli import UsageError, add_model_options, main_guard, model_from, model_slug, parser_for, positive_int
from analyses.plots import plot_gap, plot_gap_comparison, plot_probe, plot_similarity
from interp.cosine import PairSetError
from interp.data import load_pairs, load_prompts, prompts_hash
from interp.existence import GAP_DEFINITIONS, existence_analysis, gap_difference
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json
from interp.onset import OnsetRule


def default_prompts(n: int, normal_file: str | None = None, malicious_file: str | None = None):
    """The first ``n`` normal and malicious prompts (train splits of the shipped sets by default;
    a given file is used whole, in order)."""
    if n < 2:
        raise PairSetError(f"need at least 2 prompts per set to form pairs, got n={n}")
    normal = load_prompts(normal_file) if normal_file else load_prompts("benign", "train")
    malicious = load_prompts(malicious_file) if malicious_file else load_prompts("advbench", "train")
    return normal[:n], malicious[:n]


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser)
    parser.add_argument("--compare", nargs="*", default=[], help="further model specs to analyse on the same prompts")
    parser.add_argument("--n", type=positive_int, default=100, help="prompts per set (unpaired)")
    parser.add_argument("--normal", help="file of normal prompts (default: benign train split)")
    parser.add_argument("--malicious", help="file of malicious prompts (default: advbench train split)")
    parser.add_argument("--pairs", action="store_true", help="also analyse harmful/benign pairs in matched frames")
    parser.add_argument("--pairs-part", default="test", choices=["train", "validation", "test", "all"])
    parser.add_argument("--out", type=Path, default=Path("results/existence"))
    parser.add_argument("--r", type=positive_int, default=500, help="pairs per type for the paper's sampled estimator")
    parser.add_argument("--n-boot", type=positive_int, default=1000)
    parser.add_argument("--k", type=positive_int, default=5, help="folds for the probes")
    parser.add_argument("--gap", default="code", choices=GAP_DEFINITIONS, help="gap definition the onset rule reads")
    for name, value in asdict(OnsetRule()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help="onset rule")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--no-cache", action="store_true", help="do not keep activations under OUT/activations")
    args = parser.parse_args(argv)
    for path in (args.normal, args.malicious):
        if path and not Path(path).is_file():
            raise UsageError(f"no prompt file at {path}")
    args.rule = OnsetRule(**{k: getattr(args, k) for k in asdict(OnsetRule())})
    return args


def run(args) -> dict:
    normal, malicious = default_prompts(args.n, args.normal, args.malicious)
    pairs = load_pairs(args.pairs_part) if args.pairs else []
    specs = [args.model, *[c for c in args.compare if c != args.model]]
    kwargs = dict(r=args.r, n_boot=args.n_boot, k=args.k, gap=args.gap, rule=args.rule, batch_size=args.batch_size,
                  cache_dir=None if args.no_cache else args.out / "activations")
    unpaired, paired = [], []
    for spec in specs:
        model = model_from(args, spec)
        unpaired.append(existence_analysis(model, normal, malicious, **kwargs))
        if pairs:
            paired.append(existence_analysis(model, [p.benign for p in pairs], [p.harmful for p in pairs],
                                             paired=True, keep_acts=True, **kwargs))
        del model
    comparison = gap_difference(paired[0], paired[1], n_boot=args.n_boot) if len(paired) >= 2 else None
    return {"unpaired": unpaired, "paired": paired, "comparison": comparison,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "rule"}
            | {"rule": asdict(args.rule), "normal_hash": prompts_hash(normal), "malicious_hash": prompts_hash(malicious),
               "pairs_hash": prompts_hash([p.pair_id for p in pairs]) if pairs else None}}


def write_outputs(out: Path, run_result: dict) -> list[Path]:
    unpaired, paired, comparison = run_result["unpaired"], run_result["paired"], run_result["comparison"]
    record = {"config": run_result["config"], "models": [r.to_dict() for r in unpaired]}
    if paired:
        record["paired"] = {"models": [r.to_dict() for r in paired],
                            "comparison": comparison.to_dict() if comparison else None}
    written = [atomic_write_json(out / "existence.json", record)]
    for prefix, results in (("", unpaired), ("paired_", paired)):
        for result in results:
            written.append(atomic_write_csv(out / f"{prefix}layers_{model_slug(result.model)}.csv", result.layers))
    figures = {"similarity": plot_similarity(unpaired), "gap": plot_gap(unpaired), "probe": plot_probe(unpaired)}
    if paired:
        figures["paired_gap"] = plot_gap(paired, title="paired prompts: raw angle gap, 95% pair-bootstrap band")
        figures["paired_gap_centred"] = plot_gap(paired, centred=True,
                                                 title="paired prompts: mean-centred angle gap, 95% pair-bootstrap band")
        figures["paired_probe"] = plot_probe(paired)
        if comparison is not None:
            figures["paired_difference"] = plot_gap_comparison(comparison)
    for name, fig in figures.items():
        written.append(atomic_savefig(out / f"{name}.png", fig))
    return written


def summary_table(results) -> pd.DataFrame:
    """Per layer and model: the two gaps, the centred gap and the probe accuracy."""
    columns = {}
    for result in results:
        frame, slug = result.layers, model_slug(result.model)
        columns[f"{slug} gap"] = frame[f"gap_{result.gap_definition}"]
        columns[f"{slug} centred"] = frame[f"gap_{result.gap_definition}_centred"]
        columns[f"{slug} probe"] = frame["probe_acc"]
    return pd.DataFrame(columns).rename_axis("layer")


@main_guard
def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    written = write_outputs(args.out, result)
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.precision", 3):
        for name in ("unpaired", "paired"):
            if result[name]:
                print(f"--- {name}")
                print(summary_table(result[name]).to_string(float_format=lambda v: f"{v:7.3f}"))
    for res in result["unpaired"]:
        print(f"{res.model} (unpaired): suggested initial range {res.onset.range or 'none'} ({res.onset.reason})")
    for res in result["paired"]:
        print(f"{res.model} (paired): suggested initial range {res.onset.range or 'none'}")
    if result["comparison"] is not None:
        print(f"{result['comparison'].a} vs {result['comparison'].b} on pairs: bands {result['comparison'].bands}")
    print("wrote", ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
