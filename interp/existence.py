"""Existence of safety layers (Li et al. §3.1-3.3) for one model: per-layer cosine similarity of
normal and malicious prompts, the N-M vs N-N angle gap, linear separability, and a suggested
initial range.

``existence_analysis(model, normal, malicious)`` captures ``hook_resid_post`` at the last prompt
token of every layer (``interp.activations``), then computes per layer: the all-pairs cosine
statistics and the paper's sampled estimator, the angle gap in both definitions with bootstrap
intervals, the same gap on mean-centred activations, a logistic probe and the
difference-in-means direction, and the onset rule's suggested range (``interp.onset``).

**The wording control** (``paired=True``): ``normal[i]`` and ``malicious[i]`` are a benign and a
harmful request written in the same sentence frame (``interp.data.load_pairs``).  Sets that
differ in wording (AdvBench's long imperatives against everyday requests) separate at every
layer of any model; pairs that differ only in harm do not.  Paired, the bootstrap resamples whole
pairs and the probe's folds never split a pair.  ``gap_difference`` compares two models on the
same pairs with one paired bootstrap of the difference.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from interp.activations import cached_capture
from interp.cosine import (
    PairSetError,
    bootstrap_counts,
    bootstrap_gaps,
    centred,
    check_pair_sets,
    interval_table,
    similarity_table,
    weighted_gaps,
)
from interp.data import prompts_hash
from interp.models import LoadedModel
from interp.onset import OnsetResult, OnsetRule, suggest_initial_range
from interp.probe import probe_layers

GAP_DEFINITIONS = ("code", "paper")


@dataclass
class ExistenceResult:
    """All per-layer figures of one model on one prompt set (``layers``: one row per layer)."""

    model: str
    fingerprint: str
    template: str
    n_layers: int
    n_normal: int
    n_malicious: int
    prompts_hash: str
    paired: bool
    gap_definition: str
    settings: dict
    layers: pd.DataFrame
    onset: OnsetResult
    capture_seconds: float = 0.0
    activations_file: str | None = None
    acts: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    """The normal and malicious activations (kept in memory, not written)."""

    def to_frame(self) -> pd.DataFrame:
        return self.layers

    def gap(self, centred: bool = False) -> np.ndarray:
        column = f"gap_{self.gap_definition}" + ("_centred" if centred else "")
        return self.layers[column].to_numpy()

    def to_dict(self) -> dict:
        import json

        out = {k: v for k, v in asdict(self).items() if k not in ("layers", "onset", "acts")}
        out["suggested_range"] = self.onset.to_dict()
        out["layers"] = json.loads(self.layers.to_json(orient="records"))
        return out


def existence_analysis(
    model: LoadedModel,
    normal: list[str],
    malicious: list[str],
    *,
    paired: bool = False,
    r: int = 500,
    n_boot: int = 1000,
    k: int = 5,
    seed: int = 0,
    gap: str = "code",
    rule: OnsetRule | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    keep_acts: bool = False,
    progress: bool = True,
) -> ExistenceResult:
    """All per-layer figures for one ``LoadedModel`` (module docstring).  ``gap`` picks which
    definition the onset rule reads ("code": arccos of mean cosines, as the paper's figures;
    "paper": mean of per-pair angles, as its text)."""
    if gap not in GAP_DEFINITIONS:
        raise ValueError(f"unknown gap definition {gap!r}; choose one of {', '.join(GAP_DEFINITIONS)}")
    if len(normal) < 2 or len(malicious) < 2:
        raise PairSetError(f"need at least 2 prompts per set, got {len(normal)} normal and {len(malicious)} malicious")
    if paired and len(normal) != len(malicious):
        raise PairSetError(f"paired sets need equal sizes, got {len(normal)} and {len(malicious)}")
    queries = list(normal) + list(malicious)
    cache_path = None
    if cache_dir is not None:
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(str(model.spec).rstrip("/")).name)
        cache_path = Path(cache_dir) / f"{slug}-{model.template}-{model.fingerprint()[:8]}-{prompts_hash(queries)[:8]}.safetensors"
    start = time.time()
    acts = cached_capture(model, queries, cache_path, batch_size=batch_size, progress=progress)
    capture_s = time.time() - start
    acts_n, acts_m = acts[: len(normal)], acts[len(normal):]
    check_pair_sets(acts_n, acts_m)

    layers = similarity_table(acts_n, acts_m, "all")
    sampled = similarity_table(acts_n, acts_m, "sampled", r=r).drop(columns="layer").add_prefix("sampled_")
    intervals = bootstrap_gaps(acts_n, acts_m, n_boot=n_boot, seed=seed, pairs=paired).drop(columns="layer")
    cn, cm = centred(acts_n, acts_m)
    centred_table = similarity_table(cn, cm, "all")[["gap_paper", "gap_code"]].add_suffix("_centred")
    counts_n, counts_m = bootstrap_counts(len(normal), len(malicious), n_boot, seed, paired)
    centred_intervals = interval_table(weighted_gaps(cn, cm, counts_n, counts_m), suffix="_centred").drop(columns="layer")
    probe = probe_layers(acts_n, acts_m, k=k, seed=seed, progress=progress, pairs=paired).drop(columns="layer")
    layers = pd.concat([layers, intervals, centred_table, centred_intervals, sampled, probe], axis=1)
    onset = suggest_initial_range(layers[f"gap_{gap}"].to_numpy(), rule)
    return ExistenceResult(
        model=str(model.spec), fingerprint=model.fingerprint(), template=model.template, n_layers=model.n_layers,
        n_normal=len(normal), n_malicious=len(malicious), prompts_hash=prompts_hash(queries), paired=paired,
        gap_definition=gap, settings={"r": r, "n_boot": n_boot, "k_folds": k, "seed": seed,
                                      "rule": asdict(rule or OnsetRule())},
        layers=layers, onset=onset, capture_seconds=round(capture_s, 2),
        activations_file=None if cache_path is None else str(cache_path),
        acts=(acts_n, acts_m) if keep_acts else None,
    )


@dataclass
class GapComparison:
    """``a``'s gap minus ``b``'s per layer on the same pairs, with paired-bootstrap intervals,
    and the band of layers where ``a``'s gap is above ``b``'s with non-overlapping intervals."""

    a: str
    b: str
    definition: str
    table: pd.DataFrame
    bands: dict

    def to_dict(self) -> dict:
        import json

        return {"a": self.a, "b": self.b, "definition": self.definition, "bands": self.bands,
                "layers": json.loads(self.table.to_json(orient="records"))}


def _band(mask: np.ndarray) -> list[int] | None:
    """The longest run of consecutive True layers, as [first, last]."""
    best, start = None, None
    for i, flag in enumerate(list(mask) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = [start, i - 1]
            start = None
    return best


def gap_difference(a: ExistenceResult, b: ExistenceResult, n_boot: int = 1000, seed: int = 0,
                   ci: float = 0.95) -> GapComparison:
    """Compare two models' gaps on the same paired prompts (both analysed with ``keep_acts``):
    the difference a - b with a paired bootstrap (the same pair resample for both models), raw and
    centred, and per definition the band where ``a``'s interval lies wholly above ``b``'s."""
    if a.acts is None or b.acts is None:
        raise ValueError("gap_difference needs both results made with keep_acts=True")
    if a.prompts_hash != b.prompts_hash:
        raise PairSetError("the two results were made on different prompts")
    n = a.n_normal
    counts_n, counts_m = bootstrap_counts(n, a.n_malicious, n_boot, seed, pairs=a.paired)
    table = pd.DataFrame({"layer": np.arange(a.n_layers)})
    bands = {}
    for suffix, transform in (("", lambda x: x), ("_centred", lambda x: centred(*x))):
        ga = weighted_gaps(*transform(a.acts), counts_n, counts_m)
        gb = weighted_gaps(*transform(b.acts), counts_n, counts_m)
        diff = {name: ga[name] - gb[name] for name in ga}
        for name in ga:
            table[f"{name}{suffix}_diff"] = a.layers[f"{name}{suffix}"] - b.layers[f"{name}{suffix}"]
        table = table.merge(interval_table(diff, ci, suffix=suffix + "_diff"), on="layer")
        for name in ga:
            above = (a.layers[f"{name}{suffix}_lo"] > b.layers[f"{name}{suffix}_hi"]).to_numpy()
            diff_above = (table[f"{name}{suffix}_diff_lo"] > 0).to_numpy()
            bands[f"{name}{suffix}"] = {"non_overlapping": _band(above), "difference_above_zero": _band(diff_above)}
    return GapComparison(a.model, b.model, a.gap_definition, table, bands)
