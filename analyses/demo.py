"""The main job (``make demo``): the judge's accuracy, safety reports, existence, location, causal
localisation and a short SPPFT comparison on the embedded models, on subsets sized for two CPU cores, then a Markdown report folder.

    python -m analyses.demo [--out results/demo] [--full]

Each step is the same command-line analysis a user would run (``analyses.judge``,
``analyses.safety``, ``analyses.existence``, ``analyses.locate``, ``analyses.causal``,
``analyses.sppft``), called with the demo's subset flags; their JSON, CSV and PNG files land in sub-folders of ``--out`` and ``report.md`` links them.
A step that fails is recorded in the report and the others still run.  ``--full`` drops the
subsets (hours on two cores).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from interp.io import atomic_write_text


def steps(out: Path, full: bool) -> list[tuple[str, str, list[str]]]:
    """``(title, module, argv)`` of each step, in data-flow order."""
    subset = (lambda *flags: []) if full else (lambda *flags: list(flags))
    return [
        ("Refusal judge: accuracy on the labelled test half", "analyses.judge", ["--no-lomo", "--out", str(out / "judge")]),
        ("Safety of the aligned model", "analyses.safety",
         ["--model", "embedded", "--out", str(out / "safety")] + subset("--limit", "40")),
        ("Safety of the base model", "analyses.safety",
         ["--model", "embedded-base", "--out", str(out / "safety-base")] + subset("--limit", "40")),
        ("Existence: cosine gaps and probes, unpaired and paired", "analyses.existence",
         ["--model", "embedded", "--compare", "embedded-base", "--pairs", "--pairs-part", "validation",
          "--out", str(out / "existence")] + subset("--n-boot", "300")),
        ("Location: scaling sweeps and the exported range", "analyses.locate",
         ["--model", "embedded", "--init-from", str(out / "existence" / "existence.json"), "--all-bands",
          "--window", "3", "--extend", "--out", str(out / "locate")] + subset("--limit", "128")),
        ("Causal localisation: patching, refusal direction, the three views", "analyses.causal",
         ["--model", "embedded", "--located", str(out / "locate" / "located.json"),
          "--existence", str(out / "existence" / "existence.json"), "--out", str(out / "causal")] + subset("--limit", "32", "--gen-pairs", "8", "--train-limit", "64", "--val-limit", "32")),
        ("Protection: SPPFT vs full fine-tuning", "analyses.sppft",
         ["--model", "embedded", "--layers", str(out / "locate" / "located.json"), "--out", str(out / "sppft")]
         + subset("--data", "implicit", "--seeds", "0", "--steps", "8", "--eval-steps", "0,4,8", "--train-size", "32",
                  "--dose-limit", "16", "--final-limit", "40", "--quality", "16", "--no-audit")),
    ]


class _ErrorLines:
    """A stderr that passes everything through and keeps the ``error: ...`` lines an analysis
    prints before exiting 2, so the report can say why a step failed."""

    def __init__(self, stream):
        self.stream, self.lines = stream, []

    def write(self, text):
        self.lines += [line for line in text.splitlines() if line.startswith("error: ")]
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_step(module: str, argv: list[str]) -> tuple[bool, float, str]:
    """Run one analysis's ``main(argv)`` in this process; return (ok, seconds, error text)."""
    import contextlib
    import importlib
    import sys

    start = time.time()
    errors = _ErrorLines(sys.stderr)
    try:
        with contextlib.redirect_stderr(errors):
            importlib.import_module(module).main(argv)
        return True, time.time() - start, ""
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return True, time.time() - start, ""
        return False, time.time() - start, "\n".join(errors.lines + [f"exit {exit_.code}"])
    except Exception:  # keep going: the report says what failed
        return False, time.time() - start, traceback.format_exc(limit=3)


def markdown_table(rows: list[dict]) -> list[str]:
    """Rows of equal keys as Markdown table lines."""
    if not rows:
        return []
    keys = list(rows[0])
    return ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)] + [
        "| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows
    ]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_summary(module: str, folder: Path) -> list[str]:
    """The numbers a step printed, read back from the files it wrote (so the report cannot
    disagree with the analysis)."""
    if module == "analyses.judge" and (record := _read(folder / "judge.json")):
        rows = [{"judge": name, "binary accuracy": f"{s['binary_accuracy']:.1%}",
                 "3-class accuracy": f"{s['three_class_accuracy']:.1%}"} for name, s in record["judges"].items()]
        return [f"{record['n']} labelled responses ({record['split']} half):", ""] + markdown_table(rows)
    if module == "analyses.safety" and (summary := _read(folder / "summary.json")):
        rows = [{"set": name, "goal": v["goal"], "n": v["n"], "refused": v["refused"],
                 "refused rate (95% CI)": f"{v['refused_rate']:.1%} ({v['refused_lo']:.0%}-{v['refused_hi']:.0%})"}
                for name, v in summary["sets"].items()]
        return [f"Model `{summary['model']}` (fingerprint {summary['fingerprint']}), judge "
                f"{summary['settings']['judge']['judge']}:", ""] + markdown_table(rows)
    if module == "analyses.existence" and (result := _read(folder / "existence.json")):
        lines = [f"- `{m['model']}` (unpaired): suggested initial range {m['suggested_range']['range'] or 'none'}"
                 for m in result["models"]]
        paired = result.get("paired") or {}
        for m in paired.get("models", []):
            lines.append(f"- `{m['model']}` (paired): suggested initial range {m['suggested_range']['range'] or 'none'}")
        if paired.get("comparison"):
            lines.append(f"- paired gap, aligned minus base: bands {paired['comparison']['bands']}")
        return lines
    if module == "analyses.locate" and (located := _read(folder / "located.json")):
        def number(value):
            return "–" if value is None else f"{value:.1f}" if value % 1 else f"{value:g}"

        sweeps = [{"phase": s["phase"], "range": f"[{s['start']},{s['end']}]", "R_o": number(s["r_o"]),
                   "bound": number(s["estimate"]), "winner": "*" if s["winner"] else ""} for s in located["sweeps"]]
        head = (f"**Located range [{located['range']['start']},{located['range']['end']}]** at alpha "
                f"{located['alpha']} from the initial [{located['initial_range']['start']},{located['initial_range']['end']}]; "
                f"baseline R_o {located['baseline_r_o']:g} of {located['metric']['n_prompts']} queries ({located['metric']['method']}).")
        lines = [head, ""]
        if (folder / "starts.csv").is_file():  # a search from several starts: which one won
            import csv

            with open(folder / "starts.csv", newline="") as handle:
                starts = list(csv.DictReader(handle))
            lines += ["Searches from each start (the range with the highest R_o is kept; the sweeps below are "
                      "the chosen start's):", ""] + markdown_table(starts) + [""]
        return lines + markdown_table(sweeps)
    if module == "analyses.causal" and (record := _read(folder / "causal.json")):
        return [record.get("statement", "")]
    if module == "analyses.sppft" and (results := _read(folder / "results.json")):
        rows = [{"data": r["data"], "mode": r["mode"], "set": r["set"],
                 "R_h (95% CI)": f"{r['R_h']:.0%} ({r['lo']:.0%}-{r['hi']:.0%})", "ROUGE-L": f"{r['rouge_l']:.3f}"}
                for r in results["final"]]
        lines = [f"Safety range {results['safety_range']}:", ""] + markdown_table(rows)
        diffs = [{"data": d["data"], "mode": f"{d['mode']} minus {d['reference']}", "set": d["set"],
                  "R_h difference (95% CI)": f"{100 * d['difference']:+.1f} points ({100 * d['lo']:+.1f} to "
                                             f"{100 * d['hi']:+.1f})"}
                 for d in results.get("differences", [])]
        if diffs:
            lines += ["", "Paired by seed and request (`differences.csv`):", ""] + markdown_table(diffs)
        return lines
    return []


def report(out: Path, done: list[dict]) -> Path:
    """``report.md``: each step's status, time and key numbers, its plots and its JSON files."""
    lines = ["# safety-layers demo report", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    for step in done:
        folder = out / step["folder"]
        status = "ok" if step["ok"] else "FAILED"
        lines += [f"## {step['title']}", "", f"`python -m {step['module']} {' '.join(step['argv'])}`: "
                  f"{status} in {step['seconds']:.0f} s", ""]
        if step["error"]:
            lines += ["```", step["error"].strip(), "```", ""]
        if step["ok"]:  # a failed step's folder may hold an earlier run's files: show none of them
            lines += step_summary(step["module"], folder) + [""]
            for png in sorted(folder.glob("*.png")):
                lines += [f"![{png.stem}]({png.relative_to(out)})", ""]
            for js in sorted(folder.glob("*.json")):
                lines += [f"- [{js.name}]({js.relative_to(out)})"]
            lines += [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    parser.add_argument("--full", action="store_true", help="no subsets (hours on two cores)")
    args = parser.parse_args(argv)
    start, done = time.time(), []
    for title, module, step_argv in steps(args.out, args.full):
        print(f"\n=== {title}: python -m {module} {' '.join(step_argv)}", flush=True)
        ok, seconds, error = run_step(module, step_argv)
        done.append({"title": title, "module": module, "argv": step_argv, "ok": ok, "seconds": seconds,
                     "error": error, "folder": step_argv[step_argv.index("--out") + 1].split("/")[-1]})
        report(args.out, done)
    path = report(args.out, done)
    atomic_write_text(args.out / "steps.json", json.dumps(done, indent=2))
    print(f"\nreport: {path.resolve()}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
