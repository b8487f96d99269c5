"""How a model behaves on requests it should refuse and requests it should answer.

``safety_report(model)`` generates greedy answers (``interp.generation``, 32 new tokens, no early
stop, so the three classes can be told apart) to every set of ``SAFETY_SETS`` and judges them
(``interp.judge``: compliance / full refusal / partial refusal; *refused* = not compliance):

| set | should be | source |
| --- | --- | --- |
| ``advbench_test`` | refused | the held-out AdvBench half (260) |
| ``paired_harmful_test`` | refused | the harmful side of the test pairs (120) |
| ``xstest_unsafe`` | refused | XSTest's 200 unsafe contrast prompts |
| ``benign_test`` | answered | the held-out everyday instructions (200) |
| ``paired_benign_test`` | answered | the benign side of the test pairs (120) |
| ``xstest_safe`` | answered | XSTest's 250 safe prompts |
| ``over_rejection`` | (counted) | the paper's D_o (731): R_o |

Every rate comes with its 95% Wilson interval; XSTest is also broken down by prompt type.
``SafetyReport`` holds the per-response table and the summary (``to_frame``/``to_dict``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from interp.answers import generate_and_judge
from interp.data import load_pairs, load_prompts, load_xstest, prompts_hash, sample_rows
from interp.judge import DEFAULT_JUDGE, LABELS
from interp.models import LoadedModel
from interp.stats import Rate

SAFETY_SETS: dict[str, str] = {
    "advbench_test": "refuse",
    "paired_harmful_test": "refuse",
    "xstest_unsafe": "refuse",
    "benign_test": "answer",
    "paired_benign_test": "answer",
    "xstest_safe": "answer",
    "over_rejection": "count",
}


def safety_prompts(name: str) -> tuple[list[str], list[str] | None]:
    """A set's prompts and, for XSTest, each prompt's type."""
    if name == "advbench_test":
        return load_prompts("advbench", "test"), None
    if name == "benign_test":
        return load_prompts("benign", "test"), None
    if name == "over_rejection":
        return load_prompts("over_rejection"), None
    if name in ("paired_harmful_test", "paired_benign_test"):
        pairs = load_pairs("test")
        return [p.harmful if name == "paired_harmful_test" else p.benign for p in pairs], [p.category for p in pairs]
    if name in ("xstest_safe", "xstest_unsafe"):
        rows = load_xstest("safe" if name == "xstest_safe" else "unsafe")
        return [r.prompt for r in rows], [r.kind for r in rows]
    raise ValueError(f"unknown safety set {name!r}; choose from {', '.join(SAFETY_SETS)}")


@dataclass
class SafetyReport:
    """Judged responses of one model (``responses``: one row per prompt) and their summary."""

    model: str
    fingerprint: str
    template: str
    settings: dict
    responses: pd.DataFrame
    seconds: dict = field(default_factory=dict)

    def rate(self, name: str) -> Rate:
        """Refused prompts of a set (for an ``answer`` set, the answer rate is 1 minus it)."""
        rows = self.responses[self.responses["set"] == name]
        return Rate(int(rows["refused"].sum()), len(rows))

    def to_frame(self) -> pd.DataFrame:
        """One row per set: n, counts per class, refused with its interval, and the rate that
        matters for the set (refused for harmful sets, answered for benign ones)."""
        rows = []
        for name, goal in SAFETY_SETS.items():
            sub = self.responses[self.responses["set"] == name]
            if sub.empty:
                continue
            refused = self.rate(name)
            lo, hi = refused.interval
            row = {"set": name, "goal": goal, "n": len(sub), **{c: int((sub["label"] == c).sum()) for c in LABELS},
                   "refused": refused.k, "refused_rate": refused.rate, "refused_lo": lo, "refused_hi": hi}
            row["answered_rate"] = 1 - refused.rate
            rows.append(row)
        return pd.DataFrame(rows)

    def by_type(self, name: str) -> pd.DataFrame:
        """Refused counts per prompt type of a set (XSTest types, pair categories)."""
        sub = self.responses[self.responses["set"] == name]
        return (sub.groupby("type", sort=False)["refused"].agg(["sum", "count"])
                .rename(columns={"sum": "refused", "count": "n"}).reset_index())

    def rejudged(self, judge=DEFAULT_JUDGE) -> "SafetyReport":
        """The same responses judged again (a changed judge needs no new generation)."""
        responses = self.responses.copy()
        responses["label"] = [judge.classify(str(t)) for t in responses["response"]]
        responses["refused"] = responses["label"] != "compliance"
        return SafetyReport(self.model, self.fingerprint, self.template, {**self.settings, "judge": judge.describe()},
                            responses, self.seconds)

    @classmethod
    def read(cls, folder) -> "SafetyReport":
        """A report written by ``analyses.safety`` (``summary.json`` and ``responses.csv``)."""
        import json
        from pathlib import Path

        folder = Path(folder)
        summary = json.loads((folder / "summary.json").read_text())
        responses = pd.read_csv(folder / "responses.csv", keep_default_na=False)
        responses["refused"] = responses["refused"].astype(str) == "True"
        return cls(summary["model"], summary["fingerprint"], summary["template"], summary["settings"], responses,
                   summary.get("seconds", {}))

    def to_dict(self) -> dict:
        frame = self.to_frame()
        return {
            "model": self.model, "fingerprint": self.fingerprint, "template": self.template,
            "settings": self.settings, "seconds": self.seconds,
            "sets": {row["set"]: {k: v for k, v in row.items() if k != "set"} for row in frame.to_dict("records")},
            "by_type": {name: self.by_type(name).to_dict("records")
                        for name in ("xstest_safe", "xstest_unsafe") if name in set(self.responses["set"])},
        }


def safety_report(model: LoadedModel, sets=tuple(SAFETY_SETS), limit: int | None = None, sample: str = "spread",
                  max_new_tokens: int = 32, batch_size: int = 64, judge=DEFAULT_JUDGE,
                  progress: bool = True) -> SafetyReport:
    """Generate and judge every set of ``sets`` (module docstring); ``limit``/``sample`` take a
    subset of each (``interp.data.sample_rows``)."""
    tables, seconds = [], {}
    settings = {"max_new_tokens": max_new_tokens, "decoding": "greedy", "limit": limit, "sample": sample,
                "judge": judge.describe(), "prompts_hash": {}}
    for name in sets:
        prompts, types = safety_prompts(name)
        index = sample_rows(list(range(len(prompts))), limit, sample)
        prompts = [prompts[i] for i in index]
        types = [types[i] for i in index] if types else [""] * len(prompts)
        start = time.perf_counter()
        answers = generate_and_judge(model, prompts, judge=judge, max_new_tokens=max_new_tokens, early_stop=False,
                                     batch_size=batch_size, progress=progress, desc=name)
        seconds[name] = round(time.perf_counter() - start, 1)
        tables.append(pd.DataFrame({"set": name, "type": types, "prompt": prompts,
                                    "response": [a.text for a in answers], "label": [a.label for a in answers],
                                    "refused": [a.refused for a in answers]}))
        settings["prompts_hash"][name] = prompts_hash(prompts)
    return SafetyReport(str(model.spec), model.fingerprint(), model.template, settings,
                        pd.concat(tables, ignore_index=True), seconds)
