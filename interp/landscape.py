"""The R_o landscape: the over-rejection of every layer range ``[i, j]`` of a model at one α,
its best ranges confirmed on more queries, how sure the choice is, and whether another half
of D_o makes the same one.

The paper's bound search (``interp.locate``) is local: each sweep moves one bound around the
other's winner, so where it starts can decide what it finds.  Measuring every range (465 for 30
layers) removes the start from the answer.

**Exact sharing** (``LandscapeEvaluator``; verdicts equal plain greedy generation of a
weight-scaled copy, tested on a tiny model of every family):

1. *One unscaled pass* records, per prompt batch, the residual stream entering every layer and
   every layer's keys and values.  Every range ``[i, j]`` leaves the layers below ``i``
   unscaled, so this pass is where each start's prefill begins (it also gives the unscaled R_o).
2. *Ranges walked by end.*  ``[i, j]`` and ``[i, j+1]`` scale the same layers ``i..j``, so a
   prompt's states through layer ``j`` are the same in both.  The ranges of one start are
   evaluated in order ``j = i, i+1, ...``; the prefill of ``[i, j]`` starts at layer ``j`` from
   the residual and keys/values that the prefill of ``[i, j-1]`` recorded, and records those of
   layer ``j`` for ``[i, j+1]``.  A start's ``L - i`` ranges then run ``sum_j (L - j)`` prefill
   layers instead of ``(L - i)^2`` (about half over all starts of a 30-layer model), with no
   extra pass.
3. Per range, as ``interp.overrejection.RoEvaluator``: the shared system-turn prefix is run once
   under the range's scaling, decoding runs on the plain twin (``LoadedModel.plain_twin``) scaled
   by torch hooks, and each row stops once its verdict is fixed.

Decode steps are not shared across ranges.  Sharing them would be exact only while a range's
tokens equal its neighbour's, and on the embedded model at α 1.2 331 of 384 range-rows differ
from the neighbouring range's within 16 tokens, so an exact shared decode measured 1.2x slower
than decoding each range on its own.

**The landscape table** (``landscape``): one row per range with ``start, end, alpha,
n_queries, R_o, unscaled_R_o, below_unscaled, estimate, seconds, flags`` (``flags``: the
per-query verdicts as a string of 0/1 in the queries' order, which the bootstrap and the split
read back).  With ``path`` it is written atomically after each start's block, and a rerun
skips the starts already there (the settings are checked against a sidecar JSON).

**Global location** (``global_location``): the ``top`` best ranges of a coarse landscape are
confirmed on a larger query set; the winner is the best confirmed R_o (ties: the narrower
range, then the lower start), and a bootstrap over queries (resampling the confirmation
queries with replacement) gives each confirmed range's probability of being the best (a tie
in a replicate shares its credit).

**Below the unscaled model.**  Scaling the safety layers up (α > 1) raises over-rejection
(Li et al. §3.4); a range whose scaled R_o is *below* the unscaled model's does the opposite
and is not a safety-layer range by that definition (for α < 1: above it).  Such rows are
flagged (``below_unscaled``) and ``check_exportable`` refuses them unless asked.

**The split** (fixed before any run): ``split_half`` puts a query in half ``"A"`` when the
first 8 hex digits of the SHA-256 of its UTF-8 text, read as an integer, are even, else in
``"B"``.  It depends on the text alone (not on order or on which other queries are present),
so it is deterministic, disjoint and covers every query.  ``split_stability`` locates on A and
confirms on B, and the other way round.

**α** (``choose_alpha_std``): the paper's rule (App. A.3.4) on this evaluator: step α by 0.05
away from 1, run the bound search from a start at each, and stop at the first α whose std of
R_o over the lower-bound sweep reaches the target; the record keeps every α tried and its std.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from interp.data import prompts_hash
from interp.errors import SafetyLayersError
from interp.estimate import FirstStep, refusal_opening_token_ids
from interp.forward import PromptBatches, decoder_kwargs, decoder_of, last_logits, prefix_cache, resume_from_layer
from interp.generation import decode_greedy
from interp.hooks import hook_name
from interp.io import atomic_write_csv, atomic_write_json
from interp.judge import DEFAULT_JUDGE
from interp.overrejection import DEFAULT_MAX_NEW_TOKENS, RoResult, auto_batch_size
from interp.ranges import LayerRange, check_layer
from interp.scaling import ALL_COMPONENTS, check_alpha, hook_count, scaled, scaled_twin

COLUMNS = ["start", "end", "alpha", "n_queries", "R_o", "unscaled_R_o", "below_unscaled", "estimate", "seconds",
           "flags"]


class BelowUnscaledError(SafetyLayersError, ValueError):
    """A range whose scaling moves R_o against the safety-layer direction was to be exported."""


class LandscapeSettingsError(SafetyLayersError, ValueError):
    """A landscape file on disk was written for other settings than the run resuming it."""


def all_ranges(n_layers: int) -> list[LayerRange]:
    """Every range ``[i, j]``, ``0 <= i <= j < n_layers``, by start then end."""
    return [LayerRange(i, j) for i in range(n_layers) for j in range(i, n_layers)]


# --- the evaluator ----------------------------------------------------------------------------


@dataclass
class _State:
    """A batch's prompt states entering ``layer`` under some scaling of the layers below it:
    the residual at every suffix position and the keys/values (prefix and suffix) of layers
    ``0..layer-1``."""

    layer: int
    resid: Tensor
    cache: list


@contextmanager
def _recording(model, layers: Iterable[int], found: dict, lm) -> Iterator[None]:
    """Record the residual entering each of ``layers`` into ``found[layer]`` (the bridge's
    ``hook_resid_pre``, or a torch pre-hook on a plain ``lm``'s layer)."""
    layers = list(layers)
    if lm is None:
        def make(k):
            def hook(resid, hook):
                found[k] = resid.detach().clone()
            return hook

        with model.bridge.hooks(fwd_hooks=[(hook_name("resid_pre", k), make(k)) for k in layers]):
            yield
        return

    def make_pre(k):
        def pre_hook(module, args, kwargs):
            found[k] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return pre_hook

    decoder = decoder_of(model, lm)
    handles = [decoder.layers[k].register_forward_pre_hook(make_pre(k), with_kwargs=True) for k in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LandscapeEvaluator:
    """R_o of layer ranges on one query list, with the exact sharing of the module docstring.

    ``keep_starts``: the starts whose unscaled states are kept after the unscaled pass (default
    all; a confirmation on many queries keeps only the starts it needs, to save memory)."""

    def __init__(self, model, queries: list[str], *, template: str | None = None, batch_size: int | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge=DEFAULT_JUDGE,
                 keep_starts: Iterable[int] | None = None):
        self.model, self.queries, self.judge = model, list(queries), judge
        self.max_new_tokens = max_new_tokens
        self.n_layers = model.n_layers
        rows = model.token_rows(self.queries, template)
        batch_size = batch_size or auto_batch_size(model, max(len(r) for r in rows) + max_new_tokens)
        self.prompts = PromptBatches.build(model, self.queries, template=template, batch_size=batch_size)
        self.opener_ids = torch.tensor(refusal_opening_token_ids(model.tokenizer, judge.openers), device=model.device)
        self.keep_starts = sorted({check_layer(i, self.n_layers) for i in keep_starts}) if keep_starts is not None \
            else list(range(self.n_layers))
        self._base: list[dict[int, _State]] | None = None
        self._unscaled: RoResult | None = None

    # the module tree a configuration runs on (as RoEvaluator: the plain twin unless another
    # bridge hook is attached, which would not fire there)

    @contextmanager
    def _tree(self, layers, alpha: float, components) -> Iterator[torch.nn.Module | None]:
        model = self.model
        twin = None if hook_count(model.bridge) else model.plain_twin()
        with ExitStack() as stack:
            if layers is not None and twin is None:
                stack.enter_context(scaled(model, layers, alpha, components))
            elif layers is not None:
                stack.enter_context(scaled_twin(model, layers, alpha, components))
            yield twin

    def _finish(self, batch, logits, cache, lm, flags, texts) -> None:
        rows = decode_greedy(self.model, logits, cache, batch.mask, max_new_tokens=self.max_new_tokens,
                             decided=self.judge.decided, lm=lm)
        for i, (ids, _) in zip(batch.index, rows):
            texts[i] = self.model.tokenizer.decode(ids, skip_special_tokens=True).strip()
            flags[i] = self.judge.is_refusal(texts[i])

    def _empty(self):
        n = len(self.queries)
        return torch.zeros(n, dtype=torch.bool), [""] * n, [None] * n

    def _result(self, logits_rows, flags, texts) -> RoResult:
        logits = torch.cat([row[None] for row in logits_rows])
        return RoResult(FirstStep.from_logits(logits, self.opener_ids), flags, texts)

    @torch.no_grad()
    def unscaled(self) -> RoResult:
        """R_o of the unscaled model; records each kept start's states (point 1)."""
        if self._unscaled is not None:
            return self._unscaled
        model, n_layers = self.model, self.n_layers
        flags, texts, logits_rows = self._empty()
        base = []
        with self._tree(None, 1.0, ALL_COMPONENTS) as lm:
            kv = prefix_cache(model, self.prompts.prefix_ids, lm)
            for batch in self.prompts.batches:
                found: dict[int, Tensor] = {}
                kwargs = {**decoder_kwargs(model, batch.ids, batch.mask, kv), "use_cache": True}
                with _recording(model, self.keep_starts, found, lm):
                    out = decoder_of(model, lm)(**kwargs)
                cache = out.past_key_values
                stored = [copy.copy(cache.layers[k]) for k in range(n_layers)]
                base.append({i: _State(i, found[i], stored[:i]) for i in self.keep_starts})
                logits = last_logits(model, out.last_hidden_state, lm)
                for i, row in zip(batch.index, logits):
                    logits_rows[i] = row
                self._finish(batch, logits, cache, lm, flags, texts)
        self._base, self._unscaled = base, self._result(logits_rows, flags, texts)
        return self._unscaled

    @torch.no_grad()
    def _run(self, layer_range: LayerRange, alpha: float, components, states: list[_State],
             record: bool) -> tuple[RoResult, list[_State] | None]:
        """Evaluate ``layer_range`` from ``states`` (entering layer ``s``, ``start <= s <= end``,
        under the scaling of ``[start, s-1]``); with ``record``, also return the states entering
        ``s + 1`` under ``[start, s]`` (point 2)."""
        model = self.model
        flags, texts, logits_rows = self._empty()
        nxt = [] if record else None
        s = states[0].layer
        with self._tree(layer_range, alpha, components) as lm:
            kv = prefix_cache(model, self.prompts.prefix_ids, lm)
            for batch, state in zip(self.prompts.batches, states):
                found: dict[int, Tensor] = {}
                with _recording(model, [s + 1] if record else [], found, lm):
                    out = resume_from_layer(model, state.resid, batch.ids, batch.mask, s, kv, use_cache=True, lm=lm)
                cache = out.past_key_values  # layers < s hold the prefix only: put the stored ones in
                for k, layer in enumerate(state.cache):
                    cache.layers[k] = copy.copy(layer)
                if record:
                    nxt.append(_State(s + 1, found[s + 1], [*state.cache, copy.copy(cache.layers[s])]))
                logits = last_logits(model, out.last_hidden_state, lm)
                for i, row in zip(batch.index, logits):
                    logits_rows[i] = row
                self._finish(batch, logits, cache, lm, flags, texts)
        return self._result(logits_rows, flags, texts), nxt

    def _base_states(self, start: int) -> list[_State]:
        self.unscaled()
        if start not in self.keep_starts:
            raise ValueError(f"start {start} was not kept (keep_starts={self.keep_starts})")
        return [b[start] for b in self._base]

    def evaluate(self, layer_range: LayerRange, alpha: float, components=ALL_COMPONENTS) -> RoResult:
        """R_o with one range scaled by ``alpha`` (prefill from the unscaled states at its start)."""
        layer_range = layer_range.check(self.n_layers)
        return self._run(layer_range, check_alpha(alpha), components, self._base_states(layer_range.start), False)[0]

    def walk(self, start: int, alpha: float, components=ALL_COMPONENTS,
             last: int | None = None) -> Iterator[tuple[LayerRange, RoResult]]:
        """``[start, j]`` for ``j = start .. last`` (default the top layer), in that order, each
        prefill resuming from the previous one's recorded states (point 2)."""
        alpha = check_alpha(alpha)
        last = self.n_layers - 1 if last is None else check_layer(last, self.n_layers)
        states = self._base_states(start)
        for end in range(start, last + 1):
            result, states = self._run(LayerRange(start, end), alpha, components, states, record=end < last)
            yield LayerRange(start, end), result

    def count(self, layer_range: LayerRange | None, alpha: float = 1.0) -> int:
        """R_o as a number, for ``interp.locate``'s R_o functions (``None``: unscaled)."""
        return (self.unscaled() if layer_range is None else self.evaluate(layer_range, alpha)).count


# --- the table --------------------------------------------------------------------------------


def sign_of(alpha: float) -> float:
    """+1 when a higher R_o is the objective (α > 1), -1 when a lower one is (α < 1)."""
    return 1.0 if alpha > 1 else -1.0


def below_unscaled(r_o: float, unscaled: float, alpha: float) -> bool:
    """Whether scaling moved R_o against the safety-layer direction (module docstring)."""
    return sign_of(alpha) * (r_o - unscaled) < 0


def flags_text(flags: Bool[Tensor, " query"]) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def flags_matrix(frame: pd.DataFrame) -> np.ndarray:
    """``[rows, queries]`` 0/1 verdicts from a landscape frame's ``flags`` column."""
    return np.array([[c == "1" for c in text] for text in frame["flags"]], dtype=bool)


def landscape_meta(model, queries: list[str], alpha: float, components, max_new_tokens: int, judge) -> dict:
    return {"model_fingerprint": model.fingerprint(), "template": model.template, "prompts_hash": prompts_hash(queries),
            "n_queries": len(queries), "alpha": float(alpha), "components": list(components),
            "max_new_tokens": max_new_tokens, "judge": judge.describe() if hasattr(judge, "describe") else repr(judge)}


def _read_done(path: Path, meta: dict) -> pd.DataFrame | None:
    meta_path = path.with_suffix(".meta.json")
    if not path.is_file():
        return None
    if not meta_path.is_file() or json.loads(meta_path.read_text()) != json.loads(json.dumps(meta, default=str)):
        raise LandscapeSettingsError(f"{path} was written for other settings (see {meta_path}); "
                                     "delete it or choose another path")
    return pd.read_csv(path, dtype={"flags": str})


def landscape(model, queries: list[str], alpha: float, *, path: str | Path | None = None, components=ALL_COMPONENTS,
              starts: Iterable[int] | None = None, batch_size: int | None = None,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge=DEFAULT_JUDGE, progress: bool = True,
              evaluator: LandscapeEvaluator | None = None, also_from: Iterable[str | Path] = ()) -> pd.DataFrame:
    """R_o of every range ``[i, j]`` (``starts``: only those starts) at ``alpha`` on ``queries``,
    one row per range (``COLUMNS``).  With ``path`` (a CSV) each start's rows are written as
    soon as they are all measured, and a rerun measures only the starts not yet there.
    ``also_from``: other landscape files of the same settings (e.g. the parts that processes
    given ``part_starts`` wrote) whose complete starts count as done and join the table."""
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        raise ValueError("alpha must differ from 1: every range would equal the unscaled model")
    n_layers = model.n_layers
    starts = list(range(n_layers)) if starts is None else sorted({check_layer(i, n_layers) for i in starts})
    path = None if path is None else Path(path)
    meta = landscape_meta(model, queries, alpha, components, max_new_tokens, judge)
    done = _read_done(path, meta) if path is not None else None
    frame = done if done is not None else pd.DataFrame(columns=COLUMNS)
    merged = False
    for other in also_from:
        part = _read_done(Path(other), meta)
        if part is None:
            continue
        merged = True
        complete = [i for i in part["start"].unique() if (part["start"] == i).sum() == n_layers - i]
        frame = pd.concat([frame[~frame["start"].isin(complete)], part[part["start"].isin(complete)]],
                          ignore_index=True)
    todo = [i for i in starts if not ((frame["start"] == i).sum() == n_layers - i)]
    if path is not None:
        atomic_write_json(path.with_suffix(".meta.json"), meta)
        if merged:
            atomic_write_csv(path, _sorted(frame, None))
    if not todo:
        return _sorted(frame, starts)
    evaluator = evaluator or LandscapeEvaluator(model, queries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                judge=judge, keep_starts=todo)
    unscaled = evaluator.unscaled().count
    bar = tqdm(total=sum(n_layers - i for i in todo), desc=f"landscape x{alpha:g}", unit="range", disable=not progress)
    for i in todo:
        block = []
        clock = time.perf_counter()
        for layer_range, result in evaluator.walk(i, alpha, components):
            now = time.perf_counter()
            block.append({"start": layer_range.start, "end": layer_range.end, "alpha": alpha,
                          "n_queries": len(queries), "R_o": result.count, "unscaled_R_o": unscaled,
                          "below_unscaled": below_unscaled(result.count, unscaled, alpha),
                          "estimate": round(result.first.expected, 3), "seconds": round(now - clock, 2),
                          "flags": flags_text(result.flags)})
            clock = now
            bar.update(1)
            bar.set_postfix_str(f"{layer_range} R_o {result.count}")
        frame = pd.concat([frame[frame["start"] != i], pd.DataFrame(block)], ignore_index=True)
        if path is not None:
            atomic_write_csv(path, _sorted(frame, None))
    bar.close()
    return _sorted(frame, starts)


def part_starts(n_layers: int, part: int, n_parts: int) -> list[int]:
    """The starts process ``part`` (1-based) of ``n_parts`` measures: starts taken largest first
    (start ``i`` has ``n_layers - i`` ranges) by whichever part has the fewest ranges so far, so
    the parts' work is balanced; together the parts cover every start once."""
    if not 1 <= part <= n_parts:
        raise ValueError(f"part must be in 1..{n_parts}, got {part}")
    loads, owner = [0] * n_parts, {}
    for i in range(n_layers):  # start 0 has the most ranges
        k = min(range(n_parts), key=lambda p: (loads[p], p))
        owner[i], loads[k] = k + 1, loads[k] + n_layers - i
    return [i for i in range(n_layers) if owner[i] == part]


def _sorted(frame: pd.DataFrame, starts) -> pd.DataFrame:
    if starts is not None:
        frame = frame[frame["start"].isin(starts)]
    frame = frame.astype({"start": int, "end": int, "alpha": float, "n_queries": int, "R_o": int,
                          "unscaled_R_o": int, "below_unscaled": bool, "estimate": float, "seconds": float,
                          "flags": str})
    return frame.sort_values(["start", "end"]).reset_index(drop=True)


def ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows best first (highest R_o for α > 1, lowest for α < 1; ties: the narrower range,
    then the lower start), with a ``rank`` column (1 = best; tied R_o share the better rank)."""
    alpha = float(frame["alpha"].iloc[0])
    if frame["alpha"].nunique() != 1:
        raise ValueError("a landscape of several alphas does not rank")
    key = -sign_of(alpha) * frame["R_o"]
    out = frame.assign(_key=key, _width=frame["end"] - frame["start"])
    out = out.sort_values(["_key", "_width", "start"]).drop(columns=["_key", "_width"]).reset_index(drop=True)
    return out.assign(rank=(-sign_of(alpha) * out["R_o"]).rank(method="min").astype(int))


def rank_of(frame: pd.DataFrame, layer_range: LayerRange) -> tuple[int, int]:
    """``(rank, number of ranges)`` of ``layer_range`` on the landscape (``ranked``'s rank)."""
    table = ranked(frame)
    hit = table[(table["start"] == layer_range.start) & (table["end"] == layer_range.end)]
    if hit.empty:
        raise ValueError(f"{layer_range} is not on this landscape")
    return int(hit["rank"].iloc[0]), len(table)


def best_index(values: np.ndarray, ranges: list[LayerRange], alpha: float) -> int:
    """The best of ``values`` (one per range) by ``ranked``'s rule."""
    keys = [(-sign_of(alpha) * float(v), len(r), r.start) for v, r in zip(values, ranges)]
    return min(range(len(keys)), key=keys.__getitem__)


# --- global location, bootstrap, split --------------------------------------------------------


def best_probability(flags: np.ndarray, alpha: float, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """For ``flags`` ``[ranges, queries]`` (0/1 verdicts on the same queries), each range's
    share of bootstrap replicates (queries drawn with replacement) in which its R_o is the best;
    a replicate's tie splits its credit evenly.  Sums to 1."""
    flags = np.asarray(flags, dtype=np.int32)
    if flags.ndim != 2 or flags.shape[1] == 0:
        raise ValueError(f"flags must be [ranges, queries], got shape {flags.shape}")
    rng = np.random.default_rng(seed)
    n = flags.shape[1]
    credit = np.zeros(flags.shape[0])
    for chunk in np.array_split(np.arange(n_boot), max(1, n_boot // 250)):
        draws = rng.integers(0, n, size=(len(chunk), n))
        counts = np.stack([np.bincount(d, minlength=n) for d in draws])  # [boot, queries]
        totals = sign_of(alpha) * (counts @ flags.T)  # [boot, ranges]
        best = totals == totals.max(axis=1, keepdims=True)
        credit += (best / best.sum(axis=1, keepdims=True)).sum(axis=0)
    return credit / n_boot


@dataclass
class GlobalLocation:
    """The confirmed candidates (best first) with ``p_best``, and the rule's winner."""

    alpha: float
    candidates: pd.DataFrame  # start, end, coarse_R_o, coarse_rank, R_o, unscaled_R_o, below_unscaled, p_best, flags
    unscaled: int
    n_queries: int
    n_boot: int
    seed: int
    extra: dict = field(default_factory=dict)

    @property
    def winner(self) -> LayerRange:
        row = self.candidates.iloc[0]
        return LayerRange(int(row["start"]), int(row["end"]))

    @property
    def runner_up(self) -> LayerRange | None:
        if len(self.candidates) < 2:
            return None
        row = self.candidates.iloc[1]
        return LayerRange(int(row["start"]), int(row["end"]))

    def to_dict(self) -> dict:
        rows = self.candidates.drop(columns=["flags"]).to_dict("records")
        return {"alpha": self.alpha, "winner": str(self.winner),
                "runner_up": None if self.runner_up is None else str(self.runner_up),
                "unscaled_R_o": self.unscaled, "n_queries": self.n_queries, "n_boot": self.n_boot, "seed": self.seed,
                "candidates": json.loads(json.dumps(rows, default=lambda v: v.item() if hasattr(v, "item") else str(v))),
                **self.extra}


def confirm(model, ranges: list[LayerRange], queries: list[str], alpha: float, *, components=ALL_COMPONENTS,
            batch_size: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge=DEFAULT_JUDGE,
            progress: bool = True) -> pd.DataFrame:
    """R_o of each of ``ranges`` on ``queries`` (and the unscaled model's, in ``unscaled_R_o``):
    a landscape-shaped frame; each range's prefill starts from the unscaled states at its start."""
    evaluator = LandscapeEvaluator(model, queries, batch_size=batch_size, max_new_tokens=max_new_tokens, judge=judge,
                                   keep_starts={r.start for r in ranges})
    unscaled = evaluator.unscaled().count
    rows = []
    for layer_range in tqdm(ranges, desc=f"confirm x{alpha:g}", unit="range", disable=not progress):
        clock = time.perf_counter()
        result = evaluator.evaluate(layer_range, alpha, components)
        rows.append({"start": layer_range.start, "end": layer_range.end, "alpha": alpha, "n_queries": len(queries),
                     "R_o": result.count, "unscaled_R_o": unscaled,
                     "below_unscaled": below_unscaled(result.count, unscaled, alpha),
                     "estimate": round(result.first.expected, 3), "seconds": round(time.perf_counter() - clock, 2),
                     "flags": flags_text(result.flags)})
    return pd.DataFrame(rows, columns=COLUMNS)


def locate_from_flags(confirmed: pd.DataFrame, coarse: pd.DataFrame | None = None, n_boot: int = 2000,
                      seed: int = 0) -> GlobalLocation:
    """The global location from confirmed rows (landscape-shaped, one query set): candidates
    best first by ``ranked``'s rule, each with its bootstrap ``p_best`` (``best_probability``)
    and, given the ``coarse`` landscape, its coarse R_o and rank there."""
    alpha = float(confirmed["alpha"].iloc[0])
    table = ranked(confirmed).drop(columns=["rank"])
    table = table.assign(p_best=best_probability(flags_matrix(table), alpha, n_boot, seed))
    if coarse is not None:
        coarse_ranked = ranked(coarse).set_index(["start", "end"])
        keys = list(zip(table["start"], table["end"]))
        table = table.assign(coarse_R_o=[int(coarse_ranked.loc[k, "R_o"]) for k in keys],
                             coarse_rank=[int(coarse_ranked.loc[k, "rank"]) for k in keys])
    return GlobalLocation(alpha, table, int(confirmed["unscaled_R_o"].iloc[0]), int(confirmed["n_queries"].iloc[0]),
                          n_boot, seed)


def top_ranges(frame: pd.DataFrame, top: int) -> list[LayerRange]:
    """The ``top`` best ranges of a landscape (``ranked``'s order)."""
    table = ranked(frame).head(top)
    return [LayerRange(int(s), int(e)) for s, e in zip(table["start"], table["end"])]


def global_location(model, coarse: pd.DataFrame, queries: list[str], *, top: int = 10, n_boot: int = 2000,
                    seed: int = 0, path: str | Path | None = None, **confirm_kwargs) -> GlobalLocation:
    """Confirm the ``top`` best ranges of the ``coarse`` landscape on ``queries`` (module
    docstring); with ``path`` the confirmed rows are written there (CSV) and reused on a rerun."""
    alpha = float(coarse["alpha"].iloc[0])
    ranges = top_ranges(coarse, top)
    confirmed = None
    if path is not None and Path(path).is_file():
        old = pd.read_csv(path, dtype={"flags": str})
        wanted = {(r.start, r.end) for r in ranges}
        if (set(zip(old["start"], old["end"])) == wanted and (old["alpha"] == alpha).all()
                and (old["n_queries"] == len(queries)).all()):
            confirmed = old
    if confirmed is None:
        confirmed = confirm(model, ranges, queries, alpha, **confirm_kwargs)
        if path is not None:
            atomic_write_csv(path, confirmed)
    return locate_from_flags(confirmed, coarse, n_boot, seed)


def check_exportable(location: GlobalLocation, allow_below_unscaled: bool = False) -> LayerRange:
    """The winner, unless it is below the unscaled model (``BelowUnscaledError``; pass
    ``allow_below_unscaled`` to export it anyway)."""
    row = location.candidates.iloc[0]
    if bool(row["below_unscaled"]) and not allow_below_unscaled:
        raise BelowUnscaledError(
            f"{location.winner} x {location.alpha:g} gives R_o {int(row['R_o'])}, "
            f"{'below' if location.alpha > 1 else 'above'} the unscaled model's {location.unscaled}: not a safety-layer "
            "range by the paper's definition; pass allow_below_unscaled (--allow-below-unscaled) to export it anyway")
    return location.winner


def split_half(queries: list[str]) -> tuple[list[int], list[int]]:
    """Indices of the queries in half A and half B (the rule in the module docstring)."""
    a, b = [], []
    for n, text in enumerate(queries):
        digest = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)
        (a if digest % 2 == 0 else b).append(n)
    return a, b


def split_stability(frame: pd.DataFrame, queries: list[str]) -> dict:
    """Locate on one half of ``queries`` and confirm on the other, both ways, over the ranges of
    ``frame`` (landscape-shaped rows measured on ``queries``, in order): each half's winner,
    whether the two agree, and on each half the R_o of the other half's winner against its own
    winner's (and their rank there)."""
    if int(frame["n_queries"].iloc[0]) != len(queries):
        raise ValueError(f"the frame was measured on {int(frame['n_queries'].iloc[0])} queries, got {len(queries)}")
    alpha = float(frame["alpha"].iloc[0])
    flags = flags_matrix(frame)
    ranges = [LayerRange(int(s), int(e)) for s, e in zip(frame["start"], frame["end"])]
    halves = dict(zip("AB", split_half(queries)))
    out: dict = {"rule": "sha256(query)[:8] even -> A, odd -> B", "n_A": len(halves["A"]), "n_B": len(halves["B"])}
    values = {h: flags[:, idx].sum(axis=1) for h, idx in halves.items()}
    winners = {h: best_index(values[h], ranges, alpha) for h in "AB"}
    for h, other in (("A", "B"), ("B", "A")):
        w, w_other = winners[h], winners[other]
        table = pd.DataFrame({"start": [r.start for r in ranges], "end": [r.end for r in ranges],
                              "alpha": alpha, "R_o": values[other]})
        out[f"winner_{h}"] = str(ranges[w])
        out[f"on_{other}"] = {"its_R_o": int(values[other][w]), "own_winner": str(ranges[w_other]),
                              "own_winner_R_o": int(values[other][w_other]),
                              "its_rank": rank_of(table, ranges[w])[0], "n_ranges": len(ranges)}
    out["same_winner"] = winners["A"] == winners["B"]
    return out


# --- alpha ------------------------------------------------------------------------------------


def choose_alpha_std(evaluator: LandscapeEvaluator, initial: LayerRange, *, increase: bool = True, step: float = 0.05,
                     target_std: float | None = None, max_steps: int = 8, window: int = 2, extend: bool = False):
    """The paper's α rule (App. A.3.4) with this evaluator's generated R_o: ``interp.locate``'s
    ``choose_alpha`` from ``initial``; ``target_std`` defaults to 17.5 per 721 queries (the
    middle of the paper's 15-20), scaled to the number of queries.  Returns its ``AlphaChoice``
    (``to_dict``: the α chosen, whether the target was reached, the std at each step)."""
    from interp.locate import choose_alpha

    memo: dict = {}

    def ro(layer_range, alpha):
        key = (layer_range, alpha if layer_range is not None else 1.0)
        if key not in memo:
            memo[key] = float(evaluator.count(layer_range, alpha))
        return memo[key]

    target = 17.5 * len(evaluator.queries) / 721 if target_std is None else target_std
    return choose_alpha(ro, initial, evaluator.n_layers, increase=increase, step=step, target_std=target,
                        max_steps=max_steps, window=window, extend=extend)
