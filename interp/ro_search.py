"""The bound search on a real model: R_o functions over one ``RoEvaluator``, pruning by the
first-step estimate, and a resumable cache of every evaluated configuration.

``locate_safety_layers(model, queries, initial, ...)`` runs ``interp.locate.search_bounds`` with one of four
methods:

- ``"generation"``: every candidate's R_o is generated (exact, the paper's measure);
- ``"prune"`` (the default): the same generated R_o, but a candidate whose first-step *upper
  bound* is below the best R_o already measured in its sweep is not generated (α > 1 only).
  The bound is ``#prompts whose refusal-opener mass reaches threshold + margin``; ``margin`` is
  measured, not assumed: the largest number of prompts, over every configuration generated so
  far, that were refused although their opener mass was below the threshold.  It is a bound only
  as far as that measurement holds, so the run records how many candidates were pruned and the
  margin it used, and ``benchmarks/locate.py`` checks that pruning changes no winner;
- ``"fast"``: the first-step mass scores every candidate and the ``keep`` best of each sweep are
  generated (coarse to fine; it can pick another range than ``"generation"``);
- ``"estimate"``: the first-step mass only, no generation.

Every configuration's statistics (R_o, opener-mass count and misses) are kept in a JSON file
under ``cache_dir`` named by a hash of the model fingerprint, prompts and settings, so an
interrupted or widened search evaluates only what is new.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from interp.data import prompts_hash
from interp.io import atomic_write_json
from interp.locate import AlphaChoice, BoundSearch, choose_alpha, lowest_layer, search_bounds
from interp.models import LoadedModel
from interp.overrejection import DEFAULT_MAX_NEW_TOKENS, RoEvaluator
from interp.ranges import LayerRange
from interp.scaling import ALL_COMPONENTS

METHODS = ("prune", "generation", "fast", "estimate")
METHOD_NAMES = {"prune": "generation (estimate-pruned)", "generation": "generation",
                "fast": "first_step_mass:generation", "estimate": "first_step_mass"}
PRUNE_THRESHOLD = 0.02


class SearchRo:
    """R_o functions for ``search_bounds`` over one evaluator, each configuration evaluated at most once
    (and remembered in ``path`` when given)."""

    def __init__(self, evaluator: RoEvaluator, components=ALL_COMPONENTS, threshold: float = PRUNE_THRESHOLD,
                 path: Path | None = None, meta: dict | None = None, log=None):
        self.evaluator, self.components, self.threshold = evaluator, tuple(components), threshold
        self.path, self.meta, self.log = path, json.loads(json.dumps(meta or {}, default=str)), log
        self.stats: dict[str, dict] = {}
        self.hits = 0
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: unreadable R_o cache ({err}); delete it to start afresh") from None
            if data.get("meta") != self.meta:
                raise ValueError(f"{path} was written for other settings; delete it to start afresh")
            self.stats = data.get("configs", {})

    @staticmethod
    def key(layer_range: LayerRange | None, alpha: float) -> str:
        return "none" if layer_range is None else f"{layer_range.start},{layer_range.end}@{float(alpha):.6g}"

    def _get(self, layer_range, alpha, generate: bool) -> dict:
        key = self.key(layer_range, alpha)
        known = self.stats.get(key)
        if known is not None and (known["r_o"] is not None or not generate):
            self.hits += 1
            return known
        start = time.perf_counter()
        result = self.evaluator.evaluate(layer_range, alpha, self.components, generate=generate)
        low = result.first.mass < self.threshold
        entry = {
            "r_o": result.count if generate else None,
            "mass": round(result.first.expected, 4),
            "n_high": int((~low).sum()),
            "misses": int((result.flags & low).sum()) if generate else None,
            "seconds": round(time.perf_counter() - start, 2),
        }
        self.stats[key] = entry
        if self.log is not None:
            what = "unscaled" if layer_range is None else f"{layer_range} x {alpha:g}"
            value = entry["r_o"] if generate else entry["mass"]
            self.log(f"  [{'generated' if generate else 'estimated'}] {what}: {value} / {len(self.evaluator.queries)} "
                     f"({entry['seconds']:.1f} s)")
        if self.path is not None:
            atomic_write_json(self.path, {"meta": self.meta, "configs": self.stats})
        return entry

    # the functions ``search_bounds`` takes

    def generated(self, layer_range, alpha) -> float:
        return float(self._get(layer_range, alpha, True)["r_o"])

    def estimated(self, layer_range, alpha) -> float:
        return float(self._get(layer_range, alpha, False)["mass"])

    @property
    def margin(self) -> int:
        """Most prompts refused below the mass threshold in any configuration generated so far."""
        return max((s["misses"] for s in self.stats.values() if s["misses"] is not None), default=0)

    def bound(self, layer_range, alpha) -> float:
        return float(self._get(layer_range, alpha, False)["n_high"] + self.margin)


@dataclass
class LocationRun:
    """A search's outcome with how it was measured."""

    result: BoundSearch
    method: str
    alpha_choice: AlphaChoice | None = None
    cache_hits: int = 0
    n_generated: int = 0
    n_pruned: int = 0
    prune_margin: int | None = None
    seconds: float = 0.0
    configs: dict = field(default_factory=dict)
    extended: bool = False

    @property
    def method_name(self) -> str:
        return METHOD_NAMES[self.method]

    def to_dict(self) -> dict:
        return {
            "method": self.method_name,
            "cache_hits": self.cache_hits,
            "n_generated": self.n_generated,
            "n_pruned": self.n_pruned,
            "prune_threshold": PRUNE_THRESHOLD if self.method == "prune" else None,
            "prune_margin": self.prune_margin,
            "seconds": round(self.seconds, 1),
            "extend_until_interior": self.extended,
        }


def best_run(runs: list[LocationRun]) -> int:
    """Index of the search, among searches from different starts, whose located range scores best
    on the search's own objective: the highest R_o for α > 1, the lowest for α < 1; ties go to the
    earlier start.  The bound search is local (each sweep moves one bound around the other's
    winner), so where it starts can decide what it finds; running it from several starts and
    keeping the best is the cheap remedy short of scanning every range."""
    if not runs:
        raise ValueError("no searches to choose from")
    alphas = {run.result.alpha for run in runs}
    if len(alphas) != 1:
        raise ValueError(f"searches at different alphas ({sorted(alphas)}) do not compare")
    sign = -1.0 if runs[0].result.alpha > 1 else 1.0
    scored = [(sign * run.result.located_r_o, n) for n, run in enumerate(runs) if run.result.located_r_o is not None]
    if not scored:
        raise ValueError("no search has an R_o for its located range")
    return min(scored)[1]


def cache_file(folder, model, queries, **settings) -> tuple[Path, dict]:
    meta = {"model_fingerprint": model.fingerprint(), "prompts_hash": prompts_hash(queries),
            "n_prompts": len(queries), "template": model.template, **settings}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(folder) / f"ro_cache_{digest}.json", meta


def locate_safety_layers(
    model: LoadedModel,
    queries: list[str],
    initial: LayerRange,
    *,
    alpha: float = 1.2,
    window: int = 2,
    upper_offsets=None,
    lower_offsets=None,
    method: str = "prune",
    keep: int = 2,
    components=ALL_COMPONENTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    alpha_rule: dict | None = None,
    progress: bool = True,
    extend: bool = False,
) -> LocationRun:
    """Run the bound search on ``model`` (module docstring for ``method``).  ``alpha_rule``:
    ``choose_alpha`` keyword arguments (``step``, ``target_std``, ``max_steps``) to pick α,
    stepping in ``alpha``'s direction."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    initial.check(model.n_layers)
    started = time.perf_counter()
    offsets = lower_offsets if lower_offsets is not None else list(range(-window, window + 1))
    start = 0 if extend else lowest_layer(initial, model.n_layers, lower_offsets=offsets)  # extended: any layer
    evaluator = RoEvaluator(model, queries, start=start, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            progress=False)
    path, meta = (None, None)
    if cache_dir is not None:
        path, meta = cache_file(cache_dir, model, queries, components=list(components), max_new_tokens=max_new_tokens,
                                judge=evaluator.judge.describe(), threshold=PRUNE_THRESHOLD)
    ro = SearchRo(evaluator, components, path=path, meta=meta, log=print if progress else None)
    fn = {"prune": ro.generated, "generation": ro.generated, "fast": ro.estimated, "estimate": ro.estimated}[method]
    kwargs = dict(window=window, upper_offsets=upper_offsets, lower_offsets=lower_offsets, keep=keep,
                  confirm=ro.generated if method == "fast" else None,
                  bound=ro.bound if method == "prune" else None, extend=extend)
    choice = None
    if alpha_rule is not None:
        choice = choose_alpha(fn, initial, model.n_layers, increase=alpha > 1, **alpha_rule, **kwargs)
        result = choice.result
    else:
        result = search_bounds(fn, initial, alpha, model.n_layers, **kwargs)
    return LocationRun(
        result=result, method=method, alpha_choice=choice, cache_hits=ro.hits,
        n_generated=sum(s["r_o"] is not None for s in ro.stats.values()),
        n_pruned=sum(r.pruned for r in result.upper + result.lower),
        prune_margin=ro.margin if method == "prune" else None,
        seconds=time.perf_counter() - started, configs=dict(ro.stats), extended=extend,
    )
