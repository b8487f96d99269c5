"""Safety report: how often a model refuses harmful requests, answers benign ones, and
over-refuses benign requests that contain dangerous words.

    python -m analyses.safety --model embedded --out results/safety [--limit N] [--template chat]
        [--max-new-tokens 32] [--batch-size 16]

Three sets, greedy decoding, refusals judged by ``interp.refusal.is_refusal``:

- ``advbench_test``: the held-out AdvBench half (``load_prompts("advbench", "test")``, 260) —
  the refusal rate (the paper's R_h is one minus it);
- ``benign_test``: the held-out half of the everyday instructions (200) — the answer rate;
- ``over_rejection``: the paper's D_o (all 731 "How to <verb> <object>?" queries) — the count
  refused, the paper's R_o.

Generation stops for each response once its verdict is fixed (``interp.refusal.generate``), so
the CSVs hold responses cut at that point; ``--no-early-stop`` keeps all ``--max-new-tokens``.
Writes ``summary.json`` (model spec and fingerprint, template, settings, set sizes and hashes,
counts, rates, wall times) and ``<set>.csv`` (query, response, refused) under ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from interp.data import evenly_spaced, load_prompts, prompts_hash
from interp.io import atomic_write_csv, atomic_write_json
from interp.refusal import DEFAULT_WINDOW, NOT_REFUSAL_PHRASES, REFUSAL_PHRASES, refusal_table

SETS = (
    ("advbench_test", "advbench", "test"),
    ("benign_test", "benign", "test"),
    ("over_rejection", "over_rejection", "all"),
)


def load_sets(limit: int | None = None) -> dict[str, list[str]]:
    """The three prompt sets, each cut to ``limit`` prompts evenly spaced over the set when
    given (D_o is grouped by verb: its first 40 rows are nearly all "kill"/"murder" queries)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return {name: evenly_spaced(load_prompts(source, part), limit) for name, source, part in SETS}


def safety_report(
    model,
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    template: str | None = None,
    phrases=REFUSAL_PHRASES,
    window: int = DEFAULT_WINDOW,
    exceptions=NOT_REFUSAL_PHRASES,
    stop_when_decided: bool = True,
    progress: bool = True,
) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Run the three sets through ``refusal_table``; return ``(summary, tables)``, where
    ``tables`` maps each set's name to its (query, response, refused) DataFrame and ``summary``
    is JSON-ready."""
    template = template or model.template
    prompt_sets = load_sets(limit)
    tables, sets = {}, {}
    for name, queries in prompt_sets.items():
        start = time.perf_counter()
        table = refusal_table(
            model, queries, phrases=phrases, window=window, exceptions=exceptions,
            max_new_tokens=max_new_tokens, batch_size=batch_size, stop_when_decided=stop_when_decided,
            template=template, progress=progress, desc=name,
        )
        refused = int(table["refused"].sum())
        tables[name] = table
        sets[name] = {
            "n": len(queries),
            "refused": refused,
            "answered": len(queries) - refused,
            "refusal_rate": refused / len(queries),
            "answer_rate": 1 - refused / len(queries),
            "prompts_hash": prompts_hash(queries),
            "seconds": round(time.perf_counter() - start, 2),
        }
    summary = {
        "model": model.spec,
        "fingerprint": model.fingerprint(),
        "template": template,
        "device": str(model.device),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "decoding": "greedy" + (", stopped once the refusal verdict is decided" if stop_when_decided else ""),
        "refusal_rule": {
            "window": window,
            "n_phrases": len(tuple(phrases)),
            "phrases_hash": prompts_hash(list(phrases)),
            "n_exceptions": len(tuple(exceptions)),
            "exceptions_hash": prompts_hash(list(exceptions)),
        },
        "limit": limit,
        "advbench_refusal_rate": sets["advbench_test"]["refusal_rate"],
        "benign_answer_rate": sets["benign_test"]["answer_rate"],
        "over_rejection_refused": sets["over_rejection"]["refused"],
        "sets": sets,
        "seconds": round(sum(s["seconds"] for s in sets.values()), 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    return summary, tables


def write_report(out: str | Path, summary: dict, tables: dict[str, pd.DataFrame]) -> Path:
    """``summary.json`` and one CSV per set, each written atomically."""
    out = Path(out)
    for name, table in tables.items():
        atomic_write_csv(out / f"{name}.csv", table)
    atomic_write_json(out / "summary.json", summary)
    return out


def format_table(summary: dict) -> str:
    lines = [f"{'set':<16}{'n':>6}{'refused':>9}{'rate':>8}{'seconds':>9}"]
    for name, s in summary["sets"].items():
        lines.append(f"{name:<16}{s['n']:>6}{s['refused']:>9}{s['refusal_rate']:>8.1%}{s['seconds']:>9.1f}")
    lines.append(
        f"AdvBench refusal rate {summary['advbench_refusal_rate']:.1%}, benign answer rate "
        f"{summary['benign_answer_rate']:.1%}, over-rejection refused {summary['over_rejection_refused']}"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", default="results/safety")
    parser.add_argument("--limit", type=int, default=None, help="N prompts of each set, evenly spaced over it")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="characters searched for a refusal")
    parser.add_argument("--no-early-stop", action="store_true",
                        help="generate all --max-new-tokens tokens (full responses in the CSVs; slower)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype (default float32; bfloat16 halves memory on a GPU)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")

    from interp.models import dtype_named, load_model

    model = load_model(args.model, device=args.device, dtype=dtype_named(args.dtype), template=args.template)
    summary, tables = safety_report(
        model, limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        window=args.window, stop_when_decided=not args.no_early_stop,
    )
    out = write_report(args.out, summary, tables)
    print(format_table(summary))
    print(f"wrote {out}/summary.json and {', '.join(f'{n}.csv' for n in tables)}")


if __name__ == "__main__":
    main()
