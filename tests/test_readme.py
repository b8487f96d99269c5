"""The README cannot rot: its Python blocks run as written, every file it names exists, its results
table equals the files in ``docs/`` it links, and it stays a user's document (short, no history).

The first Python block runs on the embedded model; the block that says it runs on "a tiny random
Llama" runs with its ``path/to/your/hf-model`` replaced by one, in a temporary working folder."""

from __future__ import annotations

import ast
import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
USER_MODEL = "path/to/your/hf-model"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def linked_paths(text: str) -> set[str]:
    """Every repository path the text names: Markdown link and image targets, and `docs/...` in code spans."""
    targets = set(re.findall(r"\]\(([^)\s]+)\)", text)) | set(re.findall(r"`(docs/[^`\s]+)`", text))
    return {t.split("#")[0] for t in targets if not re.match(r"[a-z]+://", t) and "..." not in t}


def table_rows(text: str) -> dict[str, list[str]]:
    """The results table's rows, keyed by their first cell."""
    section = text.split("## Results on the shipped model", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    return {r[0]: r[1:] for r in rows}


def pct(x: float) -> str:
    s = f"{100 * x:.1f}"
    return "100%" if s == "100.0" else f"{s}%"


# ---------------------------------------------------------------- the Python blocks run


def test_readme_has_the_two_quick_start_blocks():
    blocks = python_blocks(README)
    assert len(blocks) == 2
    assert 'load_model("embedded")' in blocks[0] and USER_MODEL in blocks[1]
    assert "The test suite runs this block on a tiny random Llama." in README


def test_quick_start_on_the_embedded_model_runs(embedded, monkeypatch, capsys):
    import interp
    from interp.export import shipped_located
    from interp.judge import is_refusal

    real_load = interp.load_model  # the session's embedded model stands in for a second identical load
    monkeypatch.setattr(interp, "load_model", lambda spec, *a, **k: embedded if spec == "embedded" else real_load(spec, *a, **k))
    namespace: dict = {}
    exec(compile(python_blocks(README)[0], "README.md:python-1", "exec"), namespace)
    out = capsys.readouterr().out
    assert namespace["model"] is embedded
    assert len(namespace["result"].layers) == embedded.n_layers
    located = namespace["located"].range
    assert located == shipped_located().range
    # the two printed R_o values equal refusals counted by plain generation, unscaled then scaled
    start, end, unscaled, scaled = map(int, re.search(r"\[(\d+),(\d+)\] (\d+) (\d+)", out).groups())
    assert (start, end) == (located.start, located.end)
    queries = namespace["queries"]
    assert unscaled == sum(is_refusal(t) for t in interp.generate(embedded, queries, max_new_tokens=16))
    with interp.scaled(embedded, located, 1.2):
        assert scaled == sum(is_refusal(t) for t in interp.generate(embedded, queries, max_new_tokens=16))


def test_quick_start_on_your_own_model_runs(tmp_path, monkeypatch):
    import interp
    from finetune.masks import named_parameters
    from interp.models import load_model
    from tests.conftest import build_tiny_llama

    tiny_dir = build_tiny_llama(tmp_path / "tiny-llama", n_layers=8)  # the onset rule needs more than 6 layers
    monkeypatch.chdir(tmp_path)
    code = python_blocks(README)[1].replace(USER_MODEL, str(tiny_dir))
    namespace: dict = {}
    exec(compile(code, "README.md:python-2", "exec"), namespace)
    model, located = namespace["model"], namespace["located"]
    path = tmp_path / "results" / "my-model" / "located.json"
    assert path.exists() and json.loads(path.read_text())["range"] == {"start": located.range.start, "end": located.range.end}
    assert located.range == namespace["run"].result.range
    # SPPFT froze exactly the located layers: their weights equal a fresh load's, another layer's moved
    fresh = named_parameters(load_model(str(tiny_dir), device="cpu", bridge=False))
    trained = named_parameters(model)
    inside = [n for n in fresh if any(f"layers.{i}." in n for i in located.range.layers) and n.endswith("proj.weight")]
    outside = [n for n in fresh if "layers." in n and n not in inside and n.endswith("proj.weight")]
    assert inside and all(torch.equal(fresh[n], trained[n]) for n in inside)
    assert any(not torch.equal(fresh[n], trained[n]) for n in outside)
    assert set(namespace["run_sppft"].frozen) >= set(inside)
    with pytest.raises(interp.LocatedRangeError, match="other weights"):  # fine-tuned: no longer the located weights
        interp.load_located(path, model)


# ---------------------------------------------------------------- files and numbers


def test_every_path_the_readme_names_exists():
    paths = linked_paths(README)
    assert {"docs/README.md", "LICENSE", "CHANGELOG.md"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_every_path_the_docs_index_names_exists():
    text = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    missing = sorted(p for p in linked_paths(text) if not (ROOT / "docs" / p).exists() and not (ROOT / p).exists())
    assert not missing, f"docs/README.md names files that do not exist: {missing}"


def _summary(model: str) -> dict[str, dict]:
    with open(ROOT / "docs" / "safety" / model / "summary.csv", newline="") as f:
        return {r["set"]: r for r in csv.DictReader(f)}


SAFETY_ROWS = {  # first words of a results-table row -> the safety set it quotes
    "AdvBench test half": "advbench_test", "paired harmful test": "paired_harmful_test",
    "XSTest unsafe": "xstest_unsafe", "benign test half": "benign_test", "paired benign test": "paired_benign_test",
    "XSTest safe": "xstest_safe", "D_o over-rejection": "over_rejection",
}


def test_results_table_equals_the_safety_reports():
    rows, ours, base = table_rows(README), _summary("embedded"), _summary("embedded-base")
    for prefix, name in SAFETY_ROWS.items():
        (cells,) = [v for k, v in rows.items() if k.startswith(prefix)]
        row, answered = ours[name], ours[name]["goal"] == "answer"
        rate = float(row["answered_rate"] if answered else row["refused_rate"])
        lo, hi = (1 - float(row["refused_hi"]), 1 - float(row["refused_lo"])) if answered else (
            float(row["refused_lo"]), float(row["refused_hi"]))
        assert cells[0] == f"{pct(rate)} ({pct(lo)[:-1]}–{pct(hi)[:-1]})", prefix
        base_rate = float(base[name]["answered_rate" if answered else "refused_rate"])
        assert cells[1] == pct(base_rate), prefix


def test_results_table_equals_existence_location_and_protection_files():
    from interp.judge import DEFAULT_JUDGE

    rows = table_rows(README)
    cell = lambda prefix: next(v for k, v in rows.items() if k.startswith(prefix))[0]  # noqa: E731
    band = json.loads((ROOT / "docs/existence/existence.json").read_text())["paired"]["comparison"]["bands"]
    start, end = band["gap_code"]["difference_above_zero"]
    assert cell("layers where the paired angle gap") == f"{start}–{end}"
    located = json.loads((ROOT / "docs/locate/located.json").read_text())
    winner = next(r for r in located["sweeps"] if r["winner"] and r["phase"] == "lower")
    r = located["range"]
    assert cell("located range") == f"[{r['start']},{r['end']}]: {winner['r_o']:.0f} / {located['baseline_r_o']:.0f}"
    for prefix, folder in (("global best range, α 1.2", "landscape-1.2"), ("global best range, α 1.05", "landscape")):
        best = json.loads((ROOT / "docs/locate" / folder / "global.json").read_text())["global"]
        top = best["candidates"][0]
        assert prefix.endswith(f"{best['alpha']:g}") and str(top["start"]) in best["winner"]
        assert cell(prefix) == f"{best['winner']}: {top['R_o']} / {top['p_best']:.2f}"
    with open(ROOT / "docs/sppft/final.csv", newline="") as f:
        final = {(r["data"], r["mode"], r["set"]): float(r["R_h"]) for r in csv.DictReader(f)}
    expected = " / ".join(pct(final[("implicit", m, "advbench_test")]) for m in ("sppft", "full", "ablation"))
    assert cell("AdvBench answered after 16 steps") == expected
    # the judge that counted the safety reports, and its accuracy as the judge report gives it
    name = json.loads((ROOT / "docs/safety/embedded/summary.json").read_text())["settings"]["judge"]["judge"]
    judges = json.loads((ROOT / "docs/judge/judge.json").read_text())["judges"]
    accuracy = judges["project" if name == DEFAULT_JUDGE.describe()["judge"] else name]["binary_accuracy"]  # the report calls the default "project"
    assert f"default judge ({pct(accuracy)} accurate on hand-labelled responses" in README


def test_sources_frame_table_matches_the_split():
    from interp.data import load_pairs

    text = (ROOT / "interp/datasets/SOURCES.md").read_text(encoding="utf-8")
    frames = {part: Counter(p.frame for p in load_pairs(part)) for part in ("train", "validation", "test")}
    assert not set(frames["train"]) & set(frames["validation"]) and set(frames["validation"]) == set(frames["test"])
    assert [len(frames[p]) for p in frames] == [4, 4, 4]
    for part, counts in frames.items():
        line = next(x for x in text.splitlines() if x.startswith(f"| `{part}` |"))
        assert f"| {sum(counts.values())} |" in line and f"({set(counts.values()).pop()} each)" in line
    held_out = set(frames["validation"])
    extra = [p for p in load_pairs("train", extra=True) if "-x" in p.pair_id]
    hard = [p for p in load_pairs("train", hard=True) if "-h" in p.pair_id]
    assert f"{sum(p.frame in held_out for p in extra)} of its 240 pairs are in the four held-out" in text
    assert f"{sum(p.frame in held_out for p in hard)} of its 200 pairs are in the four held-out" in text


# ---------------------------------------------------------------- a user's document


def test_readme_is_short_and_has_no_history():
    assert len(README.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d", README), "a date in the README: history goes to CHANGELOG.md"
    for word in ("issue", "session", "previous adapter", "morning", "retired", "no longer"):
        assert word not in README.lower(), word


HISTORY = re.compile(r"[Ii]ssue \d+|\b20\d\d-\d\d-\d\d\b|previous adapter|earlier adapter|\b1[12]-\d\d adapter|morning of")


def test_docstrings_hold_no_history():
    bad = []
    for package in ("interp", "analyses", "finetune", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            bad += [f"{path.relative_to(ROOT)}: {m.group(0)}" for n in nodes
                    for m in [HISTORY.search(ast.get_docstring(n) or "")] if m]
    assert not bad, bad


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md"])
def test_licence_and_changelog_exist(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    assert ("MIT License" in text) if name == "LICENSE" else ("e9aba91" in text)


def test_located_range_example_is_the_shipped_file():
    text = (ROOT / "docs" / "located_range.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"^```json\n(.*?)^```", text, flags=re.S | re.M)
    example, real = json.loads(block), json.loads((ROOT / "docs" / "locate" / "located.json").read_text())
    assert {k: v for k, v in example.items() if k != "sweeps"} == {k: v for k, v in real.items() if k != "sweeps"}
    assert example["sweeps"] == [r for r in real["sweeps"] if r["winner"]]
    assert f"all {len(real['sweeps'])} configurations" in text
