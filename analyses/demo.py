"""The main job (``make demo``): safety report, existence, location and a short SPPFT comparison
on the embedded models, on subsets sized for two CPU cores, then a Markdown report folder.

    python -m analyses.demo [--out results/demo] [--full]

Each step is the same command-line analysis a user would run (``analyses.safety``,
``analyses.existence``, ``analyses.locate``, ``analyses.sppft``), called with the demo's subset
flags; their JSON, CSV and PNG files land in sub-folders of ``--out`` and ``report.md`` links them.
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
    return [
        ("Safety of the embedded models", "analyses.safety",
         ["--model", "embedded", "--out", str(out / "safety")] + ([] if full else ["--limit", "40"])),
        ("Existence: cosine gaps and probes", "analyses.existence",
         ["--model", "embedded", "--compare", "embedded-base", "--out", str(out / "existence")]
         + ([] if full else ["--n", "40"])),
        ("Location: scaling sweeps and the exported range", "analyses.locate",
         ["--model", "embedded", "--init-from", str(out / "existence" / "existence.json"), "--out", str(out / "locate")]
         + ([] if full else ["--limit", "64", "--fast"])),
        ("Protection: SPPFT vs full fine-tuning", "analyses.sppft",
         ["--model", "embedded", "--layers", str(out / "locate" / "located.json"), "--out", str(out / "sppft")]
         + ([] if full else ["--data", "implicit", "--limit", "32", "--skip-ro"])),
    ]


def run_step(module: str, argv: list[str]) -> tuple[bool, float, str]:
    """Run one analysis's ``main(argv)`` in this process; return (ok, seconds, error text)."""
    import importlib

    start = time.time()
    try:
        importlib.import_module(module).main(argv)
        return True, time.time() - start, ""
    except SystemExit as exit_:
        return exit_.code in (0, None), time.time() - start, f"exit {exit_.code}"
    except Exception:  # keep going: the report says what failed
        return False, time.time() - start, traceback.format_exc(limit=3)


def report(out: Path, done: list[dict]) -> Path:
    """``report.md``: each step's status and time, its JSON summary files and its plots."""
    lines = ["# safety-layers demo report", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    for step in done:
        folder = out / step["folder"]
        status = "ok" if step["ok"] else "FAILED"
        lines += [f"## {step['title']}", "", f"`python -m {step['module']} {' '.join(step['argv'])}`: "
                  f"{status} in {step['seconds']:.0f} s", ""]
        if step["error"]:
            lines += ["```", step["error"].strip(), "```", ""]
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
