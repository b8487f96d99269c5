"""The safety report (interp.safety, analyses.safety) on the tiny model: which prompts, how they
are judged and counted, what is written, and judging again without a model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from interp.data import load_pairs, load_prompts, load_xstest, sample_rows
from interp.judge import DEFAULT_JUDGE, RefusalMatcher
from interp.safety import SAFETY_SETS, SafetyReport, safety_report
from interp.stats import wilson


@pytest.fixture(scope="module")
def report(tiny):
    return safety_report(tiny, limit=3, max_new_tokens=4, batch_size=4, progress=False)


def test_every_set_is_sampled_spread_and_judged(report):
    frame = report.responses
    assert list(dict.fromkeys(frame["set"])) == list(SAFETY_SETS)
    advbench = load_prompts("advbench", "test")
    assert frame[frame["set"] == "advbench_test"]["prompt"].tolist() == sample_rows(advbench, 3, "spread")
    unsafe = frame[frame["set"] == "xstest_unsafe"]
    assert unsafe["prompt"].tolist() == sample_rows([x.prompt for x in load_xstest("unsafe")], 3, "spread")
    assert unsafe["type"].tolist() == sample_rows([x.kind for x in load_xstest("unsafe")], 3, "spread")
    paired = frame[frame["set"] == "paired_benign_test"]["prompt"].tolist()
    assert paired == sample_rows([p.benign for p in load_pairs("test")], 3, "spread")
    assert frame["label"].tolist() == [DEFAULT_JUDGE.classify(t) for t in frame["response"]]
    assert frame["refused"].tolist() == [label != "compliance" for label in frame["label"]]


def test_summary_counts_and_intervals(report):
    table = report.to_frame()
    for row in table.to_dict("records"):
        sub = report.responses[report.responses["set"] == row["set"]]
        assert row["n"] == 3 and row["refused"] == int(sub["refused"].sum())
        assert row["full_refusal"] + row["partial_refusal"] == row["refused"]
        assert (row["refused_lo"], row["refused_hi"]) == pytest.approx(wilson(row["refused"], 3))
        assert row["answered_rate"] == pytest.approx(1 - row["refused_rate"])
    record = report.to_dict()
    assert record["settings"]["judge"] == DEFAULT_JUDGE.describe()
    assert set(record["by_type"]) == {"xstest_safe", "xstest_unsafe"}


def test_written_report_reads_back_and_is_judged_again(report, tmp_path, monkeypatch):
    from analyses.safety import write_report

    write_report(tmp_path, report)
    back = SafetyReport.read(tmp_path)
    assert back.responses["response"].tolist() == report.responses["response"].tolist()
    assert back.to_frame().equals(report.to_frame())
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    everything = RefusalMatcher(phrases=["a", "e", "i", "o", "u", " "])  # calls nearly every text a refusal
    again = back.rejudged(everything)
    assert again.responses["refused"].sum() >= report.responses["refused"].sum()
    assert again.settings["judge"] == everything.describe()
    assert pd.read_csv(tmp_path / "responses.csv", keep_default_na=False).shape[0] == len(report.responses)


def test_cli_rejudges_without_a_model_and_refuses_bad_input(report, tmp_path, capsys):
    from analyses.safety import main, write_report

    write_report(tmp_path / "first", report)
    main(["--rejudge", str(tmp_path / "first"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "summary.json").is_file()
    for argv, message in ((["--sets", "nonsense"], "unknown safety set"),
                          (["--rejudge", str(tmp_path / "nowhere")], "no responses.csv"),
                          (["--limit", "0"], "--limit: must be at least 1, got 0")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
