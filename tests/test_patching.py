"""Last-position activation patching (``interp.patching``) against hand-built references, and
the causal CLI's input checks and statement (``analyses.causal``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses import causal, localisation
from interp.data import load_pairs
from interp.estimate import refusal_opening_token_ids
from interp.forward import PromptBatches
from interp.generation import Completion, generate_completions
from interp.hooks import hook_name
from interp.models import single_thread
from interp.patching import (
    SITES,
    PrefillPatch,
    last_position_hook,
    patched_refusal_rates,
    patching_sweep,
    prompt_log_odds,
    refusal_log_odds,
    refusal_metric,
    run_last_position,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads made these small forwards
    several times slower."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pairs():
    chosen = load_pairs("test")[:4]
    lengths = {len(p.harmful.split()) for p in chosen} | {len(p.benign.split()) for p in chosen}
    assert len(lengths) > 2  # prompts of different lengths: the padding matters
    return chosen


def reference_log_odds(model, logits):
    """log p / (1 - p) from a float64 softmax (independent of ``refusal_log_odds``)."""
    p = logits.double().softmax(-1)[..., refusal_opening_token_ids(model.tokenizer)].sum(-1)
    return torch.log(p) - torch.log1p(-p)


@torch.no_grad()
def single_logits(model, query, hooks=()):
    """Next-token logits of one unpadded prompt, full forward through the HF model."""
    enc = model.encode([query])
    with model.bridge.hooks(fwd_hooks=list(hooks)):
        return model.hf_model(**enc).logits[0, -1]


@torch.no_grad()
def single_last_values(model, query, names):
    """The last position's value of each hook in ``names`` in one unpadded forward."""
    found = {}

    def read(name):
        def hook(value, hook):
            found[name] = value[0, -1].clone()
            return value

        return hook

    single_logits(model, query, [(name, read(name)) for name in names])
    return found


def single_last_value(model, query, name):
    return single_last_values(model, query, [name])[name]


def write_last(value):
    def hook(resid, hook):
        resid = resid.clone()
        resid[0, -1] = value
        return resid

    return hook


def test_refusal_log_odds_is_the_log_odds_of_the_opening_mass():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 4
    openers = [3, 7, 11]
    p = logits.double().softmax(-1)[:, openers].sum(-1)
    assert torch.allclose(refusal_log_odds(logits, openers).double(), torch.log(p / (1 - p)), atol=1e-4)


def test_batched_sweep_equals_one_prompt_at_a_time_reference(tiny, pairs):
    result = patching_sweep(tiny, pairs, sites=list(SITES), batch_size=2, max_rows=5, min_gap=-1e9)
    assert result.patched.shape == (2, len(SITES), tiny.n_layers, len(pairs))
    for i, pair in enumerate(pairs):
        clean = {side: reference_log_odds(tiny, single_logits(tiny, getattr(pair, side)))
                 for side in ("harmful", "benign")}
        assert float(result.harmful_clean[i]) == pytest.approx(float(clean["harmful"]), abs=1e-4)
        assert float(result.benign_clean[i]) == pytest.approx(float(clean["benign"]), abs=1e-4)
        names = [hook_name(site, layer) for site in result.sites for layer in range(tiny.n_layers)]
        values = {side: single_last_values(tiny, getattr(pair, side), names) for side in ("harmful", "benign")}
        for d, direction in enumerate(result.directions):
            source, target = direction.split("->")
            for s, site in enumerate(result.sites):
                for layer in range(tiny.n_layers):
                    name = hook_name(site, layer)
                    value = values[source][name]
                    logits = single_logits(tiny, getattr(pair, target), [(name, write_last(value))])
                    expected = reference_log_odds(tiny, logits)
                    got = float(result.patched[d, s, layer, i])
                    assert got == pytest.approx(float(expected), abs=2e-4), (direction, site, layer, i)


def test_fraction_and_raw_change_follow_their_definitions(tiny, pairs):
    result = patching_sweep(tiny, pairs, sites=["resid_post"], min_gap=0.0)
    h, b = result.harmful_clean.numpy(), result.benign_clean.numpy()
    frame = result.to_frame().set_index(["direction", "site", "layer"])
    keep = h - b >= 0.0
    for d, direction in enumerate(result.directions):
        for layer in range(tiny.n_layers):
            patched = result.patched[d, 0, layer].numpy()
            if direction == "harmful->benign":
                change, per_pair = patched - b, (patched - b) / (h - b)
            else:
                change, per_pair = patched - h, (patched - h) / (b - h)
            row = frame.loc[(direction, "resid_post", layer)]
            assert row["mean_change"] == pytest.approx(change.mean(), abs=1e-5)
            assert row["n_used"] == keep.sum()
            if keep.any():
                assert row["fraction"] == pytest.approx(per_pair[keep].mean(), rel=1e-4, abs=1e-5)
    widest = result.largest_gaps(2)
    assert sorted(h - b)[::-1][:2] == pytest.approx([(h - b)[i] for i in widest])


def test_last_layer_resid_post_patch_reproduces_the_source_logits(tiny, pairs):
    last = ("resid_post", tiny.n_layers - 1)
    identity = lambda logits: logits.float()  # noqa: E731
    harmful = run_last_position(tiny, [p.harmful for p in pairs], identity, capture=[last], batch_size=2)
    benign = run_last_position(tiny, [p.benign for p in pairs], identity, capture=[last], jobs=[last],
                               sources=harmful.acts, batch_size=3)
    assert torch.allclose(benign.patched[0], harmful.clean, atol=1e-4)
    assert not torch.allclose(benign.clean, harmful.clean, atol=1e-2)
    # writing a run's own activations back changes nothing
    same = run_last_position(tiny, [p.benign for p in pairs], identity, jobs=[last], sources=benign.acts, batch_size=3)
    assert torch.allclose(same.patched[0], benign.clean, atol=1e-4)


def test_layer0_resid_pre_patch_of_a_shared_last_token_changes_nothing(tiny, pairs):
    """The chat template ends every prompt with the same token, so the last position's
    embedding (layer 0's resid_pre) is the same in both runs."""
    last_tokens = {int(row[-1]) for p in pairs for row in tiny.token_rows([p.harmful, p.benign])}
    assert len(last_tokens) == 1
    result = patching_sweep(tiny, pairs, sites=["resid_pre"], layers=[0])
    assert torch.allclose(result.patched[0, 0, 0], result.benign_clean, atol=1e-4)
    assert torch.allclose(result.patched[1, 0, 0], result.harmful_clean, atol=1e-4)


@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out"])
def test_a_patch_changes_the_residual_only_from_its_layer_on(tiny, pairs, site):
    pair = pairs[0]
    n = tiny.n_layers
    clean_values = single_last_values(tiny, pair.benign, [hook_name("resid_post", k) for k in range(n)])
    clean = torch.stack([clean_values[hook_name("resid_post", k)] for k in range(n)])
    for layer in range(n):
        source = single_last_value(tiny, pair.harmful, hook_name(site, layer))
        found = {}

        def read(k, found=found):
            def hook(value, hook):
                found[k] = value[0, -1].clone()
                return value

            return hook

        hooks = [(hook_name(site, layer), last_position_hook(source[None]))]
        hooks += [(hook_name("resid_post", k), read(k)) for k in range(n)]
        single_logits(tiny, pair.benign, hooks)
        patched = torch.stack([found[k] for k in range(n)])
        assert torch.allclose(patched[:layer], clean[:layer], atol=1e-5), (site, layer)
        assert not torch.allclose(patched[layer], clean[layer], atol=1e-3), (site, layer)
        if site == "resid_post":
            assert torch.allclose(patched[layer], source, atol=1e-6)


def test_prompt_log_odds_matches_single_prompts_with_hooks_everywhere(tiny, pairs):
    """Hooks act on the shared prefix too: compare with unshared single-prompt forwards."""
    torch.manual_seed(1)
    shift = torch.randn(tiny.config.hidden_size)
    hooks = [(hook_name("resid_pre", 1), lambda v, hook: v + shift)]
    queries = [p.harmful for p in pairs]
    got = prompt_log_odds(tiny, queries, hooks, batch_size=2)
    expected = torch.stack([reference_log_odds(tiny, single_logits(tiny, q, hooks)) for q in queries])
    assert torch.allclose(got.double(), expected, atol=2e-4)


@torch.no_grad()
def manual_prefill_patched_greedy(model, query, name, value, steps):
    """Greedy decoding of one prompt: the prefill with ``value`` written at the last position of
    hook ``name``, then plain decode steps with the KV cache."""
    enc = model.encode([query])
    with model.bridge.hooks(fwd_hooks=[(name, write_last(value))]):
        out = model.hf_model(**enc, use_cache=True)
    cache, mask, tokens = out.past_key_values, enc["attention_mask"], []
    token = out.logits[0, -1].argmax()
    for _ in range(steps):
        if int(token) in model.end_token_ids:
            break
        tokens.append(int(token))
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = model.hf_model(input_ids=token.view(1, 1), attention_mask=mask, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[0, -1].argmax()
    return tokens


def test_prefill_patch_writes_only_during_the_prefill(tiny, pairs):
    layer, steps = 1, 5
    name = hook_name("resid_post", layer)
    targets = [p.benign for p in pairs]
    sources = torch.stack([single_last_value(tiny, p.harmful, name) for p in pairs])
    prompts = PromptBatches.build(tiny, targets, batch_size=2, share_prefix=False)
    completions = generate_completions(tiny, targets, prompts=prompts, max_new_tokens=steps,
                                       fwd_hooks=[(name, PrefillPatch(prompts, sources))])
    for completion, query, source in zip(completions, targets, sources):
        assert list(completion.token_ids) == manual_prefill_patched_greedy(tiny, query, name, source, steps)
    with pytest.raises(ValueError, match="share_prefix"):
        PrefillPatch(PromptBatches.build(tiny, targets, batch_size=2), sources)


def test_patched_refusal_rates_reports_every_layer_and_direction(tiny, pairs):
    result = patched_refusal_rates(tiny, pairs[:3], [0, tiny.n_layers - 1], directions=("harmful->benign",
                                   "benign->harmful"), limit=2, max_new_tokens=3)
    frame = result.to_frame()
    assert len(frame) == 4 + 2 * 2
    assert result.kept == [0, 1]
    assert set(frame[frame["pairs"] == "kept"]["n"]) == {2}
    assert set(frame[frame["pairs"] == "screened"]["n"]) == {3}
    assert set(result.answers["harmful->benign"]) == {0, tiny.n_layers - 1}


def test_contrast_only_keeps_refused_harmful_answered_benign(tiny, pairs, monkeypatch):
    harmful = {p.harmful for p in pairs}
    # a stand-in judge: the first two harmful requests' answers count as refused, nothing else
    refused_prompts = [p.harmful for p in pairs[:2]]
    answers = {}

    def fake_generate(model, queries, **kwargs):
        texts = [f"answer to {q}" for q in queries]
        answers.update(zip(texts, queries))
        return [Completion(text, (), "length") for text in texts]

    class Judge:
        decided = None

        def classify(self, text):
            query = answers[text]
            return "full_refusal" if query in refused_prompts and query in harmful else "compliance"

    monkeypatch.setattr("interp.answers.generate_completions", fake_generate)
    result = patched_refusal_rates(tiny, pairs, [1], contrast_only=True, judge=Judge(), max_new_tokens=2)
    assert result.kept == [0, 1]
    assert result.screened["harmful"] == [True, True] + [False] * (len(pairs) - 2)
    assert result.rate("harmful->benign", 1).n == 2


def test_metric_uses_the_refusal_openers(tiny):
    logits = torch.zeros(1, tiny.hf_model.config.vocab_size)
    n_open = len(refusal_opening_token_ids(tiny.tokenizer))
    expected = np.log(n_open / (logits.shape[-1] - n_open))
    assert float(refusal_metric(tiny)(logits)) == pytest.approx(expected, abs=1e-4)


# --- the CLI and the table -----------------------------------------------------------------------


def _existence(tmp_path, **suggested):
    entry = {"model": "embedded", "n_layers": 30,
             "suggested_range": {"range": [7, 19], "onset": 7, "plateau": 19, "reason": "test"} | suggested}
    path = tmp_path / "existence.json"
    path.write_text(json.dumps({"models": [entry]}))
    return path


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        causal.main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["malformed existence", "malformed located", "missing existence",
                                  "onset outside the model", "gen layer outside the model", "no entry for the model"])
def test_cli_bad_input_exits_2_before_loading(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(causal, "model_from", lambda *a, **k: pytest.fail("a model was loaded"))
    existence = _existence(tmp_path)
    argv = ["--model", "embedded", "--existence", str(existence), "--located", "--out", str(tmp_path / "out")]
    if case == "malformed existence":
        existence.write_text('{"models": [{"model": "embedded", ')
    elif case == "malformed located":
        bad = tmp_path / "located.json"
        bad.write_text('{"schema": "safety-layers/located-range", "range": ')
        argv[argv.index("--located")] = "--located=" + str(bad)
    elif case == "missing existence":
        argv[argv.index(str(existence))] = str(tmp_path / "nowhere.json")
    elif case == "onset outside the model":
        _existence(tmp_path, onset=45)
    elif case == "gen layer outside the model":
        argv += ["--gen-layers", "3,30"]
    elif case == "no entry for the model":
        argv[1] = "embedded-base"
    code, err = _run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ")


def test_read_existence_reads_range_onset_and_plateau(tmp_path):
    gaps = causal.read_existence(_existence(tmp_path))
    assert gaps["embedded"].range.layers == list(range(7, 20))
    assert (gaps["embedded"].onset, gaps["embedded"].plateau) == (7, 19)


def test_relation_words():
    assert localisation.relation((7, 9), (7, 19)) == "lies inside"
    assert localisation.relation((7, 19), (7, 9)) == "contains"
    assert localisation.relation((16, 29), (7, 19)) == "overlaps (on [16,19])"
    assert localisation.relation((21, 21), (7, 19)) == "lies 2 layers after"
    assert localisation.relation((1, 3), (7, 19)) == "ends 4 layers before"
    assert localisation.relation((7, 19), (7, 19)) == "coincides with"


def _rows(located, band, direction):
    L = localisation.Localisation
    rows = [L("gap", "m", "gap onset-plateau", "existence", 7, 19, layers=list(range(7, 20)), detail="onset 7, plateau 19"),
            L("scaling", "m", "scaling search", "located", *located, layers=list(range(located[0], located[1] + 1))),
            L("resid_band", "m", "patching resid >= 50% (harmful into benign)", "patching", band[0], band[1],
              layers=list(range(band[0], band[1] + 1)), threshold=0.5, patch_direction="harmful->benign"),
            L("direction", "m", "refusal direction best layer", "direction", direction, direction, point=direction,
              layers=[direction])]
    return rows


def test_agreement_statement_is_computed_from_the_rows():
    agree = localisation.agreement_statement(_rows((8, 12), (10, 29), 11))
    assert "The scaling-located range [8,12] lies inside the gap range." in agree
    assert "that band overlaps (on [10,19]) the gap range and overlaps (on [10,12]) the scaling-located range" in agree
    assert "All 4 localisations" in agree and "share [11,11]" not in agree and "share layer 11" in agree
    apart = localisation.agreement_statement(_rows((2, 4), (22, 29), 16))
    assert "The scaling-located range [2,4] ends 3 layers before the gap range." in apart
    assert "No layer lies in all 4 localisations" in apart
    assert ("lies inside the gap range and lies 12 layers after the scaling-located range, "
            "and lies outside the residual band") in apart


def test_generation_statement_reads_the_rates():
    from interp.patching import PatchedGeneration

    flags = {10: [False, False, True, False], 20: [True, True, True, False], 25: [True, True, True, True]}
    generation = PatchedGeneration("m", "resid_post", [10, 20, 25], ["harmful->benign"], ["a", "b", "c", "d", "e"],
                                   {"harmful": [True] * 4 + [False], "benign": [False] * 5}, [0, 1, 2, 3],
                                   {"harmful->benign": flags}, {}, 8, True)
    text = localisation.generation_statement(generation)
    assert "on the 4 pairs" in text
    assert "1/4 at layer 10, 3/4 at layer 20, 4/4 at layer 25; at least half from layer 20 on" in text


def test_cli_end_to_end_on_the_tiny_model(tiny_dir, tmp_path, capsys):
    entry = {"model": str(tiny_dir), "n_layers": 4,
             "suggested_range": {"range": [1, 2], "onset": 1, "plateau": 2, "reason": "synthetic"}}
    existence = tmp_path / "existence.json"
    existence.write_text(json.dumps({"models": [entry]}))
    out = tmp_path / "out"
    causal.main(["--model", str(tiny_dir), "--existence", str(existence), "--located", "--out", str(out),
                 "--limit", "4", "--gen-pairs", "2", "--direction-pairs", "2", "--gen-layers", "0,3",
                 "--train-limit", "6", "--val-limit", "3",
                 "--max-new-tokens", "3", "--batch-size", "4"])
    record = json.loads((out / "causal.json").read_text())
    methods = [row["method"] for row in record["table"]]
    assert methods[0] == "gap onset-plateau" and methods[-1] == "refusal direction best layer"
    rows = [localisation.Localisation(**row) for row in record["table"]]
    assert record["statement"].startswith(localisation.agreement_statement(rows))
    chosen = record["models"][0]["direction"]["selection"]
    assert rows[-1].point == chosen["layer"]
    for name in ("causal.csv", "causal.png", "statement.txt"):
        assert (out / name).is_file()
    assert len(list(out.glob("patching_*.csv"))) == len(list(out.glob("direction_*.csv"))) == 1
    assert "wrote" in capsys.readouterr().out
