"""The bound search (interp.locate) on planted, synthetic R_o functions."""

from __future__ import annotations

import json

import pytest

from interp.locate import choose_alpha, lower_candidates, lowest_layer, search_bounds, upper_candidates
from interp.ranges import LayerRange, LayerRangeError

TRUE = LayerRange(6, 12)


def jaccard(a: LayerRange, b: LayerRange) -> float:
    inter = max(0, min(a.end, b.end) - max(a.start, b.start) + 1)
    return inter / (len(a) + len(b) - inter)


def planted(true=TRUE, baseline=100.0, gain=400.0, calls=None):
    """R_o that moves away from the baseline the more a range overlaps ``true``: up for α > 1,
    down for α < 1, in proportion to |α - 1|."""
    def ro(layer_range, alpha):
        if calls is not None:
            calls.append((layer_range, alpha))
        if layer_range is None:
            return baseline
        return baseline + gain * (alpha - 1) * jaccard(layer_range, true)
    return ro


@pytest.mark.parametrize("alpha", [1.2, 0.8])
@pytest.mark.parametrize("initial", [LayerRange(7, 11), LayerRange(8, 10), LayerRange(5, 13), LayerRange(6, 12)])
def test_finds_planted_range(alpha, initial):
    result = search_bounds(planted(), initial, alpha, 30, window=2)
    assert result.range == TRUE
    assert result.baseline == 100
    assert result.direction == ("max" if alpha > 1 else "min")
    # every upper row is [i, j+k], every lower row [i-k, j_u], one winner each
    assert [r.range for r in result.upper] == [LayerRange(initial.start, initial.end + k) for k in range(-2, 3)]
    assert all(r.range.end == result.upper_end for r in result.lower)
    assert sum(r.winner for r in result.upper) == sum(r.winner for r in result.lower) == 1
    values = [r.r_o for r in result.lower]
    best = max(values) if alpha > 1 else min(values)
    assert next(r for r in result.lower if r.winner).r_o == best


@pytest.mark.parametrize("alpha", [1.2, 0.8])
def test_extend_follows_a_winner_past_the_window(alpha):
    """From [9,9] with window 1 the plain search stops at [8,10] (both winners at their window's
    edge); extended, each sweep widens until its winner is inside: the planted [6,12], each
    range measured once."""
    calls = []
    plain = search_bounds(planted(), LayerRange(9, 9), alpha, 30, window=1)
    assert plain.range == LayerRange(8, 10)
    result = search_bounds(planted(calls=calls), LayerRange(9, 9), alpha, 30, window=1, extend=True)
    assert result.range == TRUE
    assert len(calls) == len(set(calls))
    assert [r.offset for r in result.upper] == [0, 1, 2, 3, 4]  # -1 gives [9,8]: invalid
    assert [r.offset for r in result.lower] == [-1, 0, 1, 2, 3, 4]
    for rows in (result.upper, result.lower):
        win = next(n for n, r in enumerate(rows) if r.winner)
        assert 0 < win < len(rows) - 1 and sum(r.winner for r in rows) == 1


def test_extend_stops_at_the_model_edge():
    result = search_bounds(planted(true=LayerRange(25, 29)), LayerRange(27, 27), 1.2, 30, window=1, extend=True)
    assert result.upper_end == 29 and result.range == LayerRange(25, 29)
    assert max(r.range.end for r in result.upper) == 29


def test_upper_bound_is_found_before_lower():
    """The upper sweep holds the start fixed, so with [8,10] it can only reach [8,12]."""
    result = search_bounds(planted(), LayerRange(8, 10), 1.2, 30, window=2)
    assert next(r for r in result.upper if r.winner).range == LayerRange(8, 12)
    assert result.range == LayerRange(6, 12)


# Table 1 of the paper as a lookup table: the search must reproduce its winners.
TABLE1 = {
    "llama3": (1.2, 139, LayerRange(7, 12), range(-2, 3), range(-1, 4), {
        (7, 10): 272, (7, 11): 241, (7, 12): 283, (7, 13): 266, (7, 14): 256,
        (8, 12): 334, (6, 12): 371, (5, 12): 358, (4, 12): 223,
    }, LayerRange(6, 12)),
    "phi3": (0.8, 270, LayerRange(11, 13), range(0, 5), range(-2, 3), {
        (11, 13): 209, (11, 14): 190, (11, 15): 149, (11, 16): 181, (11, 17): 189,
        (13, 15): 237, (12, 15): 182, (10, 15): 177, (9, 15): 163,
    }, LayerRange(11, 15)),
    "llama2": (1.15, 169, LayerRange(9, 12), range(0, 5), range(1, 6), {
        (9, 12): 187, (9, 13): 227, (9, 14): 237, (9, 15): 218, (9, 16): 219,
        (8, 14): 263, (7, 14): 268, (6, 14): 297, (5, 14): 189, (4, 14): 202,
    }, LayerRange(6, 14)),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_reproduces_table1(name):
    alpha, baseline, initial, up, low, table, expected = TABLE1[name]

    def ro(layer_range, a):
        assert a == alpha or layer_range is None
        return baseline if layer_range is None else table[(layer_range.start, layer_range.end)]

    result = search_bounds(ro, initial, alpha, 32, upper_offsets=up, lower_offsets=low)
    assert result.range == expected
    assert result.baseline == baseline
    assert "*" in result.table() and str(expected) in result.table()


def test_each_configuration_evaluated_once():
    calls = []
    result = search_bounds(planted(calls=calls), LayerRange(7, 11), 1.2, 30, window=2)
    assert len(calls) == len(set(calls))
    # baseline + 5 upper + 5 lower, minus the [i, j_u] row that both sweeps contain
    assert len(calls) == 1 + 5 + 5 - 1
    assert len(result.rows) == 11


def test_ties_go_to_the_offset_nearest_zero():
    flat = lambda r, a: 100.0 if r is None else 120.0  # noqa: E731
    result = search_bounds(flat, LayerRange(7, 11), 1.2, 30, window=2)
    assert result.range == LayerRange(7, 11)


def test_ranges_stay_inside_the_model():
    result = search_bounds(planted(true=LayerRange(26, 29)), LayerRange(27, 28), 1.3, 30, window=2)
    assert all(0 <= r.range.start <= r.range.end <= 29 for r in result.upper + result.lower)
    assert [r.range.end for r in result.upper] == [27, 28, 29]  # j-2 < i is dropped, j+2 > 29 too
    assert result.range == LayerRange(26, 29)
    assert upper_candidates(LayerRange(0, 1), range(-2, 3), 3) == [(-1, LayerRange(0, 0)), (0, LayerRange(0, 1)),
                                                                    (1, LayerRange(0, 2))]
    assert lower_candidates(1, 4, range(-2, 3)) == [(-2, LayerRange(3, 4)), (-1, LayerRange(2, 4)),
                                                     (0, LayerRange(1, 4)), (1, LayerRange(0, 4))]


def test_coarse_to_fine_confirms_the_best_candidates():
    fine_calls = []
    fine = planted(calls=fine_calls)

    def coarse(layer_range, alpha):  # ranks [7,13] above the true [7,12] in the upper sweep
        if layer_range == LayerRange(7, 13):
            return 1000.0
        return fine(layer_range, alpha)

    kept2 = search_bounds(coarse, LayerRange(7, 11), 1.2, 30, window=2, confirm=fine, keep=2)
    assert kept2.range == TRUE
    confirmed = [r for r in kept2.upper if r.r_o is not None]
    assert len(confirmed) == 2 and all(r.estimate is not None for r in kept2.upper)
    kept1 = search_bounds(coarse, LayerRange(7, 11), 1.2, 30, window=2, confirm=fine, keep=1)
    assert next(r for r in kept1.upper if r.winner).range == LayerRange(7, 13)


def test_coarse_to_fine_keeps_the_confirmed_upper_winner_in_the_lower_sweep():
    """The lower sweep's k = 0 row is the upper winner, already confirmed: it must compete even
    when the coarse score ranks it below `keep` others (seen on the real model)."""
    fine_values = {LayerRange(7, 12): 50.0, LayerRange(6, 12): 20.0, LayerRange(5, 12): 10.0}

    def fine(layer_range, alpha):
        return 0.0 if layer_range is None else fine_values.get(layer_range, 1.0)

    def coarse(layer_range, alpha):
        if layer_range is None:
            return 0.0
        if layer_range == LayerRange(7, 12):
            return 30.0  # best of the upper sweep, but third of the lower one
        return {LayerRange(6, 12): 40.0, LayerRange(5, 12): 35.0}.get(layer_range, 1.0)

    result = search_bounds(coarse, LayerRange(7, 11), 1.2, 30, window=2, confirm=fine, keep=2)
    assert next(r for r in result.upper if r.winner).range == LayerRange(7, 12)
    confirmed = {r.range: r.r_o for r in result.lower if r.r_o is not None}
    assert confirmed == {LayerRange(7, 12): 50.0, LayerRange(6, 12): 20.0, LayerRange(5, 12): 10.0}
    assert result.range == LayerRange(7, 12)


@pytest.mark.parametrize("increase,planted_alpha", [(True, 1.15), (False, 0.85)])
def test_alpha_rule_picks_planted_alpha(increase, planted_alpha):
    """R_o responds to the range only once |α - 1| reaches the planted step, so the lower-sweep
    std first reaches the target there."""
    def ro(layer_range, alpha):
        if layer_range is None:
            return 100.0
        strength = 0.5 if abs(alpha - 1) < abs(planted_alpha - 1) - 1e-9 else 60.0
        sign = 1 if alpha > 1 else -1
        return 100.0 + sign * strength * jaccard(layer_range, TRUE) * 10

    choice = choose_alpha(ro, LayerRange(7, 11), 30, increase=increase, target_std=15.0, window=2)
    assert choice.reached
    assert choice.alpha == pytest.approx(planted_alpha)
    assert [round(a, 2) for a, _, _ in choice.trials] == (
        [1.05, 1.1, 1.15] if increase else [0.95, 0.9, 0.85])
    assert choice.result.range == TRUE
    assert choice.trials[-1][1] >= 15.0 > choice.trials[-2][1]


def test_alpha_rule_gives_up_after_max_steps():
    choice = choose_alpha(lambda r, a: 100.0, LayerRange(7, 11), 30, target_std=1.0, max_steps=3, window=1)
    assert not choice.reached and len(choice.trials) == 3 and choice.alpha == pytest.approx(1.15)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(alpha=1.0), ValueError),
        (dict(alpha=0.0), ValueError),
        (dict(alpha=float("nan")), ValueError),
        (dict(initial=LayerRange(28, 31)), LayerRangeError),
        (dict(window=-1), ValueError),
        (dict(keep=0, confirm=planted()), ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    args = dict(ro=planted(), initial=LayerRange(7, 11), alpha=1.2, n_layers=30)
    args.update(kwargs)
    with pytest.raises(error):
        search_bounds(**args)


def test_non_finite_ro_is_refused():
    with pytest.raises(ValueError, match="returned nan"):
        search_bounds(lambda r, a: float("nan"), LayerRange(7, 11), 1.2, 30)


def test_lowest_layer():
    assert lowest_layer(LayerRange(7, 11), 30, window=2) == 5
    assert lowest_layer(LayerRange(1, 11), 30, window=2) == 0
    assert lowest_layer(LayerRange(7, 11), 30, lower_offsets=range(-1, 4)) == 4


@pytest.mark.parametrize("seed", range(20))
def test_pruning_never_skips_a_possible_winner(seed):
    """Random R_o landscapes with bounds at or above each value: the pruned search measures fewer
    candidates and always locates the full search's range."""
    import random

    rng = random.Random(seed)
    values, slack = {}, {}

    def ro(layer_range, alpha):
        key = None if layer_range is None else (layer_range.start, layer_range.end)
        return values.setdefault(key, float(rng.randint(0, 60)))

    def bound(layer_range, alpha):
        key = (layer_range.start, layer_range.end)
        return ro(layer_range, alpha) + slack.setdefault(key, float(rng.choice([0, 0, 3, 25])))

    full = search_bounds(ro, LayerRange(7, 11), 1.2, 30, window=3)
    measured = []
    pruned = search_bounds(lambda r, a: measured.append(r) or ro(r, a), LayerRange(7, 11), 1.2, 30, window=3, bound=bound)
    assert pruned.range == full.range
    for sweep in (pruned.upper, pruned.lower):
        best = max(r.r_o for r in sweep if r.r_o is not None)
        assert all(r.estimate < best for r in sweep if r.pruned)
        assert all((r.r_o is None) == r.pruned for r in sweep)
    assert len(measured) <= 1 + 7 + 7


def test_pruning_is_off_below_alpha_one():
    calls = []
    full = search_bounds(planted(calls=calls), LayerRange(7, 11), 0.8, 30, window=2, bound=lambda r, a: 0.0)
    assert not any(r.pruned for r in full.upper + full.lower) and len(calls) == 10


class PlantedEvaluator:
    """Stands in for ``RoEvaluator``: R_o from ``planted()``; every prompt's mass is high, so
    the bound is the number of prompts."""

    def __init__(self, n=200):
        self.queries, self.fn, self.calls = ["q"] * n, planted(), []

    def evaluate(self, layer_range, alpha, components, generate=True):
        import torch

        from interp.estimate import FirstStep
        from interp.overrejection import RoResult

        self.calls.append((layer_range, alpha, generate))
        k = int(self.fn(layer_range, alpha))
        flags = torch.arange(len(self.queries)) < k
        return RoResult(FirstStep(torch.ones(len(self.queries)), flags), flags if generate else None)


def test_search_cache_resumes_an_interrupted_search(tmp_path):
    from interp.ro_search import SearchRo

    meta = {"model": "x", "prompts": "abc"}
    full = search_bounds(planted(), LayerRange(7, 11), 1.2, 30, window=2)
    flaky = PlantedEvaluator()
    real = flaky.evaluate

    def interrupt(*args, **kwargs):
        if len(flaky.calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    flaky.evaluate = interrupt
    path = tmp_path / "ro_cache.json"
    with pytest.raises(KeyboardInterrupt):
        search_bounds(SearchRo(flaky, path=path, meta=meta).generated, LayerRange(7, 11), 1.2, 30, window=2)
    assert len(json.loads(path.read_text())["configs"]) == 4

    again = PlantedEvaluator()
    search = SearchRo(again, path=path, meta=meta)
    resumed = search_bounds(search.generated, LayerRange(7, 11), 1.2, 30, window=2)
    assert search.hits == 4 and len(again.calls) == 10 - 4
    assert resumed.range == full.range
    assert [r.r_o for r in resumed.rows] == [int(r.r_o) for r in full.rows]
    with pytest.raises(ValueError, match="other settings"):
        SearchRo(PlantedEvaluator(), path=path, meta={**meta, "prompts": "other"})
    path.write_text('{"meta": {"a": 1}, "configs": {')
    with pytest.raises(ValueError, match="unreadable"):
        SearchRo(PlantedEvaluator(), path=path, meta=meta)


# --- the command line (analyses.locate) on the tiny model ----------------------------------------


def test_analysis_writes_outputs_and_resumes(tiny_dir, tmp_path, capsys):
    from analyses.locate import main
    from interp.export import load_located
    from interp.models import load_hf

    out = tmp_path / "locate"
    argv = ["--model", str(tiny_dir), "--init", "1,2", "--window", "1", "--limit", "4", "--device", "cpu",
            "--out", str(out)]
    main(argv)
    printed = capsys.readouterr().out
    assert "upper-bound sweep" in printed and "*" in printed and "[generated]" in printed
    for name in ("located.json", "sweeps.csv", "sweeps.png"):
        assert (out / name).is_file()
    plain, _, _ = load_hf(str(tiny_dir))
    located = load_located(out / "located.json", model=plain)
    assert located.record["metric"]["n_prompts"] == 4
    assert located.record["metric"]["method"] == "generation (estimate-pruned)"
    frame = __import__("pandas").read_csv(out / "sweeps.csv")
    assert len(frame) == 1 + len(located.record["sweeps"])

    main(argv)  # every configuration now comes from the cache
    printed = capsys.readouterr().out
    import re

    hits = int(re.search(r"(\d+) from the cache", printed).group(1))
    assert hits >= located.record["metric"]["search"]["n_generated"] > 0  # nothing was evaluated again
    assert "[generated]" not in printed and "[estimated]" not in printed


def test_initial_range_from_existence_json(tmp_path):
    from analyses.locate import initial_from_existence

    path = tmp_path / "existence.json"
    path.write_text(json.dumps({"models": [
        {"model": "a", "suggested_range": {"range": [5, 9], "reason": "x"}},
        {"model": "b", "suggested_range": {"range": [6, 12], "reason": "y"}},
    ]}))
    assert initial_from_existence(path, "b") == LayerRange(6, 12)
    assert initial_from_existence(path, "other") == LayerRange(5, 9)
    path.write_text(json.dumps({"models": [{"model": "a", "suggested_range": {"range": None, "reason": "flat"}}]}))
    with pytest.raises(LayerRangeError, match="flat"):
        initial_from_existence(path, "a")
    with pytest.raises(ValueError, match="no existence result"):
        initial_from_existence(tmp_path / "none.json")


def test_initial_range_prefers_the_paired_band_of_validation_pairs_only(tmp_path):
    """Start from the layers where the aligned model's paired gap exceeds the base model's (the
    wording control), but only if those pairs were not the test pairs (a test split chooses
    nothing); the unpaired suggestion otherwise."""
    from analyses.locate import initial_from_existence

    path = tmp_path / "existence.json"
    record = {"config": {"gap": "code", "pairs_part": "validation"},
              "models": [{"model": "a", "suggested_range": {"range": None, "reason": "flat"}}],
              "paired": {"comparison": {"a": "a", "b": "base", "bands": {
                  "gap_code": {"difference_above_zero": [14, 21]}, "gap_paper": {"difference_above_zero": [3, 4]}}}}}
    path.write_text(json.dumps(record))
    assert initial_from_existence(path, "a") == LayerRange(14, 21)
    record["config"]["pairs_part"] = "test"
    path.write_text(json.dumps(record))
    with pytest.raises(LayerRangeError, match="test pairs"):
        initial_from_existence(path, "a")
    record["config"]["pairs_part"] = "validation"
    record["paired"]["comparison"]["a"] = "other"  # the band is for another model
    path.write_text(json.dumps(record))
    with pytest.raises(LayerRangeError, match="flat"):
        initial_from_existence(path, "a")
    record["paired"]["comparison"]["a"] = "a"
    record["models"][0]["suggested_range"]["range"] = [7, 19]  # an unpaired suggestion too: the band wins
    path.write_text(json.dumps(record))
    assert initial_from_existence(path, "a") == LayerRange(14, 21)
    record["config"]["pairs_part"] = "test"  # ... unless it came from the test pairs
    path.write_text(json.dumps(record))
    assert initial_from_existence(path, "a") == LayerRange(7, 19)


# --- several starts (interp.ro_search.best_run, analyses.locate --init ... --init / --all-bands) --


PEAK_A, PEAK_B = LayerRange(2, 4), LayerRange(20, 24)


def two_peaks(a=PEAK_A, b=PEAK_B):
    """R_o with two separate planted ranges, ``b`` twice as strong: a search that starts near
    ``a`` stays there (the search is local)."""
    def ro(layer_range, alpha):
        if layer_range is None:
            return 100.0
        return 100.0 + (alpha - 1) * max(200 * jaccard(layer_range, a), 400 * jaccard(layer_range, b))
    return ro


@pytest.mark.parametrize("alpha", [1.2, 0.8])
def test_best_run_keeps_the_start_whose_range_scores_best(alpha):
    from interp.ro_search import LocationRun, best_run

    runs = [LocationRun(search_bounds(two_peaks(), start, alpha, 30, window=2), "generation")
            for start in (LayerRange(2, 4), LayerRange(20, 24), LayerRange(2, 4))]
    assert [run.result.range for run in runs] == [LayerRange(2, 4), LayerRange(20, 24), LayerRange(2, 4)]
    assert runs[0].result.located_r_o == pytest.approx(100 + (alpha - 1) * 200)
    assert runs[1].result.located_r_o == pytest.approx(100 + (alpha - 1) * 400)
    assert best_run(runs) == 1  # α > 1: the highest R_o; α < 1: the lowest
    assert best_run([runs[0], runs[2]]) == 0  # ties: the earlier start
    with pytest.raises(ValueError, match="different alphas"):
        best_run([runs[0], LocationRun(search_bounds(two_peaks(), LayerRange(2, 4), 1 / alpha, 30, window=2), "generation")])
    with pytest.raises(ValueError, match="no searches"):
        best_run([])


def test_all_bands_reads_every_distinct_validation_band(tmp_path):
    from analyses.locate import initials_from_existence

    path = tmp_path / "existence.json"
    record = {"config": {"gap": "code", "pairs_part": "validation"},
              "models": [{"model": "a", "suggested_range": {"range": [7, 19], "reason": "x"}}],
              "paired": {"comparison": {"a": "a", "b": "base", "bands": {
                  "gap_code": {"difference_above_zero": [12, 29], "non_overlapping": [14, 22]},
                  "gap_paper": {"difference_above_zero": [3, 4], "non_overlapping": [5, 6]}}}}}
    path.write_text(json.dumps(record))
    assert initials_from_existence(path, "a") == [LayerRange(12, 29), LayerRange(14, 22)]
    record["paired"]["comparison"]["bands"]["gap_code"]["non_overlapping"] = [12, 29]  # the same band once
    path.write_text(json.dumps(record))
    assert initials_from_existence(path, "a") == [LayerRange(12, 29)]
    record["config"]["pairs_part"] = "test"  # test pairs choose nothing: the unpaired suggestion only
    path.write_text(json.dumps(record))
    assert initials_from_existence(path, "a") == [LayerRange(7, 19)]


def test_analysis_from_several_starts_keeps_the_best(tiny_dir, tmp_path, capsys):
    import pandas as pd

    from analyses.locate import main
    from interp.export import load_located
    from interp.models import load_hf

    out = tmp_path / "locate"
    main(["--model", str(tiny_dir), "--init", "0,1", "--init", "2,3", "--init", "0,1", "--window", "1",
          "--limit", "4", "--method", "generation", "--device", "cpu", "--out", str(out)])
    starts = pd.read_csv(out / "starts.csv")
    assert list(starts["start"]) == ["[0,1]", "[2,3]"]  # a repeated start runs once
    plain, _, _ = load_hf(str(tiny_dir))
    each = [load_located(out / folder / "located.json", model=plain) for folder in starts["folder"]]
    ro = [next(s["r_o"] for s in e.record["sweeps"] if s["winner"] and s["phase"] == "lower") for e in each]
    assert list(starts["R_o"]) == ro
    chosen = max(range(2), key=lambda n: (ro[n], -n))
    assert list(starts["chosen"]) == [n == chosen for n in range(2)]
    shipped = load_located(out / "located.json", model=plain)
    assert shipped.range == each[chosen].range and shipped.record["sweeps"] == each[chosen].record["sweeps"]
    assert "chosen:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--init", "1,2", "--init", "2,9"], "does not fit"),
    (["--init", "1,2", "--all-bands"], "--all-bands"),
])
def test_analysis_refuses_bad_starts_before_searching(tiny_dir, tmp_path, capsys, argv, message):
    from analyses.locate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tiny_dir), "--limit", "4", "--device", "cpu", "--out", str(tmp_path / "x")] + argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert any(line.startswith("error: ") and message in line for line in err.splitlines())
    assert not (tmp_path / "x" / "cache").exists()
