"""The committed landscape of the shipped model (``docs/locate/landscape*/``) re-derived from its
own tables: every range present once with its per-query verdicts, the winner, the bootstrap,
the split-half result and the searches' ranks in ``global.json`` recomputed by the library from
the CSVs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from interp.landscape import all_ranges, flags_matrix, locate_from_flags, rank_of, split_stability
from interp.overrejection import over_rejection_prompts
from interp.ranges import LayerRange

ROOT = Path(__file__).resolve().parents[1]
RUNS = [ROOT / "docs/locate/landscape", ROOT / "docs/locate/landscape-1.2"]
N_LAYERS = 30


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"flags": str})


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_every_range_is_measured_once_and_its_count_is_its_verdicts(run):
    record = json.loads((run / "global.json").read_text())
    for alpha in record["alphas"]:
        frame = _read(run / f"landscape-a{alpha:g}.csv")
        assert sorted(zip(frame["start"], frame["end"])) == [(r.start, r.end) for r in all_ranges(N_LAYERS)]
        flags = flags_matrix(frame)
        assert flags.shape == (465, record["coarse_queries"])
        assert (flags.sum(axis=1) == frame["R_o"].to_numpy()).all()
        assert (frame["below_unscaled"] == (frame["R_o"] < frame["unscaled_R_o"])).all()


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_global_record_is_recomputed_from_the_tables(run):
    record = json.loads((run / "global.json").read_text())
    alpha = record["alpha"]
    coarse = _read(run / f"landscape-a{alpha:g}.csv")
    confirmed = _read(run / f"confirm-a{alpha:g}.csv")
    assert (flags_matrix(confirmed).sum(axis=1) == confirmed["R_o"].to_numpy()).all()
    saved = record["global"]
    again = locate_from_flags(confirmed, coarse, saved["n_boot"], saved["seed"])
    assert str(again.winner) == saved["winner"] and str(again.runner_up) == saved["runner_up"]
    assert np.allclose(again.candidates["p_best"], [c["p_best"] for c in saved["candidates"]])
    queries = over_rejection_prompts(record["coarse_queries"], "spread")
    assert split_stability(coarse, queries) == record["split_coarse"]
    assert split_stability(confirmed, over_rejection_prompts()) == record["split_confirmed"]
    for row in record["starts"]:
        assert rank_of(coarse, LayerRange.parse(row["located"]))[0] == row["rank"]
