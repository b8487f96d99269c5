"""The demo driver: its steps, and a report whose numbers are read back from the steps' files."""

from __future__ import annotations

import json

from analyses import demo


def test_steps_flow_into_each_other_and_full_drops_the_subsets(tmp_path):
    steps = demo.steps(tmp_path, full=False)
    modules = [module for _, module, _ in steps]
    assert modules == ["analyses.judge", "analyses.safety", "analyses.safety", "analyses.existence", "analyses.locate",
                       "analyses.causal", "analyses.sppft"]
    by_module = {module: argv for _, module, argv in steps}
    locate_argv, sppft_argv = by_module["analyses.locate"], by_module["analyses.sppft"]
    assert locate_argv[locate_argv.index("--init-from") + 1] == str(tmp_path / "existence" / "existence.json")
    assert sppft_argv[sppft_argv.index("--layers") + 1] == str(tmp_path / "locate" / "located.json")
    causal_argv = by_module["analyses.causal"]
    assert causal_argv[causal_argv.index("--located") + 1] == str(tmp_path / "locate" / "located.json")
    assert "--limit" in locate_argv and "--pairs" in by_module["analyses.existence"]
    assert "--all-bands" in locate_argv and "--extend" in locate_argv  # the shipped range's procedure
    existence_argv = by_module["analyses.existence"]
    assert existence_argv[existence_argv.index("--pairs-part") + 1] == "validation"  # locate's start is chosen there
    for _, _, argv in demo.steps(tmp_path, full=True):
        assert not {"--limit", "--n-boot", "--pairs-limit", "--steps", "--seeds", "--no-audit"} & set(argv)


def test_report_shows_each_steps_numbers_and_failures(tmp_path):
    (tmp_path / "safety").mkdir()
    (tmp_path / "safety" / "summary.json").write_text(json.dumps({
        "model": "embedded", "fingerprint": "abc", "settings": {"judge": {"judge": "project"}},
        "sets": {"advbench_test": {"goal": "refuse", "n": 40, "refused": 37, "refused_rate": 37 / 40,
                                   "refused_lo": 0.8, "refused_hi": 0.97}},
    }))
    (tmp_path / "locate").mkdir()
    (tmp_path / "locate" / "located.json").write_text(json.dumps({
        "range": {"start": 7, "end": 9}, "alpha": 1.2, "initial_range": {"start": 7, "end": 19},
        "baseline_r_o": 42.0, "metric": {"n_prompts": 64, "method": "generation"},
        "sweeps": [{"phase": "upper", "start": 7, "end": 9, "r_o": 60.0, "estimate": None, "winner": True}],
    }))
    (tmp_path / "causal").mkdir()
    (tmp_path / "causal" / "causal.json").write_text(json.dumps({"statement": "stale words from an earlier run"}))
    (tmp_path / "sppft").mkdir()
    (tmp_path / "sppft" / "results.json").write_text(json.dumps({
        "safety_range": [13, 16],
        "final": [{"data": "implicit", "mode": "sppft", "set": "advbench_test", "R_h": 0.055, "lo": 0.028,
                   "hi": 0.083, "rouge_l": 0.3}],
        "differences": [{"data": "implicit", "mode": "sppft", "reference": "full", "set": "advbench_test",
                         "difference": -0.031, "lo": -0.05, "hi": -0.014}],
    }))
    done = [
        {"title": "Safety", "module": "analyses.safety", "argv": ["--out", "x"], "ok": True, "seconds": 3.0,
         "error": "", "folder": "safety"},
        {"title": "Location", "module": "analyses.locate", "argv": ["--out", "y"], "ok": True, "seconds": 4.0,
         "error": "", "folder": "locate"},
        {"title": "SPPFT", "module": "analyses.sppft", "argv": ["--out", "z"], "ok": True, "seconds": 1.0,
         "error": "", "folder": "sppft"},
        {"title": "Causal", "module": "analyses.causal", "argv": ["--out", "w"], "ok": False, "seconds": 1.0,
         "error": "Traceback: boom", "folder": "causal"},
    ]
    text = demo.report(tmp_path, done).read_text()
    assert "| advbench_test | refuse | 40 | 37 | 92.5% (80%-97%) |" in text
    assert "**Located range [7,9]**" in text and "baseline R_o 42 of 64 queries" in text
    assert "| upper | [7,9] | 60 | – | * |" in text
    assert "FAILED" in text and "boom" in text
    assert "| implicit | sppft | advbench_test | 6% (3%-8%) | 0.300 |" in text
    assert "stale words" not in text and "causal/causal.json" not in text  # may be an earlier run's
    assert "[results.json](sppft/results.json)" in text
    assert "| implicit | sppft minus full | advbench_test | -3.1 points (-5.0 to -1.4) |" in text


class _ArgparseError(Exception):
    pass


class _Parsed(Exception):
    pass


def test_every_step_passes_only_options_its_analysis_knows(tmp_path, monkeypatch):
    """Each step's argv goes through that analysis's own ``main`` up to its argument parser: an
    option it does not have (a renamed flag) fails here, not an hour into ``make demo``.  The
    parser stops the run once it has parsed (before any input file is read or model loaded), and
    any other exception fails the test."""
    import argparse
    import importlib

    def error(self, message):
        raise _ArgparseError(message)

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    checked = []
    for full in (False, True):
        for _, module, argv in demo.steps(tmp_path, full=full):
            try:
                importlib.import_module(module).main(argv)
            except _ArgparseError as err:
                raise AssertionError(f"{module} {argv}: {err}") from None
            except _Parsed:
                checked.append(module)
            else:
                raise AssertionError(f"{module} ran past its parser")
    assert checked == [module for full in (False, True) for _, module, _ in demo.steps(tmp_path, full=full)]


def test_a_failing_step_reports_its_error_line(tmp_path, capsys):
    """An analysis that rejects its input prints ``error: ...`` and exits 2; the report must say
    why, not only "exit 2"."""
    ok, _, error = demo.run_step("analyses.locate", ["--init", "1,2", "--all-bands", "--out", str(tmp_path)])
    assert not ok
    assert error.splitlines()[0].startswith("error: --all-bands") and error.endswith("exit 2")
    assert "error: --all-bands" in capsys.readouterr().err  # still shown while the demo runs
    ok, _, error = demo.run_step("analyses.judge", ["--help"])  # exit 0 is success
    assert ok and error == ""
