"""The protection tables in ``docs/`` come from the per-run files committed beside them.

Every ``results.json`` written by ``analyses.sppft`` lists the runs it tabulated; each must be in
its ``runs/`` folder (``runs/`` is ignored elsewhere, so a run not added by hand is silently lost,
which once left a 3-seed table that a clean clone could not re-tabulate), and re-tabulating those
files with ``finetune.study.summarise`` must give the table's rates again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.study import RunRecord, load_before, summarise

ROOT = Path(__file__).resolve().parents[1]


def _is_protection_study(path: Path) -> bool:
    """A ``results.json`` of ``analyses.sppft``: its ``runs`` is a list of run names."""
    runs = json.loads(path.read_text()).get("runs")
    return isinstance(runs, list) and all(isinstance(name, str) for name in runs)


STUDIES = sorted(p for p in (ROOT / "docs").rglob("results.json") if _is_protection_study(p))


def test_there_are_protection_studies_to_check():
    assert (ROOT / "docs" / "sppft" / "results.json") in STUDIES


@pytest.mark.parametrize("results", STUDIES, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_each_table_is_re_tabulated_from_its_committed_runs(results):
    summary = json.loads(results.read_text())
    folder = results.parent
    missing = [name for name in summary["runs"] if not (folder / "runs" / f"{name}.json").is_file()]
    assert not missing, f"runs tabulated in {results} but not kept in its runs/: {missing}"
    records = [RunRecord(**json.loads((folder / "runs" / f"{name}.json").read_text())["record"])
               for name in summary["runs"]]
    final, _ = summarise(records, load_before(folder))
    again = {(r["data"], r["mode"], r["set"]): r for r in final.to_dict("records")}
    for row in summary["final"]:
        other = again[(row["data"], row["mode"], row["set"])]
        assert other["per_seed"] == pytest.approx(row["per_seed"])
        assert other["R_h"] == pytest.approx(row["R_h"])
        assert (other["lo"], other["hi"]) == pytest.approx((row["lo"], row["hi"]))
