"""What every command-line analysis shares: the model options, one meaning of ``--limit``, and
one way to fail.

- ``add_model_options(parser)``: ``--model``, ``--template``, ``--device``, ``--dtype``, with
  choices taken from the library's own constants (``interp.templates.TEMPLATES``,
  ``interp.models.DTYPES``);
- ``add_limit_options(parser)``: ``--limit N`` always means "N rows of each set" and
  ``--sample first|spread`` says which (``interp.data.sample_rows``);
- ``main_guard(run)``: a CLI's ``main`` checks its arguments *before* loading a model, and any
  ``UsageError`` or other toolkit error (``interp.errors.SafetyLayersError``: bad layer range,
  empty or missing data set, missing model, prompt longer than the context...) or malformed JSON
  ends as ``error: ...`` on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

from interp.data import SAMPLES
from interp.errors import SafetyLayersError
from interp.models import DTYPES, load_model
from interp.templates import TEMPLATES


class UsageError(SafetyLayersError, ValueError):
    """A bad command-line argument found after parsing (e.g. a file that does not exist)."""


KNOWN_ERRORS: tuple[type[BaseException], ...] = (SafetyLayersError, json.JSONDecodeError, FileNotFoundError)
"""What ends as ``error: ...`` (exit 2): every toolkit error, plus a malformed JSON file and a
missing file named on the command line."""


def parser_for(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_options(parser: argparse.ArgumentParser, default_model: str = "embedded", dtype: bool = True) -> None:
    parser.add_argument("--model", default=default_model,
                        help="embedded, embedded-base, a local HF folder, a .gguf file or a cached hub id")
    parser.add_argument("--template", default="chat", choices=TEMPLATES[:2], help="prompt template")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if there is one)")
    if dtype:
        parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                            help="weights dtype (default float32; bfloat16 halves memory)")


def add_limit_options(parser: argparse.ArgumentParser, what: str = "of each set") -> None:
    parser.add_argument("--limit", type=positive_int, default=None, help=f"use N rows {what}")
    parser.add_argument("--sample", default="spread", choices=SAMPLES,
                        help="with --limit: the first N rows, or N rows spread evenly over the set (default)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_slug(spec: str) -> str:
    """A file-name-safe short name for a model spec (a path's last part)."""
    name = Path(str(spec).rstrip("/")).name or str(spec)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def model_from(args, spec: str | None = None, **kwargs):
    """``load_model`` with the parsed ``--model/--template/--device/--dtype``."""
    return load_model(spec or args.model, device=args.device, dtype=getattr(args, "dtype", None),
                      template=args.template, **kwargs)


def main_guard(fn):
    """Wrap a CLI's ``main(argv)`` so bad input ends as ``error: ...`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except KNOWN_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
