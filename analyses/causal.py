"""Beyond the paper: locate the safety layers causally and set the localisations side by side.

    python -m analyses.causal --model embedded [--compare embedded-base]
        [--located results/locate/located.json ...] [--existence results/existence/existence.json]
        [--out results/causal] [--limit N] [--gen-pairs 24] [--gen-layers auto|L,L,...]
        [--train-limit N] [--val-limit N] [--candidates auto|L,L,...] [--threads N]

Per model, on the paired prompts (``interp.data.load_pairs``):

1. **Activation patching** (``interp.patching``) on the ``test`` pairs (``--limit`` of them): the
   residual (``hook_resid_post``), attention output and MLP output of each layer at the last
   prompt position, harmful -> benign and benign -> harmful, scored by the refusal log-odds of
   the first answer token; and the refusal rate by generation with the residual patched during
   the prefill at ``--gen-layers``, on (at most ``--gen-pairs`` of) the pairs whose harmful request
   the model refuses and whose benign request it answers (clean, greedy).
2. **The refusal direction** (``interp.direction``): difference of means fitted on the ``train``
   pairs, its best layer chosen on the ``validation`` pairs, its separation and the refusal rates
   under ablation and addition measured on the ``test`` pairs (``--direction-pairs`` of them for
   the rates; default all).
3. **The localisations side by side**: the existence analysis's gap onset/plateau
   (``--existence``), the scaling search's range (``--located``: each file is matched to a model
   by the spec it records), the patching profile (the layers where the residual patch recovers at
   least ``--threshold`` of the refusal gap; where attention and MLP outputs matter most) and the
   direction's best layer.  A paragraph, computed from the numbers, says where they agree.

Writes under ``--out``: ``causal.csv`` and ``causal.json`` (the table; the JSON also holds every
per-layer result and the statement), ``patching_<model>.csv``, ``direction_<model>.csv``,
``causal.png`` and ``statement.txt``.  Arguments and both JSON inputs are checked before any model
is loaded; bad input ends as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from analyses.cli import UsageError, add_model_options, main_guard, model_from, model_slug, parser_for, positive_int
from analyses.localisation import GapOnset, agreement_statement, generation_statement, localisations, table
from analyses.plots import plot_causal
from interp.data import load_pairs, prompts_hash
from interp.direction import direction_analysis
from interp.export import LocatedRange, load_located
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json, atomic_write_text
from interp.patching import (
    DEFAULT_SITES,
    DIRECTIONS,
    PatchedGeneration,
    PatchingResult,
    check_sites,
    patched_refusal_rates,
    patching_sweep,
)
from interp.ranges import LayerRange, LayerRangeError, check_layer

DEFAULT_EXISTENCE = "results/existence/existence.json"
DEFAULT_LOCATED = "results/locate/located.json"
FORWARD, REVERSE = DIRECTIONS


# --- inputs ------------------------------------------------------------------------------------


def _layer_or_none(value, n_layers: int, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where} must be a layer index or null, got {value!r}")
    try:
        return check_layer(value, n_layers)
    except LayerRangeError as err:
        raise UsageError(f"{where}: {err}") from None


def read_existence(path: str | Path) -> dict[str, GapOnset]:
    """The gap onset/plateau of every model in an ``analyses.existence`` JSON (``models[i]``:
    ``model``, ``n_layers``, ``suggested_range`` with ``range``, ``onset``, ``plateau``), checked."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no existence result at {path}; run `python -m analyses.existence` "
                         "(or pass the shipped docs/existence/existence.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); re-run the existence analysis") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise UsageError(f"{path} holds no 'models' list: not an existence-analysis result")
    out = {}
    for i, entry in enumerate(models):
        where = f"{path}: models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise UsageError(f"{where} has no 'model' name")
        n_layers = entry.get("n_layers")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise UsageError(f"{where}: 'n_layers' must be a positive integer, got {n_layers!r}")
        suggested = entry.get("suggested_range")
        if not isinstance(suggested, dict) or not {"range", "onset", "plateau"} <= suggested.keys():
            raise UsageError(f"{where}: 'suggested_range' must hold 'range', 'onset' and 'plateau'")
        onset = _layer_or_none(suggested["onset"], n_layers, f"{where} onset")
        plateau = _layer_or_none(suggested["plateau"], n_layers, f"{where} plateau")
        bounds = suggested["range"]
        if bounds is None:
            rng = None
        else:
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise UsageError(f"{where}: 'range' must be [start, end] or null, got {bounds!r}")
            start = _layer_or_none(bounds[0], n_layers, f"{where} range start")
            end = _layer_or_none(bounds[1], n_layers, f"{where} range end")
            try:
                rng = LayerRange(start, end)
            except LayerRangeError as err:
                raise UsageError(f"{where}: {err}") from None
        out[entry["model"]] = GapOnset(entry["model"], n_layers, rng, onset, plateau,
                                       str(suggested.get("reason", "")))
    return out


def match_located(paths, specs: list[str]) -> dict[str, LocatedRange]:
    """Each located-range file (``interp.export.load_located``, every check) under the model spec
    it records; a file for none of ``specs``, or two for one model, is an error."""
    out: dict[str, LocatedRange] = {}
    for path in paths:
        located = load_located(path)
        spec = located.record["model"]["spec"]
        if spec not in specs:
            raise UsageError(f"{path} is a located range of {spec!r}, which is not analysed here ({', '.join(specs)})")
        if spec in out:
            raise UsageError(f"two located-range files for {spec!r}: {out[spec].path} and {path}")
        out[spec] = located
    return out


def parse_layer_list(text: str | None, n_layers: int, what: str) -> list[int] | None:
    """``"auto"``/None -> None; ``"3,7,12"`` -> checked layer indices."""
    if text is None or text == "auto":
        return None
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r}: write layer indices as L,L,... or 'auto'") from None
    if not layers:
        raise UsageError(f"{what} is empty")
    for layer in layers:
        try:
            check_layer(layer, n_layers)
        except LayerRangeError as err:
            raise UsageError(f"{what}: {err}") from None
    return sorted(set(layers))


# --- the command -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = parser_for(__doc__)
    add_model_options(parser)
    parser.add_argument("--compare", nargs="*", default=[], help="further model specs to analyse the same way")
    parser.add_argument("--existence", default=DEFAULT_EXISTENCE, help="analyses.existence JSON (gap onset/plateau)")
    parser.add_argument("--located", nargs="*", default=None,
                        help=f"located-range JSON file(s), matched to models by spec (default {DEFAULT_LOCATED}; "
                             "pass --located with no file to use none)")
    parser.add_argument("--out", type=Path, default=Path("results/causal"))
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use the first N test pairs (patching, separation, generation)")
    parser.add_argument("--sites", default=",".join(DEFAULT_SITES), help="patched sites (resid_pre, resid_post, "
                                                                          "attn_out, mlp_out)")
    parser.add_argument("--threshold", type=float, default=0.5, help="share of the gap a residual patch must move")
    parser.add_argument("--min-gap", type=float, default=0.5, help="pairs with a smaller clean gap (log-odds) are left "
                                                                   "out of the per-pair fraction")
    parser.add_argument("--gen-pairs", type=int, default=24, help="pairs judged by generation with the patch (those "
                                                                   "refused harmful and answered benign; 0: none)")
    parser.add_argument("--direction-pairs", type=int, default=None, help="test pairs judged by generation under the "
                                                                          "direction's ablation/addition (default all; "
                                                                          "0: none)")
    parser.add_argument("--gen-layers", default="auto", help="layers of the generation patch (auto: 6 spread over "
                                                             "the model and the residual band's first layer)")
    parser.add_argument("--train-limit", type=positive_int, default=None, help="train pairs fitting the direction")
    parser.add_argument("--val-limit", type=positive_int, default=None, help="validation pairs choosing its layer")
    parser.add_argument("--candidates", default="auto", help="layers the direction's choice considers "
                                                             "(auto: the first 80%%)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=24)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.gen_pairs < 0 or (args.direction_pairs or 0) < 0:
        raise UsageError("--gen-pairs and --direction-pairs must be 0 or more")
    if not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must lie in (0, 1], got {args.threshold}")
    args.sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    try:
        check_sites(args.sites)
    except ValueError as err:
        raise UsageError(f"--sites: {err}") from None
    args.specs = [args.model, *[c for c in args.compare if c != args.model]]
    args.gaps = read_existence(args.existence)
    missing = [s for s in args.specs if s not in args.gaps]
    if missing:
        raise UsageError(f"{args.existence} has no entry for {', '.join(missing)} (it has {', '.join(args.gaps)})")
    located_paths = [DEFAULT_LOCATED] if args.located is None else args.located
    args.located_ranges = match_located(located_paths, args.specs)
    args.layers = {}
    for spec in args.specs:
        n_layers = args.gaps[spec].n_layers
        located = args.located_ranges.get(spec)
        if located is not None and located.record["model"]["n_layers"] != n_layers:
            raise UsageError(f"{located.path} was made for {located.record['model']['n_layers']} layers, "
                             f"{args.existence} says {spec} has {n_layers}")
        args.layers[spec] = {"gen": parse_layer_list(args.gen_layers, n_layers, "--gen-layers"),
                             "candidates": parse_layer_list(args.candidates, n_layers, "--candidates")}
    return args


def auto_gen_layers(n_layers: int, patching: PatchingResult | None, threshold: float) -> list[int]:
    """Six layers spread over the model, plus the first layer of the residual band."""
    layers = {round(i * (n_layers - 1) / 5) for i in range(6)}
    if patching is not None and "resid_post" in patching.sites and FORWARD in patching.directions:
        band = patching.band("resid_post", FORWARD, threshold)
        if band:
            layers.add(band[0])
    return sorted(layers)


def analyse(model, args, gap: GapOnset, located: LocatedRange | None) -> dict:
    """Everything for one loaded model."""
    spec = model.spec
    if model.n_layers != gap.n_layers:
        raise UsageError(f"{args.existence} says {spec} has {gap.n_layers} layers; "
                         f"the loaded model has {model.n_layers}")
    pairs = load_pairs("test")[: args.limit]
    train = load_pairs("train")[: args.train_limit]
    validation = load_pairs("validation")[: args.val_limit]
    patching = patching_sweep(model, pairs, sites=args.sites, min_gap=args.min_gap, batch_size=args.batch_size)
    generation: PatchedGeneration | None = None
    if args.gen_pairs and "resid_post" in args.sites:
        layers = args.layers[spec]["gen"] or auto_gen_layers(model.n_layers, patching, args.threshold)
        generation = patched_refusal_rates(model, pairs, layers, site="resid_post", directions=DIRECTIONS,
                                           contrast_only=True, limit=args.gen_pairs,
                                           max_new_tokens=args.max_new_tokens)
    direction = direction_analysis(model, train, validation, pairs, candidates=args.layers[spec]["candidates"],
                                   generation_pairs=args.direction_pairs, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size)
    current = None if located is None else located.fingerprint == model.fingerprint()
    rows = localisations(spec, gap, located, patching, direction, threshold=args.threshold, located_current=current)
    return {"spec": spec, "n_layers": model.n_layers, "fingerprint": model.fingerprint(), "patching": patching,
            "generation": generation, "direction": direction, "rows": rows, "located_current": current,
            "statement": " ".join(filter(None, (agreement_statement(rows), generation_statement(generation))))}


def write_outputs(out: Path, models: list[dict], args) -> list[Path]:
    rows = [r for m in models for r in m["rows"]]
    frame = table(rows)
    statement = "\n\n".join(m["statement"] for m in models)
    record = {
        "config": {"models": args.specs, "existence": str(args.existence),
                   "located": {s: str(located.path) for s, located in args.located_ranges.items()},
                   "pairs_part": "test", "limit": args.limit, "sites": args.sites,
                   "threshold": args.threshold, "min_gap": args.min_gap, "gen_pairs": args.gen_pairs,
                   "direction_pairs": args.direction_pairs,
                   "train_limit": args.train_limit, "val_limit": args.val_limit,
                   "max_new_tokens": args.max_new_tokens, "template": args.template},
        "table": [r.to_dict() for r in rows],
        "statement": statement,
        "models": [{
            "spec": m["spec"], "n_layers": m["n_layers"], "fingerprint": m["fingerprint"],
            "located_current": m["located_current"], "statement": m["statement"],
            "pairs_hash": prompts_hash(m["patching"].pair_ids),
            "patching": m["patching"].to_dict(),
            "generation": m["generation"].to_dict() if m["generation"] else None,
            "direction": m["direction"].to_dict(),
        } for m in models],
    }
    written = [atomic_write_csv(out / "causal.csv", frame), atomic_write_json(out / "causal.json", record),
               atomic_write_text(out / "statement.txt", statement + "\n")]
    for m in models:
        slug = model_slug(m["spec"])
        written.append(atomic_write_csv(out / f"patching_{slug}.csv", m["patching"].to_frame()))
        direction = m["direction"]
        per_layer = direction.separation.merge(direction.selection.table, on="layer", how="left")
        written.append(atomic_write_csv(out / f"direction_{slug}.csv", per_layer))
    written.append(atomic_savefig(out / "causal.png", plot_causal(models, args.threshold)))
    return written


@main_guard
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = []
    for spec in args.specs:
        model = model_from(args, spec)
        models.append(analyse(model, args, args.gaps[spec], args.located_ranges.get(spec)))
        del model
    written = write_outputs(args.out, models, args)
    with pd.option_context("display.width", 220, "display.max_colwidth", 90):
        print(table([r for m in models for r in m["rows"]])[["model", "method", "start", "end", "point", "layers",
                                                              "detail"]].to_string(index=False))
    for m in models:
        if m["generation"] is not None:
            print(f"--- {m['spec']}: refusal by generation, residual patched at the last prompt position (prefill)")
            print(m["generation"].to_frame()[["direction", "layer", "pairs", "k", "n", "rate"]].to_string(index=False))
        print(f"--- {m['spec']}: refusal direction at layer {m['direction'].layer}")
        if m["direction"].rates is not None:
            print(m["direction"].rates.to_frame()[["condition", "side", "k", "n", "rate"]].to_string(index=False))
    print()
    print("\n\n".join(m["statement"] for m in models))
    print("wrote", ", ".join(str(p) for p in written))
    return models


if __name__ == "__main__":
    main()
