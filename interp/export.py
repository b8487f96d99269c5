"""Write the located safety-layer range to JSON, and read it back with every check.

``export_located(path, result, model, ...)`` turns an ``interp.locate.BoundSearch`` into a
record that follows ``SCHEMA`` (JSON Schema, shipped as package data in
``interp/schemas/located_range.schema.json``; ``docs/located_range.md`` describes each field) and
writes it atomically.  ``load_located(path,
model=None)`` reads it back as a ``LocatedRange`` and refuses, with a message that says why:

- a file that is missing, empty, truncated or not JSON;
- a record of another schema, or of another schema version;
- a record that breaks the schema (missing field, wrong type, negative layer, ...) or is not
  self-consistent (start after end, range beyond the model's layers, winners that disagree
  with the range);
- with ``model``: a record made for other weights (fingerprint) or another layer count.

The fingerprint is ``interp.provenance.weights_fingerprint`` of the model's own parameters under
their Hugging Face names (``LoadedModel.hf_state_dict``), so a bridged model, the same model
unbridged and its saved checkpoint agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from interp.io import atomic_write_json
from interp.provenance import versions
from interp.ranges import LayerRange, LayerRangeError

SCHEMA_ID = "safety-layers/located-range"
SCHEMA_VERSION = 1

COMPONENT_NAMES = ["q", "k", "v", "o", "gate", "in", "out"]
SCHEMA_RESOURCE = "schemas/located_range.schema.json"


def _load_schema() -> dict:
    """The JSON Schema, read from the package's data (``importlib.resources``), so it is found in
    an installed wheel as well as in a checkout."""
    from importlib.resources import files

    return json.loads(files("interp").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8"))


SCHEMA: dict = _load_schema()


class LocatedRangeError(LayerRangeError):
    """A located-range file that cannot be used: unreadable, malformed, or for another model."""


@dataclass
class LocatedRange:
    """A loaded record: ``range`` (inclusive ``LayerRange``), ``alpha`` and the whole ``record``."""

    range: LayerRange
    alpha: float
    record: dict
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.record["model"]["fingerprint"]


def _fingerprint(model, cast=None) -> str:
    from interp.provenance import weights_fingerprint

    return weights_fingerprint(model, cast)


def _n_layers(model) -> int:
    config = getattr(model, "config", None)
    return int(config.num_hidden_layers)


# --- write ---------------------------------------------------------------------------------------


def located_record(
    result,
    model,
    *,
    dataset: str,
    dataset_hash: str,
    n_prompts: int,
    method: str,
    template: str | None = None,
    max_new_tokens: int | None = 16,
    components=tuple(COMPONENT_NAMES),
    alpha_selection: dict | None = None,
    extra_metric: dict | None = None,
    notes: str | None = None,
) -> dict:
    """The JSON record (see ``SCHEMA``) of a ``BoundSearch`` found on ``model``."""
    rows = [r.to_dict() for r in result.upper + result.lower]
    record = {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": str(getattr(model, "spec", type(model).__name__)),
                  "fingerprint": _fingerprint(model), "fingerprint_bf16": _fingerprint(model, torch.bfloat16),
                  "n_layers": _n_layers(model)},
        "range": {"start": result.range.start, "end": result.range.end},
        "alpha": float(result.alpha),
        "direction": result.direction,
        "components": list(components),
        "initial_range": {"start": result.initial.start, "end": result.initial.end},
        "baseline_r_o": float(result.baseline),
        "baseline_estimate": None if result.baseline_estimate is None else float(result.baseline_estimate),
        "sweeps": rows,
        "metric": {
            "name": "R_o", "method": method, "dataset": dataset, "dataset_hash": dataset_hash,
            "n_prompts": int(n_prompts), "template": template or getattr(model, "template", "chat"),
            "max_new_tokens": max_new_tokens, **(extra_metric or {}),
        },
        "alpha_selection": alpha_selection,
        "versions": versions(),
    }
    if notes:
        record["notes"] = notes
    validate_record(record)
    return record


def export_located(path: str | Path, result, model, **record_kwargs) -> Path:
    """Write ``located_record(result, model, ...)`` to ``path`` atomically; returns the path."""
    return atomic_write_json(path, located_record(result, model, **record_kwargs))


# --- read ----------------------------------------------------------------------------------------


def _schema_errors(record: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # not a dependency: the hand checks below still run
        return []
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors]


def validate_record(record, where: str = "located-range record") -> dict:
    """Raise ``LocatedRangeError`` unless ``record`` follows the schema and is self-consistent."""
    if not isinstance(record, dict):
        raise LocatedRangeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("schema") != SCHEMA_ID:
        raise LocatedRangeError(f"{where}: not a located-range file (schema is {record.get('schema')!r}, "
                                f"expected {SCHEMA_ID!r})")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LocatedRangeError(f"{where}: schema version {version!r}; this reader understands version "
                                f"{SCHEMA_VERSION} only (re-run `python -m analyses.locate` to rewrite it)")
    errors = _schema_errors(record)
    if errors:
        raise LocatedRangeError(f"{where} breaks the schema: " + "; ".join(errors[:5]))
    try:
        n_layers = int(record["model"]["n_layers"])
        located = _range(record["range"], "range")
        initial = _range(record["initial_range"], "initial_range")
        sweeps = record["sweeps"]
        alpha = float(record["alpha"])
    except (KeyError, TypeError, ValueError) as err:
        raise LocatedRangeError(f"{where}: missing or malformed field ({type(err).__name__}: {err})") from None
    for name, rng in (("range", located), ("initial_range", initial)):
        if rng.end >= n_layers:
            raise LocatedRangeError(f"{where}: {name} {rng} is outside the model's {n_layers} layers "
                                    f"(valid: 0..{n_layers - 1})")
    if not alpha > 0 or alpha == 1.0:
        raise LocatedRangeError(f"{where}: alpha {alpha} must be > 0 and differ from 1")
    if record["direction"] != ("max" if alpha > 1 else "min"):
        raise LocatedRangeError(f"{where}: direction {record['direction']!r} does not fit alpha {alpha}")
    for n, row in enumerate(sweeps):
        try:
            rng = _range(row, f"sweeps[{n}]")
        except (KeyError, TypeError) as err:
            raise LocatedRangeError(f"{where}: sweeps[{n}] is malformed ({err})") from None
        if rng.end >= n_layers:
            raise LocatedRangeError(f"{where}: sweeps[{n}] range {rng} is outside the model's {n_layers} layers")
    for phase in ("upper", "lower"):
        winners = [row for row in sweeps if row.get("phase") == phase and row.get("winner")]
        if len(winners) != 1:
            raise LocatedRangeError(f"{where}: the {phase}-bound sweep has {len(winners)} winners, expected 1")
    lower_winner = next(row for row in sweeps if row["phase"] == "lower" and row["winner"])
    if (lower_winner["start"], lower_winner["end"]) != (located.start, located.end):
        raise LocatedRangeError(f"{where}: range {located} is not the lower-bound sweep's winner "
                                f"[{lower_winner['start']},{lower_winner['end']}]")
    return record


def _range(obj, name: str) -> LayerRange:
    try:
        return LayerRange(obj["start"], obj["end"])
    except LayerRangeError as err:
        raise LocatedRangeError(f"{name}: {err}") from None


def load_located(path: str | Path, model=None) -> LocatedRange:
    """Read and check a located-range file (module docstring); with ``model`` (a ``LoadedModel``
    or an HF model) also refuse a file made for other weights or another layer count."""
    path = Path(path)
    if not path.is_file():
        raise LocatedRangeError(f"no located-range file at {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LocatedRangeError(f"{path} is empty")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise LocatedRangeError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "the file is truncated or corrupt: re-run `python -m analyses.locate`"
        ) from None
    validate_record(record, str(path))
    located = LocatedRange(LayerRange(record["range"]["start"], record["range"]["end"]),
                           float(record["alpha"]), record, path)
    if model is not None:
        n_layers = _n_layers(model)
        if n_layers != record["model"]["n_layers"]:
            raise LocatedRangeError(f"{path} was made for a model of {record['model']['n_layers']} layers; "
                                    f"this one has {n_layers}")
        located.range.check(n_layers)
        fingerprint = _fingerprint(model)
        if fingerprint != record["model"]["fingerprint"] and not (  # the same weights in another dtype?
            "fingerprint_bf16" in record["model"]
            and _fingerprint(model, torch.bfloat16) == record["model"]["fingerprint_bf16"]
        ):
            raise LocatedRangeError(
                f"{path} was made for other weights ({record['model']['spec']}, fingerprint "
                f"{record['model']['fingerprint']}) than this model (fingerprint {fingerprint}); "
                "locate the layers of this model first"
            )
    return located


def shipped_located(model=None) -> LocatedRange:
    """The located range shipped with the aligned embedded model (``located.json`` beside its
    adapter, written by ``python -m analyses.locate ... --ship``), checked against ``model``'s
    weights when given."""
    from interp.models import aligned_adapter_dir

    return load_located(aligned_adapter_dir() / "located.json", model=model)
