"""Every command line: bad input ends as ``error: ...`` with exit status 2, and is found before
any model is loaded."""

from __future__ import annotations

import importlib
import json

import pytest

CASES = [
    ("analyses.safety", ["--sets", "advbench_test,nonsense"], "unknown safety set"),
    ("analyses.safety", ["--limit", "0"], "at least 1"),
    ("analyses.existence", ["--normal", "/no/such/file.txt"], "no prompt file"),
    ("analyses.existence", ["--n", "abc"], "invalid"),
    ("analyses.locate", ["--init", "9,5"], "invalid layer range"),
    ("analyses.locate", ["--init-from", "/no/such/existence.json"], "no existence result"),
    ("analyses.locate", ["--init", "2,4", "--lower-offsets=3,1"], "must not exceed"),
    ("analyses.locate", ["--init", "2,4", "--alpha", "1"], "differ from 1"),
    ("analyses.locate", ["--init", "2,4", "--components", "q,up"], "unknown component"),
    ("analyses.sppft", ["--layers", "/no/such/located.json"], "no located-range file"),
    ("analyses.sppft", ["--layers", "2,4", "--modes", "sppft,everything"], "unknown mode"),
    ("analyses.sppft", ["--layers", "2,4", "--modes", "sppft@half_lr"], "unknown mode"),
    ("analyses.sppft", ["--layers", "2,4", "--seeds", "a,b"], "comma-separated integers"),
    ("analyses.judge", ["--split", "train"], "invalid choice"),
    ("analyses.causal", ["--existence", "/no/such/existence.json"], "no existence result"),
]


@pytest.mark.parametrize("module, argv, message", CASES, ids=[f"{m.split('.')[1]}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_an_error_line_and_exit_2_before_any_model_loads(module, argv, message, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("analyses.cli.load_model", no_model)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_malformed_json_inputs_are_errors_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("analyses.cli.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": [')
    for module, argv in (("analyses.locate", ["--init-from", str(broken)]),
                         ("analyses.causal", ["--existence", str(broken)])):
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(argv)
        assert exit_.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    located = tmp_path / "located.json"
    located.write_text(json.dumps({"schema": "something else"}))
    from analyses.sppft import main

    with pytest.raises(SystemExit) as exit_:
        main(["--layers", str(located), "--model", str(tmp_path / "no-model")])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_missing_model_is_an_error_line(capsys):
    from analyses.model_card import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "/no/such/model/folder"])
    assert exit_.value.code == 2 and "error: no model folder" in capsys.readouterr().err


def test_every_toolkit_error_derives_from_one_base_and_keeps_its_builtin():
    from analyses.cli import UsageError, main_guard
    from interp.activations import ActivationFileError
    from interp.architectures import UnsupportedArchitectureError
    from interp.cosine import PairSetError
    from interp.data import DataError
    from interp.errors import SafetyLayersError
    from interp.export import LocatedRangeError
    from interp.models import ModelLoadError, ModelNotFoundError, PromptTooLongError
    from interp.ranges import LayerRangeError
    from interp.scaling import ScalingError
    from interp.templates import TemplateError

    builtin = {UsageError: ValueError, ActivationFileError: ValueError, UnsupportedArchitectureError: ValueError,
               PairSetError: ValueError, DataError: ValueError, LocatedRangeError: ValueError,
               ModelLoadError: RuntimeError, ModelNotFoundError: FileNotFoundError, PromptTooLongError: ValueError,
               LayerRangeError: IndexError, ScalingError: ValueError, TemplateError: ValueError}
    for error, base in builtin.items():
        assert issubclass(error, SafetyLayersError) and issubclass(error, base), error

    class NewError(SafetyLayersError):
        pass

    @main_guard
    def main(argv=None):
        raise NewError("a new kind of bad input")

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2

    @main_guard
    def broken(argv=None):
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError):
        broken([])
