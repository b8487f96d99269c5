"""Prompt sets shipped with the package, and a loader that validates them.

Every set is a plain UTF-8 text file under ``interp/datasets/``, one prompt a line, no header
(a ``.csv`` path given by the user is read as one CSV column, e.g. the paper's files).
``interp/datasets/SOURCES.md`` names the source and licence of each.

Splits are deterministic and documented: ``train`` is every even-numbered row (0, 2, 4, ...)
of a file, ``test`` every odd-numbered one.  The files are ordered by topic, so interleaving
gives two halves with the same mix.  ``train`` is what analyses and fine-tuning may use;
``test`` is held out for evaluation (AdvBench harmful rate, benign answer rate).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

DATA_DIR = Path(__file__).parent / "datasets"

DATASETS = {
    "advbench": "advbench_harmful_behaviors.txt",
    "over_rejection": "over_rejection.txt",
    "benign": "benign_instructions.txt",
}
PARTS = ("all", "train", "test")


class DataError(ValueError):
    """A prompt file that is missing, empty, duplicated or not plain text."""


def dataset_path(name_or_path: str | Path) -> Path:
    """A shipped set's file by name (see ``DATASETS``), or any path given as is."""
    if str(name_or_path) in DATASETS:
        return DATA_DIR / DATASETS[str(name_or_path)]
    return Path(name_or_path)


def validate_prompts(rows: list[str], source: str = "prompts") -> list[str]:
    """Check a list of prompts: non-empty, all non-blank text, no control characters, unique."""
    if not rows:
        raise DataError(f"{source}: empty prompt set")
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, str):
            raise DataError(f"{source}: row {i} is {type(row).__name__}, not text")
        if not row.strip():
            raise DataError(f"{source}: row {i} is blank")
        if any(ord(c) < 32 and c != "\t" for c in row) or "\x7f" in row:
            raise DataError(f"{source}: row {i} holds control characters (binary data?)")
        if row in seen:
            raise DataError(f"{source}: row {i} duplicates row {seen[row]}: {row[:60]!r}")
        seen[row] = i
    return rows


def load_prompts(name_or_path: str | Path, part: str = "all") -> list[str]:
    """Load and validate a prompt set, optionally one deterministic half of it."""
    path = dataset_path(name_or_path)
    if not path.is_file():
        known = ", ".join(DATASETS)
        raise DataError(f"no prompt file at {path} (shipped sets: {known})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix.lower() == ".csv":  # one quoted column, as the paper's files are
        rows = [r[0] if len(r) == 1 else ",".join(r) for r in csv.reader(io.StringIO(text))]
    else:
        rows = [line.rstrip("\r") for line in text.split("\n")]
        if rows and rows[-1] == "":
            rows.pop()  # the trailing newline
    validate_prompts(rows, str(path))
    return split(rows, part)


def split(rows: list[str], part: str = "all") -> list[str]:
    """``all``; ``train`` = rows 0, 2, 4, ...; ``test`` = rows 1, 3, 5, ..."""
    if part not in PARTS:
        raise DataError(f"unknown split {part!r}; choose one of {', '.join(PARTS)}")
    if part == "all":
        return list(rows)
    return rows[0::2] if part == "train" else rows[1::2]


def prompts_hash(rows: list[str]) -> str:
    """A short content hash of a prompt list, recorded with every result."""
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]


def evenly_spaced(rows: list, n: int | None) -> list:
    """``n`` rows spread evenly over ``rows`` (first row included), in their order; all of them
    when ``n`` is None or at least ``len(rows)``.  Sets grouped by kind (D_o is grouped by verb)
    are then sampled across their groups, not from the first group only."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise ValueError(f"need at least 1 row, got {n}")
    return [rows[i * len(rows) // n] for i in range(n)]
