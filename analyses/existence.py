"""Existence of safety layers (Li et al. §3.1-3.3): per-layer cosine similarity of normal and
malicious prompts, the N-M vs N-N angle gap, linear separability, and a suggested initial range.

    python -m analyses.existence --model embedded --compare embedded-base [--template chat|alpaca]
        [--n 100] [--normal FILE] [--malicious FILE] [--out results/existence]

Normal prompts are the first ``n`` of ``load_prompts("benign", "train")``, malicious ones the
first ``n`` of ``load_prompts("advbench", "train")``, unless files are given.  For each model it
captures ``hook_resid_post`` at the last prompt token of every layer (cached in
``OUT/activations/``), then computes per layer: the all-pairs cosine statistics and the paper's
sampled estimator (r pairs per type, its seeds), the angle gap in both definitions with
bootstrap intervals, a logistic probe and the difference-in-means direction, and the onset rule's
suggested range.  Writes ``existence.json``, ``layers_<model>.csv``, ``similarity.png``,
``gap.png`` and ``probe.png`` under ``--out`` and prints a short table.

The computation is ``existence_analysis`` (one loaded model) and ``run_existence`` (several
specs); ``main`` only parses arguments and writes files.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import re
import time
from pathlib import Path

import pandas as pd
import torch

from interp.activations import cached_capture
from interp.cosine import PairSetError, bootstrap_gaps, check_pair_sets, similarity_table
from interp.data import load_prompts, prompts_hash
from interp.models import dtype_named
from interp.onset import OnsetRule, suggest_initial_range
from interp.probe import probe_layers

GAP_DEFINITIONS = ("code", "paper")


def model_slug(spec: str) -> str:
    """A file-name-safe short name for a model spec (a path's last part)."""
    name = Path(str(spec).rstrip("/")).name or str(spec)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def default_prompts(n: int, normal_file: str | None = None, malicious_file: str | None = None) -> tuple[list[str], list[str]]:
    """The first ``n`` normal and malicious prompts (train splits of the shipped sets by default;
    a given file is used whole, in order)."""
    if n < 2:
        raise PairSetError(f"need at least 2 prompts per set to form pairs, got n={n}")
    normal = load_prompts(normal_file) if normal_file else load_prompts("benign", "train")
    malicious = load_prompts(malicious_file) if malicious_file else load_prompts("advbench", "train")
    return normal[:n], malicious[:n]


def existence_analysis(
    model,
    normal: list[str],
    malicious: list[str],
    *,
    r: int = 500,
    n_boot: int = 1000,
    k: int = 5,
    seed: int = 0,
    gap: str = "code",
    rule: OnsetRule | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """All per-layer figures for one ``LoadedModel``: a ``layers`` DataFrame and the onset result.

    ``gap`` picks which gap definition the onset rule reads ("code": arccos of mean cosines, as
    the paper's figures; "paper": mean of per-pair angles, as its text).
    """
    if gap not in GAP_DEFINITIONS:
        raise ValueError(f"unknown gap definition {gap!r}; choose one of {', '.join(GAP_DEFINITIONS)}")
    if len(normal) < 2 or len(malicious) < 2:
        raise PairSetError(f"need at least 2 prompts per set, got {len(normal)} normal and {len(malicious)} malicious")
    queries = list(normal) + list(malicious)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / (
            f"{model_slug(model.spec)}-{model.template}-{model.fingerprint()[:8]}-{prompts_hash(queries)[:8]}.safetensors"
        )
    start = time.time()
    acts = cached_capture(model, queries, cache_path, batch_size=batch_size, progress=progress)
    capture_s = time.time() - start
    acts_n, acts_m = acts[: len(normal)], acts[len(normal):]
    check_pair_sets(acts_n, acts_m)

    layers = similarity_table(acts_n, acts_m, "all")
    sampled = similarity_table(acts_n, acts_m, "sampled", r=r)
    sampled = sampled.drop(columns="layer").add_prefix("sampled_")
    intervals = bootstrap_gaps(acts_n, acts_m, n_boot=n_boot, seed=seed).drop(columns="layer")
    probe = probe_layers(acts_n, acts_m, k=k, seed=seed, progress=progress).drop(columns="layer")
    layers = pd.concat([layers, intervals, sampled, probe], axis=1)
    onset = suggest_initial_range(layers[f"gap_{gap}"].to_numpy(), rule)
    return {
        "model": str(model.spec),
        "fingerprint": model.fingerprint(),
        "template": model.template,
        "n_layers": model.n_layers,
        "n_normal": len(normal),
        "n_malicious": len(malicious),
        "prompts_hash": prompts_hash(queries),
        "gap_definition": gap,
        "r": r,
        "n_boot": n_boot,
        "k_folds": k,
        "capture_seconds": round(capture_s, 2),
        "activations_file": None if cache_path is None else str(cache_path),
        "layers": layers,
        "onset": onset,
    }


def run_existence(specs: list[str], normal: list[str], malicious: list[str], *, template: str = "chat",
                  device: str | None = None, dtype=None, **kwargs) -> list[dict]:
    """``existence_analysis`` for each model spec in turn (one model in memory at a time)."""
    from interp.models import load_model

    results = []
    for spec in specs:
        model = load_model(spec, device=device, dtype=dtype, template=template)
        results.append(existence_analysis(model, normal, malicious, **kwargs))
        del model
    return results


# --- output ------------------------------------------------------------------------------------


def result_json(result: dict) -> dict:
    """A result as plain JSON (per-layer rows as records, NaN as null)."""
    out = {key: value for key, value in result.items() if key not in ("layers", "onset")}
    out["suggested_range"] = result["onset"].to_dict()
    out["layers"] = json.loads(result["layers"].to_json(orient="records"))
    return out


def plot_similarity(results: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False, sharey=True)
    for ax, result in zip(axes[0], results):
        frame = result["layers"]
        for kind, label in (("nn", "N-N"), ("mm", "M-M"), ("nm", "N-M")):
            mean, std = frame[f"{kind}_mean"], frame[f"{kind}_std"]
            ax.plot(frame["layer"], mean, label=label)
            ax.fill_between(frame["layer"], mean - std, mean + std, alpha=0.2)
        ax.set_title(f"{result['model']} ({result['template']}): cosine, mean +- sd over all pairs")
        ax.set_xlabel("layer")
        ax.legend()
    axes[0][0].set_ylabel("cosine similarity")
    return fig


def plot_gap(results: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        frame, definition = result["layers"], result["gap_definition"]
        line, = ax.plot(frame["layer"], frame[f"gap_{definition}"], label=result["model"])
        ax.fill_between(frame["layer"], frame[f"gap_{definition}_lo"], frame[f"gap_{definition}_hi"],
                        color=line.get_color(), alpha=0.2)
        suggested = result["onset"].range
        if suggested is not None:
            for layer in (suggested.start, suggested.end):
                ax.axvline(layer, color=line.get_color(), linestyle=":")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("angle(N,M) - angle(N,N') [deg]")
    ax.set_title(f"angle gap ({results[0]['gap_definition']} definition), 95% bootstrap band; dotted: suggested range")
    ax.legend()
    return fig


def plot_probe(results: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for result in results:
        frame = result["layers"]
        for ax, metric in zip(axes, ("acc", "auroc")):
            line, = ax.plot(frame["layer"], frame[f"probe_{metric}"], label=f"{result['model']} logistic")
            ax.plot(frame["layer"], frame[f"dim_{metric}"], linestyle="--", color=line.get_color(),
                    label=f"{result['model']} mean difference")
    for ax, metric in zip(axes, ("held-out accuracy", "held-out AUROC")):
        ax.set_title(f"normal vs malicious: {metric}")
        ax.set_xlabel("layer")
        ax.axhline(0.5, color="grey", linewidth=0.5)
        ax.legend()
    return fig


def summary_table(results: list[dict]) -> pd.DataFrame:
    """Per layer and model: the two gaps and the probe accuracy (what main prints)."""
    columns = {}
    for result in results:
        frame, slug = result["layers"], model_slug(result["model"])
        columns[f"{slug} gap_code"] = frame["gap_code"]
        columns[f"{slug} gap_paper"] = frame["gap_paper"]
        columns[f"{slug} probe_acc"] = frame["probe_acc"]
    return pd.DataFrame(columns).rename_axis("layer")


def write_outputs(results: list[dict], out: str | Path, config: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json

    out = Path(out)
    written = [atomic_write_json(out / "existence.json", {"config": config, "models": [result_json(r) for r in results]})]
    for result in results:
        written.append(atomic_write_csv(out / f"layers_{model_slug(result['model'])}.csv", result["layers"]))
    for name, plot in (("similarity", plot_similarity), ("gap", plot_gap), ("probe", plot_probe)):
        fig = plot(results)
        written.append(atomic_savefig(out / f"{name}.png", fig))
        plt.close(fig)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--compare", nargs="*", default=[], help="further model specs to analyse on the same prompts")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    parser.add_argument("--n", "--limit", dest="n", type=int, default=100, help="prompts per set")
    parser.add_argument("--normal", help="file of normal prompts (default: benign train split)")
    parser.add_argument("--malicious", help="file of malicious prompts (default: advbench train split)")
    parser.add_argument("--out", default="results/existence")
    parser.add_argument("--r", type=int, default=500, help="pairs per type for the paper's sampled estimator")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5, help="folds for the probes")
    parser.add_argument("--gap", default="code", choices=GAP_DEFINITIONS, help="gap definition the onset rule reads")
    parser.add_argument("--baseline-layers", type=int, default=OnsetRule.baseline_layers)
    parser.add_argument("--k-sd", type=float, default=OnsetRule.k_sd)
    parser.add_argument("--onset-frac", type=float, default=OnsetRule.onset_frac)
    parser.add_argument("--persist", type=int, default=OnsetRule.persist)
    parser.add_argument("--plateau-frac", type=float, default=OnsetRule.plateau_frac)
    parser.add_argument("--min-rise", type=float, default=OnsetRule.min_rise)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype (default float32; bfloat16 halves memory on a GPU)")
    parser.add_argument("--no-cache", action="store_true", help="do not keep activations under OUT/activations")
    args = parser.parse_args(argv)

    normal, malicious = default_prompts(args.n, args.normal, args.malicious)
    rule = OnsetRule(args.baseline_layers, args.k_sd, args.onset_frac, args.persist, args.plateau_frac, args.min_rise)
    specs = [args.model, *[c for c in args.compare if c != args.model]]
    results = run_existence(
        specs, normal, malicious, template=args.template, device=args.device, dtype=dtype_named(args.dtype),
        r=args.r, n_boot=args.n_boot,
        k=args.k, gap=args.gap, rule=rule, batch_size=args.batch_size,
        cache_dir=None if args.no_cache else Path(args.out) / "activations",
    )
    config = {**vars(args), "rule": asdict(rule),
              "normal_hash": prompts_hash(normal), "malicious_hash": prompts_hash(malicious)}
    written = write_outputs(results, args.out, config)

    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.precision", 3):
        print(summary_table(results).to_string(float_format=lambda v: f"{v:7.3f}"))
    for result in results:
        onset = result["onset"]
        print(f"{result['model']}: suggested initial range {onset.range or 'none'} ({onset.reason})")
    print("wrote", ", ".join(str(p) for p in written))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
