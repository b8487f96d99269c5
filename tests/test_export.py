"""The located-range JSON (interp.export): round trip, schema, and the files it must refuse."""

from __future__ import annotations

import json

import pytest

from interp.data import prompts_hash
from interp.export import SCHEMA, SCHEMA_RESOURCE, LocatedRangeError, export_located, load_located
from interp.locate import search_bounds
from interp.models import load_hf, load_model
from interp.provenance import weights_fingerprint
from interp.ranges import LayerRange

QUERIES = ["How to kill time?", "How to steal the show?"]


def planted(layer_range, alpha):
    if layer_range is None:
        return 10.0
    return 10.0 + (alpha - 1) * 100 * (1.0 if layer_range == LayerRange(1, 2) else 0.3 * len(layer_range))


@pytest.fixture(scope="module")
def result():
    return search_bounds(planted, LayerRange(1, 1), 1.2, 4, window=1)


@pytest.fixture
def written(tmp_path, tiny, result):
    path = export_located(
        tmp_path / "located.json", result, tiny, dataset="over_rejection", dataset_hash=prompts_hash(QUERIES),
        n_prompts=len(QUERIES), method="generation", max_new_tokens=16,
    )
    return path


def rewrite(path, change):
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return path


def test_round_trip(written, tiny, result):
    located = load_located(written, model=tiny)
    assert located.range == result.range == LayerRange(1, 2)
    assert located.alpha == 1.2
    record = located.record
    assert record["model"]["n_layers"] == 4 and record["model"]["spec"] == tiny.spec
    assert record["baseline_r_o"] == 10.0
    assert record["metric"]["dataset_hash"] == prompts_hash(QUERIES)
    assert record["metric"]["template"] == "chat" and record["metric"]["max_new_tokens"] == 16
    assert {"torch", "transformers", "transformer-lens"} <= set(record["versions"])
    rows = [(r["phase"], r["start"], r["end"], r["r_o"], r["winner"]) for r in record["sweeps"]]
    assert rows == [(r.phase, r.range.start, r.range.end, r.r_o, r.winner) for r in result.upper + result.lower]
    assert load_located(written).range == LayerRange(1, 2)  # without a model: no weight check


def test_fingerprint_is_the_same_with_and_without_the_bridge(written, tiny, tiny_dir, tmp_path):
    plain, _, _ = load_hf(str(tiny_dir))
    assert weights_fingerprint(plain) == tiny.fingerprint()
    assert load_located(written, model=plain).range == LayerRange(1, 2)
    saved = load_model(str(tiny.save_pretrained(tmp_path / "saved")), device="cpu", bridge=False)
    assert load_located(written, model=saved).range == LayerRange(1, 2)  # the checkpoint keeps the fingerprint


def test_schema_is_package_data_and_validates_a_record(written):
    import importlib.resources

    import jsonschema

    on_disk = json.loads(importlib.resources.files("interp").joinpath(SCHEMA_RESOURCE).read_text())
    assert on_disk == SCHEMA
    jsonschema.Draft202012Validator.check_schema(on_disk)
    jsonschema.validate(json.loads(written.read_text()), on_disk)


def test_rejects_another_model(written, tiny_bias_dir):
    other, _, _ = load_hf(str(tiny_bias_dir))  # same shape (4 layers), other weights
    with pytest.raises(LocatedRangeError, match="other weights"):
        load_located(written, model=other)


def test_rejects_another_layer_count(written, tmp_path):
    from tests.conftest import build_tiny_llama

    other, _, _ = load_hf(str(build_tiny_llama(tmp_path / "six", n_layers=6)))
    with pytest.raises(LocatedRangeError, match="4 layers"):
        load_located(written, model=other)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda r: r.update(schema_version=2), "schema version 2"),
        (lambda r: r.update(schema="something/else"), "not a located-range file"),
        (lambda r: r["range"].update(end=7), "outside the model's 4 layers"),
        (lambda r: r["range"].update(start=3, end=2), "need 0 <= start <= end"),
        (lambda r: r["range"].update(start=-1), "breaks the schema"),
        (lambda r: r.pop("alpha"), "breaks the schema"),
        (lambda r: r.update(alpha="1.2"), "breaks the schema"),
        (lambda r: r.update(alpha=0.8), "direction 'max' does not fit"),
        (lambda r: r["range"].update(start=0, end=2), "not the lower-bound sweep's winner"),
        (lambda r: [s.update(winner=True) for s in r["sweeps"]], "winners"),
        (lambda r: r["model"].update(fingerprint="xyz"), "breaks the schema"),
    ],
)
def test_rejects_bad_records(written, change, match):
    with pytest.raises(LocatedRangeError, match=match):
        load_located(rewrite(written, change))


def test_rejects_truncated_empty_missing_and_non_json(written, tmp_path):
    text = written.read_text()
    written.write_text(text[: len(text) // 2])
    with pytest.raises(LocatedRangeError, match="truncated"):
        load_located(written)
    written.write_text("")
    with pytest.raises(LocatedRangeError, match="empty"):
        load_located(written)
    written.write_text("[1, 2]")
    with pytest.raises(LocatedRangeError, match="expected a JSON object"):
        load_located(written)
    with pytest.raises(LocatedRangeError, match="no located-range file"):
        load_located(tmp_path / "absent.json")


def test_write_is_atomic(tmp_path, tiny, result, monkeypatch):
    """A failure while writing leaves the previous file intact and no temporary file behind."""
    path = export_located(tmp_path / "located.json", result, tiny, dataset="d", dataset_hash="h", n_prompts=2,
                          method="generation")
    before = path.read_text()
    monkeypatch.setattr("interp.io.json.dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        export_located(path, result, tiny, dataset="d", dataset_hash="h", n_prompts=2, method="generation")
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["located.json"]


def test_finetune_reads_it(written, tiny):
    masks = pytest.importorskip("finetune.masks")
    assert masks.resolve_range(str(written), tiny) == LayerRange(1, 2)


def test_the_shipped_located_range_is_for_the_shipped_aligned_model(embedded):
    """The located range beside the shipped adapter (read by the notebooks) and its copy in
    docs/locate (quoted by the README) must be for the adapter's weights: a new adapter without a
    new location run fails here."""
    from pathlib import Path

    from interp.export import shipped_located

    located = shipped_located(embedded)  # checks the fingerprint
    assert located.record["model"]["spec"] == "embedded"
    folder = Path(__file__).resolve().parent.parent / "docs" / "locate"
    docs = load_located(folder / "located.json", embedded)
    assert docs.record == located.record
    # ... and it is the output of the start with the best R_o (the rule in docs/locate/README.md)
    starts = {path.parent.name: load_located(path, embedded) for path in sorted(folder.glob("start-*/located.json"))}
    assert len(starts) >= 2
    def located_r_o(run):  # the located range's R_o: its last winning row in the sweeps
        span = (run.record["range"]["start"], run.record["range"]["end"])
        return [row["r_o"] for row in run.record["sweeps"] if row["winner"] and (row["start"], row["end"]) == span][-1]

    best = max(starts.values(), key=located_r_o)  # alpha > 1: the highest R_o wins
    assert best.record["alpha"] > 1 and best.record == located.record


def test_a_range_located_in_float32_is_accepted_for_the_same_weights_in_bfloat16(written, tiny_dir, tiny_bias_dir):
    import torch

    located_for = load_model(str(tiny_dir), device="cpu", dtype=torch.bfloat16, bridge=False)
    assert located_for.fingerprint() != json.loads(written.read_text())["model"]["fingerprint"]
    assert load_located(written, model=located_for).range == LayerRange(1, 2)
    other = load_model(str(tiny_bias_dir), device="cpu", dtype=torch.bfloat16, bridge=False)
    with pytest.raises(LocatedRangeError, match="other weights"):
        load_located(written, model=other)
