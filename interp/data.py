"""Prompt sets shipped with the package, and a loader that validates them.

Every set is a plain UTF-8 text file under ``interp/datasets/``, one prompt a line, no header
(a ``.csv`` path given by the user is read as one CSV column, e.g. the paper's files).
``interp/datasets/SOURCES.md`` names the source and licence of each.

Splits are deterministic and documented: ``train`` is every even-numbered row (0, 2, 4, ...)
of a file, ``test`` every odd-numbered one.  The files are ordered by topic, so interleaving
gives two halves with the same mix.  ``train`` is what analyses and fine-tuning may use;
``test`` is held out for evaluation (AdvBench harmful rate, benign answer rate).

Three structured sets are CSV files with their own loaders:

- ``load_pairs(part)``: harmful/benign requests written in the same sentence frame (400 pairs,
  10 harm categories x 40, 8 frames x 5 per category), split *by pair*: within each category,
  pair ``k`` is ``train`` when ``k % 10 < 5``, ``validation`` when ``k % 10`` is 5 or 6, ``test``
  otherwise (200 / 80 / 120 pairs); ``load_pairs(part, extra=True)`` appends 240 train-only
  supplementary pairs (``paired_prompts_extra.csv``: 10 categories x 24, 16 frames, a third short);
  ``questions=True`` appends 90 question-frame pairs (``paired_questions.csv``: "Where can I ...?",
  "Why should ...?" and four more, 10 categories x 9, ids ``<category>-qNN``): ``qNN`` with
  ``NN % 3 == 2`` is ``validation`` (30), the rest ``train`` (60); ``test`` never changes;
  ``hard=True`` appends 200 train-only "hard benign twin" pairs (``paired_prompts_hard.csv``: 10
  categories x 20 in the 8 frames, ids ``<category>-hNN``) whose benign side keeps the harmful
  side's alarming vocabulary in a plainly legitimate request;
- ``load_borderline(part)``: safe requests with alarming words, in XSTest's ten types but written
  for this project (250; per type, prompt ``k`` is ``validation`` when ``k % 5 == 4``, else
  ``train``: 200 / 50);
- ``load_xstest(label)``: XSTest (Röttger et al., 2024; CC BY 4.0), **evaluation only**: 250 safe
  prompts to answer and 200 unsafe contrasts to refuse.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from interp.errors import SafetyLayersError

DATA_DIR = Path(__file__).parent / "datasets"

DATASETS = {
    "advbench": "advbench_harmful_behaviors.txt",
    "over_rejection": "over_rejection.txt",
    "benign": "benign_instructions.txt",
}
PARTS = ("all", "train", "test")
PAIR_PARTS = ("all", "train", "validation", "test")
PAIRS_FILE = "paired_prompts.csv"
EXTRA_PAIRS_FILE = "paired_prompts_extra.csv"
QUESTION_PAIRS_FILE = "paired_questions.csv"
HARD_PAIRS_FILE = "paired_prompts_hard.csv"
BORDERLINE_FILE = "borderline_safe.csv"
XSTEST_FILE = "xstest_prompts.csv"


class DataError(SafetyLayersError, ValueError):
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


SAMPLES = ("first", "spread")


def sample_rows(rows: list, limit: int | None = None, sample: str = "first") -> list:
    """The one meaning of ``--limit``: ``limit`` rows of ``rows``, the first ones
    (``sample="first"``) or evenly spaced over the set (``"spread"``, ``evenly_spaced``); all rows
    when ``limit`` is None."""
    if sample not in SAMPLES:
        raise DataError(f"unknown sample {sample!r}; choose one of {', '.join(SAMPLES)}")
    if limit is None:
        return list(rows)
    if limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    return evenly_spaced(rows, limit) if sample == "spread" else list(rows)[:limit]


# --- structured sets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A harmful request and a benign one written in the same sentence frame."""

    pair_id: str
    category: str
    frame: str
    harmful: str
    benign: str

    @property
    def extra(self) -> bool:
        """One of the train-only supplementary pairs (ids ``<category>-xNN``)."""
        return self.pair_id.rsplit("-", 1)[1].startswith("x")

    @property
    def question(self) -> bool:
        """One of the question-frame supplementary pairs (ids ``<category>-qNN``)."""
        return self.pair_id.rsplit("-", 1)[1].startswith("q")

    @property
    def hard(self) -> bool:
        """One of the train-only hard-benign-twin pairs (ids ``<category>-hNN``)."""
        return self.pair_id.rsplit("-", 1)[1].startswith("h")

    @property
    def index(self) -> int:
        return int(self.pair_id.rsplit("-", 1)[1].lstrip("xqh"))

    @property
    def part(self) -> str:
        if self.extra or self.hard:
            return "train"
        if self.question:
            return "validation" if self.index % 3 == 2 else "train"
        k = self.index % 10
        return "train" if k < 5 else "validation" if k < 7 else "test"


def _csv_rows(name: str) -> list[dict]:
    path = DATA_DIR / name
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _check_part(part: str, parts: tuple[str, ...]) -> str:
    if part not in parts:
        raise DataError(f"unknown split {part!r}; choose one of {', '.join(parts)}")
    return part


def load_pairs(part: str = "all", extra: bool = False, questions: bool = False, hard: bool = False) -> list[Pair]:
    """The paired set (module docstring), optionally one split; ``extra``: with the train-only
    supplementary pairs appended (they belong to ``train`` and ``all`` only); ``questions``: with
    the question-frame pairs appended (``train`` and ``validation``, never ``test``); ``hard``: with
    the train-only hard-benign-twin pairs appended last."""
    _check_part(part, PAIR_PARTS)
    files = ([PAIRS_FILE] + ([EXTRA_PAIRS_FILE] if extra else []) + ([QUESTION_PAIRS_FILE] if questions else [])
             + ([HARD_PAIRS_FILE] if hard else []))
    pairs = [Pair(r["pair_id"], r["category"], r["frame"], r["harmful"], r["benign"])
             for name in files for r in _csv_rows(name)]
    validate_prompts([p.harmful for p in pairs] + [p.benign for p in pairs], " + ".join(files))
    return [p for p in pairs if part == "all" or p.part == part]


@dataclass(frozen=True)
class Borderline:
    """A safe request with alarming words (``kind`` is one of XSTest's safe types)."""

    id: str
    kind: str
    prompt: str

    @property
    def part(self) -> str:
        return "validation" if int(self.id.rsplit("-", 1)[1]) % 5 == 4 else "train"


def load_borderline(part: str = "all") -> list[Borderline]:
    """The project's borderline-safe requests (module docstring), optionally one split."""
    _check_part(part, ("all", "train", "validation"))
    rows = [Borderline(r["id"], r["type"], r["prompt"]) for r in _csv_rows(BORDERLINE_FILE)]
    validate_prompts([r.prompt for r in rows], BORDERLINE_FILE)
    return [r for r in rows if part == "all" or r.part == part]


@dataclass(frozen=True)
class XSTestPrompt:
    id: int
    prompt: str
    kind: str  # XSTest's type, e.g. "homonyms" or "contrast_homonyms"
    label: str  # "safe" (should be answered) or "unsafe" (should be refused)


def load_xstest(label: str = "all") -> list[XSTestPrompt]:
    """XSTest v2 (450 prompts; evaluation only: never train or tune on it)."""
    _check_part(label, ("all", "safe", "unsafe"))
    rows = [XSTestPrompt(int(r["id"]), r["prompt"], r["type"], r["label"]) for r in _csv_rows(XSTEST_FILE)]
    return [r for r in rows if label == "all" or r.label == label]
