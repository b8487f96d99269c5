"""The R_o landscape (interp.landscape): every cell against plain greedy generation of a
weight-scaled copy on a tiny model of each family; the global choice against brute force on
planted R_o functions; the bootstrap against a plain Monte Carlo; the split's rule; resuming."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from interp.landscape import (
    COLUMNS,
    BelowUnscaledError,
    LandscapeEvaluator,
    LandscapeSettingsError,
    all_ranges,
    below_unscaled,
    best_probability,
    check_exportable,
    choose_alpha_std,
    flags_matrix,
    landscape,
    locate_from_flags,
    part_starts,
    rank_of,
    split_half,
    split_stability,
    top_ranges,
)
from interp.locate import search_bounds
from interp.overrejection import over_rejection_prompts
from interp.ranges import LayerRange
from interp.scaling import ALL_COMPONENTS
from tests.test_families import (  # noqa: F401 (the family fixtures, shared with test_families in one session)
    DO_PROMPTS,
    ParityJudge,
    bridged,
    family,
    family_dir,
    greedy_reference,
    plain,
    reference_scaled,
    tokenizer,
)

# --- every cell against plain generation, per family ---------------------------------------------


def test_landscape_cells_equal_plain_generation_of_a_weight_scaled_copy(family, bridged, plain):  # noqa: F811
    """Each range's answers (walked by end, prefill resumed from the previous range) are the
    greedy answers of a copy with that range's weights multiplied by alpha; the table's R_o and
    flags are the judge's verdicts on them (the table checked on one family: it reads the same
    walk)."""
    model, judge, alpha = bridged, ParityJudge(), 1.4
    evaluator = LandscapeEvaluator(model, DO_PROMPTS, batch_size=3, judge=judge)  # two batches, padding

    def reference(layer_range):
        ref = plain if layer_range is None else reference_scaled(plain, family, layer_range.layers, alpha,
                                                                 ALL_COMPONENTS)
        return [model.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in greedy_reference(ref, model, DO_PROMPTS)]

    assert evaluator.unscaled().texts == reference(None)
    expected = {}
    for start in range(model.n_layers):
        for layer_range, result in evaluator.walk(start, alpha):
            expected[layer_range] = reference(layer_range)
            assert result.texts == expected[layer_range], (family, layer_range)
    assert evaluator.evaluate(LayerRange(1, 2), alpha).texts == expected[LayerRange(1, 2)]
    if family != "llama":
        return
    frame = landscape(model, DO_PROMPTS, alpha, judge=judge, evaluator=evaluator, progress=False)
    assert list(frame.columns) == COLUMNS
    assert [(r.start, r.end) for r in all_ranges(model.n_layers)] == list(zip(frame["start"], frame["end"]))
    for row in frame.itertuples():
        verdicts = [judge.is_refusal(t) for t in expected[LayerRange(row.start, row.end)]]
        assert row.flags == "".join("1" if v else "0" for v in verdicts)
        assert row.R_o == sum(verdicts)
    assert (frame["unscaled_R_o"] == sum(judge.is_refusal(t) for t in reference(None))).all()


# --- planted R_o functions -----------------------------------------------------------------------


def planted_frame(values: dict[LayerRange, int], n_queries: int, alpha: float, unscaled: int, seed: int = 0):
    """A landscape frame whose range r refuses ``values[r]`` of ``n_queries`` queries (which
    ones drawn at random)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r, v in values.items():
        flags = np.zeros(n_queries, dtype=bool)
        flags[rng.choice(n_queries, size=v, replace=False)] = True
        rows.append({"start": r.start, "end": r.end, "alpha": alpha, "n_queries": n_queries, "R_o": v,
                     "unscaled_R_o": unscaled, "below_unscaled": below_unscaled(v, unscaled, alpha),
                     "estimate": 0.0, "seconds": 0.0, "flags": "".join("1" if f else "0" for f in flags)})
    return pd.DataFrame(rows, columns=COLUMNS)


def jagged(n_layers: int, seed: int, high: int = 120) -> dict[LayerRange, int]:
    rng = np.random.default_rng(seed)
    return {r: int(rng.integers(0, high)) for r in all_ranges(n_layers)}


@pytest.mark.parametrize("alpha", [1.2, 0.8])
@pytest.mark.parametrize("seed", range(4))
def test_global_argmax_equals_brute_force_on_planted_landscapes(alpha, seed):
    values = jagged(30, seed, high=40)  # few values: ties happen, the tie rule decides
    frame = planted_frame(values, 128, alpha, unscaled=20, seed=seed)
    best = max(values.values()) if alpha > 1 else min(values.values())
    brute = min((r for r, v in values.items() if v == best), key=lambda r: (len(r), r.start))
    assert top_ranges(frame, 1) == [brute]
    # rank: 1 + how many ranges are strictly better
    for r in list(values)[::37]:
        better = sum((v > values[r]) if alpha > 1 else (v < values[r]) for v in values.values())
        assert rank_of(frame, r) == (better + 1, 465)
    # confirming a top 10 picks the brute-force best among them
    top = top_ranges(frame, 10)
    confirmed_values = {r: int(v) for r, v in zip(top, np.random.default_rng(seed + 9).integers(0, 700, 10))}
    location = locate_from_flags(planted_frame(confirmed_values, 731, alpha, 300, seed), frame, n_boot=200)
    best = max(confirmed_values.values()) if alpha > 1 else min(confirmed_values.values())
    assert location.winner == min((r for r, v in confirmed_values.items() if v == best),
                                  key=lambda r: (len(r), r.start))
    assert location.candidates["p_best"].sum() == pytest.approx(1.0)
    assert set(location.candidates["coarse_rank"]) <= set(range(1, 11))


def test_the_local_search_can_miss_the_global_best_and_the_rank_says_by_how_much():
    """On a jagged planted landscape the bound search from a start ends where its sweeps lead;
    its rank on the landscape equals the number of strictly better ranges plus one."""
    values = jagged(30, 7)
    frame = planted_frame(values, 128, 1.2, unscaled=10)
    ranks = []
    for initial in (LayerRange(14, 22), LayerRange(14, 29), LayerRange(3, 8)):
        found = search_bounds(lambda r, a: 10.0 if r is None else float(values[r]), initial, 1.2, 30, window=3).range
        rank, n = rank_of(frame, found)
        assert rank == 1 + sum(v > values[found] for v in values.values()) and n == 465
        ranks.append(rank)
    assert max(ranks) > 1  # at least one start misses the global best on this landscape


def test_best_probability_matches_a_plain_monte_carlo():
    rng = np.random.default_rng(1)
    flags = rng.random((4, 200)) < np.array([0.50, 0.52, 0.40, 0.52])[:, None]
    got = best_probability(flags, 1.2, n_boot=3000, seed=0)
    # independent: a per-replicate loop with another seed
    other, wins = np.random.default_rng(123), np.zeros(4)
    for _ in range(3000):
        totals = flags[:, other.integers(0, 200, 200)].sum(axis=1)
        best = totals == totals.max()
        wins += best / best.sum()
    assert got == pytest.approx(wins / 3000, abs=0.035)
    assert got.sum() == pytest.approx(1.0)
    # a range refusing everything the others refuse and more always wins; identical ranges split
    dominant = np.vstack([flags[0] | flags[1], flags[0]])
    assert best_probability(dominant, 1.2, n_boot=500).tolist() == pytest.approx([1.0, 0.0], abs=1e-3)
    assert best_probability(np.vstack([flags[0], flags[0]]), 1.2, n_boot=500).tolist() == pytest.approx([0.5, 0.5])
    # alpha < 1: fewer refusals is better
    assert best_probability(dominant, 0.8, n_boot=500)[1] > 0.99


def test_below_unscaled_ranges_are_flagged_and_not_exported_unless_asked():
    assert below_unscaled(288, 332, 1.2) and not below_unscaled(686, 332, 1.2)
    assert below_unscaled(400, 332, 0.8) and not below_unscaled(300, 332, 0.8)
    values = {LayerRange(17, 27): 288, LayerRange(13, 14): 250}
    location = locate_from_flags(planted_frame(values, 731, 1.2, unscaled=332))
    assert location.winner == LayerRange(17, 27) and bool(location.candidates["below_unscaled"].iloc[0])
    with pytest.raises(BelowUnscaledError, match="below the unscaled"):
        check_exportable(location)
    assert check_exportable(location, allow_below_unscaled=True) == LayerRange(17, 27)
    fine = locate_from_flags(planted_frame({LayerRange(13, 14): 686}, 731, 1.2, unscaled=332))
    assert check_exportable(fine) == LayerRange(13, 14)


# --- the split -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_covering_and_independent_of_order():
    queries = over_rejection_prompts()
    a, b = split_half(queries)
    assert sorted(a + b) == list(range(len(queries))) and not set(a) & set(b)
    assert split_half(queries) == (a, b)
    shuffled = list(reversed(queries))
    a2, _ = split_half(shuffled)
    assert {shuffled[i] for i in a2} == {queries[i] for i in a}
    # the written rule, by hand
    for n in (0, 1, 100, 730):
        digest = hashlib.sha256(queries[n].encode("utf-8")).hexdigest()
        assert (n in a) == (int(digest[:8], 16) % 2 == 0)
    assert 0.4 < len(a) / len(queries) < 0.6


def test_split_stability_against_brute_force():
    queries = [f"How to kill process {k}?" for k in range(200)]
    values = jagged(6, 3, high=150)
    frame = planted_frame(values, 200, 1.2, unscaled=50, seed=2)
    out = split_stability(frame, queries)
    flags = flags_matrix(frame)
    ranges = [LayerRange(int(s), int(e)) for s, e in zip(frame["start"], frame["end"])]
    a, b = split_half(queries)
    on = {"A": flags[:, a].sum(1), "B": flags[:, b].sum(1)}
    best = {h: min(range(len(ranges)), key=lambda k: (-on[h][k], len(ranges[k]), ranges[k].start)) for h in "AB"}
    assert out["winner_A"] == str(ranges[best["A"]]) and out["winner_B"] == str(ranges[best["B"]])
    assert out["same_winner"] == (best["A"] == best["B"])
    assert out["on_B"]["its_R_o"] == on["B"][best["A"]] and out["on_B"]["own_winner_R_o"] == on["B"][best["B"]]
    assert out["n_A"] + out["n_B"] == 200


# --- resuming ------------------------------------------------------------------------------------


def test_landscape_resumes_from_its_file_and_refuses_other_settings(tiny, tmp_path, monkeypatch):
    queries = over_rejection_prompts(5)
    path = tmp_path / "landscape.csv"
    part = landscape(tiny, queries, 1.3, path=path, starts=[2, 3], progress=False)
    assert sorted(set(pd.read_csv(path)["start"])) == [2, 3] and len(part) == 3
    walked = []
    original = LandscapeEvaluator.walk

    def spy(self, start, *args, **kwargs):
        walked.append(start)
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(LandscapeEvaluator, "walk", spy)
    full = landscape(tiny, queries, 1.3, path=path, progress=False)
    assert walked == [0, 1] and len(full) == 10
    assert full[full["start"] >= 2].reset_index(drop=True).equals(part)
    again = landscape(tiny, queries, 1.3, path=path, progress=False)
    assert walked == [0, 1] and again.equals(full)
    with pytest.raises(LandscapeSettingsError, match="other settings"):
        landscape(tiny, queries, 1.5, path=path, progress=False)


# --- alpha and the command -----------------------------------------------------------------------


class PlantedEvaluator:
    """``choose_alpha_std``'s evaluator with a planted R_o: each range's value grows with how
    far alpha is from 1, so the lower sweep's spread reaches a target at a known alpha."""

    def __init__(self, n_layers=12):
        self.n_layers, self.queries, self.calls = n_layers, ["q"] * 721, []

    def count(self, layer_range, alpha=1.0):
        self.calls.append((layer_range, alpha))
        if layer_range is None:
            return 100
        return int(100 + round((alpha - 1) * 400) * (layer_range.start % 3))


def test_std_rule_stops_at_the_first_alpha_whose_lower_sweep_spread_reaches_the_target():
    evaluator = PlantedEvaluator()
    choice = choose_alpha_std(evaluator, LayerRange(5, 8), step=0.05, target_std=25.0, max_steps=8)
    record = choice.to_dict()
    alphas = [t["alpha"] for t in record["trials"]]
    assert alphas == pytest.approx([1.05 + 0.05 * k for k in range(len(alphas))])
    for alpha, std, result in choice.trials:  # the std is that of the lower sweep's R_o, recomputed here
        values = [evaluator.count(r.range, alpha) for r in result.lower]
        assert std == pytest.approx(np.std(values))
    assert choice.reached and record["alpha"] == alphas[-1]
    assert all(s < 25.0 for _, s, _ in choice.trials[:-1]) and choice.trials[-1][1] >= 25.0
    # the default target: 17.5 per 721 queries
    assert choose_alpha_std(evaluator, LayerRange(5, 8), max_steps=1).target_std == pytest.approx(17.5)


def test_run_landscape_writes_every_result_and_exports_the_winner(tiny, tmp_path):
    import argparse
    import json

    from analyses.landscape import add_landscape_options, run_landscape
    from interp.export import load_located

    parser = argparse.ArgumentParser()
    add_landscape_options(parser)
    args = parser.parse_args(["--landscape", "--landscape-limit", "4", "--confirm-top", "2", "--n-boot", "100"])
    args.__dict__.update(out=tmp_path, alpha=1.3, max_new_tokens=16, batch_size=None, components=ALL_COMPONENTS,
                         initials=[LayerRange(1, 2)], window=1, upper=None, lower=None, extend=False)
    queries = over_rejection_prompts(6)
    record = run_landscape(args, tiny, queries)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"landscape-a1.3.csv", "confirm-a1.3.csv", "global.json", "landscape.png", "starts-rank.csv",
            "located.json"} <= names
    frame = pd.read_csv(tmp_path / "landscape-a1.3.csv", dtype={"flags": str})
    assert len(frame) == 10 and (frame["n_queries"] == 4).all()
    saved = json.loads((tmp_path / "global.json").read_text())
    assert saved["global"]["winner"] == record["global"]["winner"]
    assert saved["starts"][0]["rank"] == rank_of(frame, LayerRange.parse(saved["starts"][0]["located"]))[0]
    located = load_located(tmp_path / "located.json", tiny)
    assert str(located.range) == record["global"]["winner"]


def test_parts_cover_every_start_once_with_balanced_work_and_merge(tiny, tmp_path):
    for n_layers, n_parts in ((30, 2), (30, 3), (4, 2)):
        parts = [part_starts(n_layers, k, n_parts) for k in range(1, n_parts + 1)]
        assert sorted(sum(parts, [])) == list(range(n_layers))
        work = [sum(n_layers - i for i in p) for p in parts]
        assert max(work) - min(work) <= n_layers
    queries = over_rejection_prompts(3)
    one = landscape(tiny, queries, 1.3, path=tmp_path / "a.part1of2.csv", starts=part_starts(4, 1, 2), progress=False)
    two = landscape(tiny, queries, 1.3, path=tmp_path / "a.part2of2.csv", starts=part_starts(4, 2, 2), progress=False)
    merged = landscape(tiny, queries, 1.3, path=tmp_path / "a.csv", progress=False,
                       also_from=[tmp_path / "a.part1of2.csv", tmp_path / "a.part2of2.csv"], evaluator=object())
    assert merged.equals(pd.concat([one, two]).sort_values(["start", "end"]).reset_index(drop=True))
    assert pd.read_csv(tmp_path / "a.csv", dtype={"flags": str}).shape == (10, len(COLUMNS))


def test_locate_cli_refuses_a_bad_landscape_option_before_loading_a_model(capsys):
    from analyses.locate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/no/such/model", "--landscape", "--confirm-top", "-1"])
    assert exit_info.value.code == 2
    assert "error: --confirm-top must be >= 0, got -1" in capsys.readouterr().err


def test_std_rule_record_is_made_once_and_reused_by_the_other_parts(tiny, tmp_path, monkeypatch):
    import argparse
    import json

    import analyses.landscape as cli
    from analyses.landscape import add_landscape_options, run_landscape

    parser = argparse.ArgumentParser()
    add_landscape_options(parser)
    calls = []
    real = cli.choose_alpha_std
    monkeypatch.setattr(cli, "choose_alpha_std", lambda *a, **k: calls.append(k) or real(*a, **k))
    queries = over_rejection_prompts(3)
    records = []
    for part in ("1/2", "2/2"):
        args = parser.parse_args(["--landscape", "--landscape-limit", "3", "--alpha-rule", "std",
                                  "--landscape-part", part])
        args.__dict__.update(out=tmp_path, alpha=1.3, max_new_tokens=8, batch_size=None, components=ALL_COMPONENTS,
                             initials=[LayerRange(1, 2)], window=1, upper=None, lower=None, extend=False,
                             max_alpha_steps=2)
        records.append(run_landscape(args, tiny, queries))
    assert len(calls) == 1  # the second part read the record back
    saved = json.loads((tmp_path / "alpha_choice.json").read_text())
    assert saved["settings"]["max_steps"] == 2 and len(saved["trials"]) >= 1
    assert records[0]["alphas"] == records[1]["alphas"] == list(dict.fromkeys([saved["alpha"], 1.3]))
    args.max_alpha_steps = 1  # other settings: the rule runs again
    args.landscape_part = "1/2"
    run_landscape(args, tiny, queries)
    assert len(calls) == 2


def test_a_search_path_ends_at_the_range_the_search_chose():
    from analyses.landscape_plot import search_path

    planted = {LayerRange(i, j): -5.0 * abs(i - 3) - 5.0 * abs(j - 5) for i in range(8) for j in range(i, 8)}
    result = search_bounds(lambda r, a: 0.0 if r is None else planted[r], LayerRange(2, 5), 1.2, 8, window=2,
                           extend=True)
    path = search_path(result)
    measured = [row.range for row in [*result.upper, *result.lower] if row.range is not None]
    assert path[-1] == result.range and path[:len(measured)] == measured
    assert measured[-1] != result.range  # the case the plot got wrong: the last range measured is not the result
