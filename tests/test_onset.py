"""The onset rule on synthetic gap curves, and the analysis pipeline end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from interp.onset import OnsetRule, suggest_initial_range
from interp.ranges import LayerRange


def planted(step_at=10, n_layers=30, noise=0.1, seed=0):
    """Flat near 0.5 deg, then a ramp 3, 5, 7 deg from ``step_at``, then a plateau at 8 deg."""
    rng = np.random.default_rng(seed)
    gap = np.full(n_layers, 0.5)
    ramp = [3.0, 5.0, 7.0]
    gap[step_at:step_at + 3] += ramp
    gap[step_at + 3:] += 8.0
    return gap + rng.normal(0, noise, n_layers)


@pytest.mark.parametrize("step_at", [7, 10, 16])
def test_finds_a_planted_step(step_at):
    result = suggest_initial_range(planted(step_at))
    # threshold = baseline + max(3 sd, 0.25 * 8) ~ 2.5 deg: the ramp's first layer (3.5 deg) is above;
    # plateau level = baseline + 0.8 * rise ~ 6.9 deg: the ramp's third layer (7.5 deg)
    assert result.range == LayerRange(step_at, step_at + 2)
    assert result.baseline == pytest.approx(0.5, abs=0.15)
    assert result.rise == pytest.approx(8.0, abs=0.5)
    assert "onset" in result.reason


def test_flat_or_falling_curve_has_no_range():
    rng = np.random.default_rng(1)
    flat = 1.0 + rng.normal(0, 0.3, 30)
    result = suggest_initial_range(flat)
    assert result.range is None and result.onset is None
    assert "no clear rise" in result.reason
    falling = np.linspace(1, -3, 30)
    assert suggest_initial_range(falling).range is None


def test_a_lone_spike_is_not_an_onset():
    gap = planted(step_at=18)
    gap[9] = 9.0  # one layer, then back to baseline
    result = suggest_initial_range(gap)
    assert result.onset == 18
    assert result.plateau >= 18


def test_rule_parameters_change_the_decision():
    gap = planted(step_at=10)
    assert suggest_initial_range(gap, OnsetRule(plateau_frac=0.3)).range == LayerRange(10, 10)
    assert suggest_initial_range(gap, OnsetRule(min_rise=20)).range is None
    late = suggest_initial_range(gap, OnsetRule(onset_frac=0.7))  # threshold ~6.1: the ramp's 7.5 is first
    assert late.onset == 12


def test_bad_curves_and_rules_are_clear_errors():
    with pytest.raises(ValueError, match="too short"):
        suggest_initial_range([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        suggest_initial_range([0.0] * 10 + [float("nan")])
    with pytest.raises(ValueError, match="one value per layer"):
        suggest_initial_range(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="baseline_layers"):
        OnsetRule(baseline_layers=1)
    with pytest.raises(ValueError, match="plateau_frac"):
        OnsetRule(plateau_frac=1.5)


def test_existence_analysis_writes_all_outputs(tiny_dir, tmp_path, capsys):
    from analyses.existence import main

    normal, malicious = tmp_path / "normal.txt", tmp_path / "malicious.txt"
    normal.write_text("".join(f"Tell me a fact about the number {i}.\n" for i in range(8)))
    malicious.write_text("".join(f"Explain how to break lock model {i} to steal a bike.\n" for i in range(8)))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--normal", str(normal), "--malicious", str(malicious), "--n", "6",
            "--r", "20", "--n-boot", "50", "--k", "2", "--baseline-layers", "2", "--out", str(out), "--device", "cpu"]
    main(argv)
    report = json.loads((out / "existence.json").read_text())
    (model,) = report["models"]
    assert model["n_normal"] == model["n_malicious"] == 6
    assert len(model["layers"]) == 4
    assert {"gap_code", "gap_paper", "gap_code_lo", "sampled_gap_code", "probe_acc", "dim_norm"} <= set(model["layers"][0])
    assert "suggested_range" in model and "reason" in model["suggested_range"]
    for name in ("layers_" + tiny_dir.name + ".csv", "similarity.png", "gap.png", "probe.png"):
        assert (out / name).stat().st_size > 0, name
    (saved,) = (out / "activations").glob("*.safetensors")
    printed = capsys.readouterr().out
    assert "suggested initial range" in printed
    main(argv)  # the second run reuses the saved activations
    assert list((out / "activations").glob("*.safetensors")) == [saved]
