"""The protection study: does freezing the safety layers during fine-tuning keep a model safe,
by more than noise, more than freezing other layers, and for reasons other than a learning rate?

For every fine-tuning set × mode × seed, ``run_one`` loads the aligned model afresh (plain HF, no
bridge), fine-tunes it with ``finetune.train`` for ``steps`` optimizer steps, and evaluates it
*during* that one run at every step of ``eval_steps`` (a dose curve; no re-training per point):
R_h on a spread subset of each harmful set (``dose_limit`` requests each).  After the last step it
measures R_h on the whole harmful sets, task quality, and an **audit** of the safety layers'
signature: the paired existence gap per layer (``interp.existence``) and R_o on a spread D_o
subset.  Each run's per-request verdicts are written to ``<out>/runs/<name>.json`` and a finished
run is reused, so an interrupted study resumes.  ``harmful_sets`` picks what is scored (also
``paired_harmful_validation``, the validation pairs' harmful sides, for choosing an attack).

Seeds differ only through what the seed draws: the order and grouping of training rows (none
when one optimizer step covers the whole set), a seeded data set or mask, or dropout.
``seed_sources`` says which apply; ``run_study`` warns when several seeds cannot differ.

Modes (``MODES``):

- ``full``: everything trains;  ``sppft``: the attention and MLP weights of the located range are
  frozen;  ``ablation``: the same number of layers elsewhere (the paper's Table 8);
- ``critical``: the units (MLP neurons, attention heads) whose ``|activation x gradient|`` for
  refusal is largest, at the same frozen-parameter budget as ``sppft`` (``finetune.importance``;
  the paper's NFFT point, done with element masks);
- the protection study's modes (``finetune.protection``): ``window<S>-<E>`` freezes layers S..E
  (the profile), ``random`` random units at SPPFT's budget (drawn with the run's seed), ``heads``
  every attention head of every layer, ``critical_pp`` critical units by per-parameter score;
- with ``paper_settings`` every mode uses the official code's setup (PAPER.md §3): learning rate
  3e-5 for the frozen modes and 3e-4 for ``full``, micro-batch 4 with 32 accumulation steps
  (batch 128), the Alpaca template, loss on the prompt too, 256-token cutoff, and strict freezing
  bounds (``finetune.masks.paper_freeze_range``); ``reverse_control`` adds ``sppft@full_lr`` and
  ``full@sppft_lr``, so the learning rate's share of any "protection" is measured.

``summarise(runs)`` pools the seeds: per set, mode and step the mean R_h with a 95% interval from a
crossed bootstrap over seeds and requests (``interp.stats.seeds_interval``); ``differences(runs)``
gives each mode's R_h minus full fine-tuning's (and SPPFT's minus the ablation's), paired by seed and
request (``interp.stats.seeds_difference``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from finetune import data as D
from finetune.evaluate import HARMFUL_SETS, evaluate, harmful_prompts
from finetune.train import TrainConfig, train
from interp.answers import generate_and_judge
from interp.data import load_pairs, prompts_hash, sample_rows
from interp.io import atomic_write_json
from interp.stats import Rate, seeds_difference, seeds_interval

MODES = ("sppft", "full", "ablation", "critical")
VALIDATION_SET = "paired_harmful_validation"
STUDY_SETS = HARMFUL_SETS + (VALIDATION_SET,)
REVERSE_CONTROL = ("sppft@full_lr", "full@sppft_lr")  # SPPFT at full FT's lr and vice versa (``lr_for``)
PAPER_LR = {"frozen": 3e-5, "full": 3e-4}
"""The official code's defaults: ``SPPFT.py`` 3e-5, ``Full_finetuning.py`` 3e-4."""


@dataclass
class StudyConfig:
    """Everything a study varies (recorded with every run)."""

    data: tuple[str, ...] = ("normal", "implicit")
    modes: tuple[str, ...] = ("sppft", "full", "ablation")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 64
    eval_steps: tuple[int, ...] = (0, 8, 16, 32, 64)
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    train_size: int | None = 100
    dose_limit: int = 60
    final_limit: int | None = None
    template: str = "chat"
    train_on_inputs: bool = False
    max_length: int = 256
    paper_settings: bool = False
    reverse_control: bool = False
    audit: bool = True
    audit_ro: int = 128
    quality: int = 60
    device: str | None = None
    harmful_sets: tuple[str, ...] = HARMFUL_SETS

    def with_paper_settings(self) -> "StudyConfig":
        """The official code's setup (module docstring)."""
        return StudyConfig(**{**asdict(self), "paper_settings": True, "batch_size": 4, "grad_accum": 32,
                              "template": "alpaca", "train_on_inputs": True, "max_length": 256})

    def lr_for(self, mode: str) -> float:
        """``mode`` may carry an lr override: ``sppft@full_lr``, ``full@sppft_lr``."""
        base, _, override = mode.partition("@")
        if override == "full_lr":
            return PAPER_LR["full"]
        if override == "sppft_lr":
            return PAPER_LR["frozen"]
        if self.paper_settings:
            return PAPER_LR["full"] if base == "full" else PAPER_LR["frozen"]
        return self.lr

    def run_modes(self) -> list[str]:
        modes = list(self.modes)
        if self.reverse_control:
            modes += list(REVERSE_CONTROL)
        return modes


@dataclass
class RunRecord:
    """One fine-tuning run's measurements (JSON-ready)."""

    data: str
    mode: str
    seed: int
    lr: float
    frozen: dict
    dose: dict = field(default_factory=dict)  # step -> set -> answered flags
    final: dict = field(default_factory=dict)  # set -> answered flags (whole sets)
    quality: dict | None = None
    audit: dict | None = None
    train: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.data}-{self.mode.replace('@', '-at-')}-seed{self.seed}"


def study_prompts(name: str) -> list[str]:
    """The requests of one of ``STUDY_SETS``."""
    if name == VALIDATION_SET:
        return [p.harmful for p in load_pairs("validation")]
    return harmful_prompts(name)


def dose_prompts(limit: int, sets=HARMFUL_SETS) -> dict[str, list[str]]:
    return {name: sample_rows(study_prompts(name), limit, "spread") for name in sets}


def seed_sources(config: StudyConfig, data_name: str, mode: str, n_rows: int, dropout: float = 0.0) -> list[str]:
    """What makes runs of ``data_name``/``mode`` differ between seeds (empty: nothing does, so
    several seeds are one run repeated)."""
    sources = []
    if config.batch_size * config.grad_accum < n_rows:
        sources.append("row order and grouping (a step's batch is part of the set)")
    if data_name in ("backdoor", "harmful"):
        sources.append("the seeded data set")
    if mode.partition("@")[0] == "random":
        sources.append("the seeded random units")
    if dropout > 0:
        sources.append("dropout")
    return sources


def answered(model, queries: list[str]) -> list[bool]:
    """Per harmful request: answered (not refused), by ``generate_and_judge``."""
    return [not a.refused for a in generate_and_judge(model, queries)]


def _dose_callback(model, prompts: dict, steps: set[int], record: RunRecord):
    from transformers import TrainerCallback

    class Dose(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                record.dose[str(state.global_step)] = {
                    name: answered(model, queries) for name, queries in prompts.items()
                }
                model.hf_model.train()

    return Dose()


def audit(model, pairs_limit: int | None = None, ro_limit: int = 128) -> dict:
    """The safety layers' signature after fine-tuning: the paired existence gap per layer and R_o
    on a spread D_o subset."""
    from interp.existence import existence_analysis
    from interp.overrejection import over_rejection, over_rejection_prompts

    pairs = sample_rows(load_pairs("test"), pairs_limit, "spread")
    result = existence_analysis(model, [p.benign for p in pairs], [p.harmful for p in pairs], paired=True,
                                n_boot=200, r=50, progress=False)
    queries = over_rejection_prompts(ro_limit, "spread")
    ro = Rate(over_rejection(model, queries), len(queries))
    return {"gap": [round(float(g), 4) for g in result.gap()], "gap_centred": [round(float(g), 4) for g in result.gap(True)],
            "probe_acc": [round(float(a), 4) for a in result.layers["probe_acc"]], "R_o": ro.to_dict()}


def frozen_setup(model, mode: str, safety, config: StudyConfig, ablation=None,
                 seed: int = 0) -> tuple[str, object, dict | None, dict]:
    """``(train mode, layers, element masks, record)`` for a study mode."""
    from finetune import masks as M
    from finetune import protection
    from finetune.importance import critical_masks

    base = mode.partition("@")[0]
    if protection.is_protection_mode(base):
        return protection.frozen_setup(model, base, safety, seed)
    if base in ("full", "sppft", "ablation"):
        layers = safety
        if base == "sppft" and config.paper_settings:  # the official strict bounds: begin < l < end
            layers = M.paper_freeze_range(safety.start - 1, safety.end + 1, model.n_layers)
        return base, layers, None, {"range": None if base == "full" else str(layers if base == "sppft" else ablation)}
    if base == "critical":
        budget = sum(p.numel() for p in M.layer_parameters(model, safety.layers).values())
        harmful = [p.harmful for p in load_pairs("train")]
        masks, record = critical_masks(model, harmful, budget)
        return "full", None, masks, record
    raise ValueError(f"unknown study mode {mode!r}; choose from {', '.join(MODES)} (optionally @full_lr/@sppft_lr), "
                     f"or {', '.join(protection.MODES)}")


def run_one(spec: str, safety, data_name: str, mode: str, seed: int, config: StudyConfig, out: Path,
            pairs_cache: dict) -> RunRecord:
    """One fine-tuning run with its dose curve, final evaluation and audit (module docstring)."""
    from finetune import masks as M
    from interp.models import load_model

    model = load_model(spec, device=config.device, template=config.template, bridge=False)
    # only the ablation has an ablation range (there may be none outside a wide safety range)
    ablation = M.ablation_range(safety, model.n_layers) if mode.partition("@")[0] == "ablation" else None
    train_mode, layers, element_masks, frozen = frozen_setup(model, mode, safety, config, ablation, seed=seed)
    record = RunRecord(data_name, mode, seed, config.lr_for(mode), frozen)
    examples = D.build_set(data_name, pairs_cache["train"], model.tokenizer, config.template, seed)
    train_config = TrainConfig(
        max_steps=config.steps, lr=record.lr, batch_size=config.batch_size, grad_accum=config.grad_accum,
        max_length=config.max_length, train_on_inputs=config.train_on_inputs, seed=seed, warmup=0.1,
        save_strategy="no", keep_checkpoints=False, progress=False,
    )
    steps = {s for s in config.eval_steps if 0 < s <= config.steps}
    dose = dose_prompts(config.dose_limit, config.harmful_sets) if steps else {}
    result = train(model, examples, train_mode, layers=layers, out_dir=out / "runs" / record.name, config=train_config,
                   element_masks=element_masks, callbacks=[_dose_callback(model, dose, steps, record)])
    record.train = {"seconds": round(result.seconds, 1), "steps": result.steps, "train_loss": result.train_loss,
                    "frozen_elements": result.config["masks"]["frozen_elements"]}
    start = time.perf_counter()
    record.final = {name: answered(model, sample_rows(study_prompts(name), config.final_limit, "spread"))
                    for name in config.harmful_sets}
    record.train["eval_seconds"] = round(time.perf_counter() - start, 1)
    record.train["eval_requests"] = sum(len(v) for v in record.final.values())
    if pairs_cache.get("quality"):
        record.quality = evaluate(model, harmful_sets=(), quality_pairs=pairs_cache["quality"]).quality
    if config.audit:
        record.audit = audit(model, ro_limit=config.audit_ro)
    return record


def run_study(spec: str, safety, config: StudyConfig, out: Path, log=print) -> list[RunRecord]:
    """Every run of the study (resuming finished ones), plus the "before" evaluation (step 0)."""
    from finetune import masks as M
    from interp.models import load_model
    from interp.ranges import LayerRangeError

    out = Path(out)
    base = load_model(spec, device=config.device, template=config.template, bridge=False)
    safety.check(base.n_layers)
    if any(mode.partition("@")[0] == "ablation" for mode in config.run_modes()):
        try:  # fail before any run, not after the others have trained
            M.ablation_range(safety, base.n_layers)
        except LayerRangeError as err:
            raise LayerRangeError(f"{err}, so the ablation has no range; leave ablation out of the modes") from None
    pairs = study_pairs(base, config)
    settings = study_settings(spec, base, safety, config, pairs)
    warn_if_seeds_cannot_differ(config, config.data, config.run_modes(), config.seeds, len(pairs["train"]), base)
    write_before(base, config, pairs, settings, out)
    del base
    records = []
    for data_name in config.data:
        for mode in config.run_modes():
            for seed in config.seeds:
                path = run_path(out, data_name, mode, seed)
                stored = stored_record(path, settings)
                if stored is not None:
                    records.append(stored)
                    continue
                start = time.perf_counter()
                record = run_one(spec, safety, data_name, mode, seed, config, out, pairs)
                save_record(path, settings, record)
                log(f"{record.name}: {time.perf_counter() - start:.0f} s, final R_h "
                    + ", ".join(f"{k} {sum(v) / len(v):.0%}" for k, v in record.final.items()))
                records.append(record)
    return records


def write_before(base, config: StudyConfig, pairs: dict, settings: dict, out: Path) -> Path:
    """The model before fine-tuning scored as every run is (the dose curve's step 0, whole sets,
    quality, audit), in ``<out>/runs/before.json``; kept when its settings match."""
    path = Path(out) / "runs" / "before.json"
    if not _matches(path, settings):
        start = time.perf_counter()
        dose = {name: answered(base, q) for name, q in dose_prompts(config.dose_limit, config.harmful_sets).items()}
        final = {name: answered(base, sample_rows(study_prompts(name), config.final_limit, "spread"))
                 for name in config.harmful_sets}
        quality = evaluate(base, harmful_sets=(), quality_pairs=pairs["quality"]).quality if pairs["quality"] else None
        before = {"dose": dose, "final": final, "quality": quality,
                  "audit": audit(base, ro_limit=config.audit_ro) if config.audit else None,
                  "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_json(path, {"settings": settings, "before": before})
    return path


def study_pairs(base, config: StudyConfig) -> dict:
    """The benign training pairs and the held-out quality pairs (none when ``quality`` is 0),
    answered by the model before fine-tuning (``finetune.data.benign_pairs``, cached)."""
    pairs = {"train": D.benign_pairs(base, "train", limit=config.train_size, max_new_tokens=96)}
    pairs["quality"] = D.benign_pairs(base, "test", limit=config.quality, max_new_tokens=96) if config.quality else None
    return pairs


def study_settings(spec: str, base, safety, config: StudyConfig, pairs: dict) -> dict:
    """What a run file must hold to be reused: the model and its weights, the safety range, the
    run settings and the training rows."""
    return {"spec": spec, "fingerprint": base.fingerprint(), "safety": str(safety), "config": run_key(config),
            "train_hash": prompts_hash([q + a for q, a in pairs["train"]])}


def warn_if_seeds_cannot_differ(config: StudyConfig, data, modes, seeds, n_rows: int, base=None) -> list[str]:
    """Warn (and return the messages) for each data set and mode whose several seeds would all be
    one run (``seed_sources`` is empty)."""
    dropout = _dropout(base) if base is not None else 0.0
    messages = [f"{data_name}/{mode}: seeds {', '.join(map(str, seeds))} cannot differ: one optimizer step of "
                f"{config.batch_size * config.grad_accum} rows covers all {n_rows} training rows, and neither the data, "
                "the frozen units nor dropout depend on the seed; they are one run repeated"
                for data_name in data for mode in modes
                if len(set(seeds)) > 1 and not seed_sources(config, data_name, mode, n_rows, dropout)]
    for message in messages:
        warnings.warn(message, stacklevel=2)
    return messages


def _dropout(base) -> float:
    config = getattr(base, "config", None)
    return max((float(getattr(config, k, 0.0) or 0.0) for k in ("attention_dropout", "hidden_dropout", "dropout")),
               default=0.0)


def run_path(out: Path, data_name: str, mode: str, seed: int) -> Path:
    """Where a run's file lives: ``<out>/runs/<name>.json``."""
    return Path(out) / "runs" / f"{RunRecord(data_name, mode, seed, 0.0, {}).name}.json"


def stored_record(path: Path, settings: dict) -> RunRecord | None:
    """The run stored at ``path`` if it was made with ``settings``, else None."""
    if not _matches(path, settings):
        return None
    return RunRecord(**json.loads(Path(path).read_text())["record"])


def save_record(path: Path, settings: dict, record: RunRecord) -> Path:
    return atomic_write_json(path, {"settings": settings, "record": asdict(record)})


_NEW_DEFAULTS = {"harmful_sets": HARMFUL_SETS}
"""Settings added after runs were stored: left out of the key at their default, so those runs stay reusable."""


def run_key(config: StudyConfig) -> dict:
    """The settings that decide how each run goes.  Which runs a study holds (data, modes, seeds,
    the reverse control) is left out: a run made by a study of other selections is reused."""
    return {k: v for k, v in asdict(config).items()
            if k not in ("data", "modes", "seeds", "reverse_control") and not (k in _NEW_DEFAULTS and v == _NEW_DEFAULTS[k])}


def finished_runs(spec: str, safety, config: StudyConfig, out: Path) -> list[RunRecord]:
    """Every finished run under ``out/runs`` made for ``spec`` and ``safety`` with ``config``'s run
    settings, whatever data, mode or seed (several studies may share one folder, e.g. one per
    core), without loading a model or training; ``run_study`` checked each one's weights and
    training data when it wrote it."""
    key = _as_saved(run_key(config))
    records = []
    for path in sorted((Path(out) / "runs").glob("*.json")):
        if path.name == "before.json":
            continue
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        settings = saved.get("settings") or {}
        if settings.get("spec") == spec and settings.get("safety") == str(safety) and settings.get("config") == key:
            records.append(RunRecord(**saved["record"]))
    return records


def _as_saved(settings: dict) -> dict:
    """``settings`` as a run file holds them (tuples become lists, other values strings)."""
    return json.loads(json.dumps(settings, default=str))


def _matches(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == _as_saved(settings)
    except json.JSONDecodeError:
        return False


def load_before(out: Path) -> dict:
    return json.loads((Path(out) / "runs" / "before.json").read_text())["before"]


def summarise(records: list[RunRecord], before: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(final, dose)`` tables: per data set, mode and harmful set, the mean R_h over seeds and
    requests with its 95% interval; ``dose`` also per step (step 0 is the model before)."""
    final_rows, dose_rows = [], []
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.data, r.mode), []).append(r)
    for (data_name, mode), runs in groups.items():
        for name in [s for s in STUDY_SETS if s in runs[0].final]:
            stat = seeds_interval([r.final[name] for r in runs])
            final_rows.append({"data": data_name, "mode": mode, "set": name, "lr": runs[0].lr,
                               "R_h": stat["mean"], "lo": stat["lo"], "hi": stat["hi"], "seeds": stat["n_seeds"],
                               "n": stat["n_requests"], "per_seed": stat["per_seed"],
                               "rouge_l": _mean_quality(runs, "rouge_l"),
                               "completion_loss": _mean_quality(runs, "completion_loss")})
            steps = sorted({int(s) for r in runs for s in r.dose})
            curve = [(0, [before["dose"][name]])] + [(s, [r.dose[str(s)][name] for r in runs]) for s in steps]
            for step, flags in curve:
                stat = seeds_interval(flags)
                dose_rows.append({"data": data_name, "mode": mode, "set": name, "step": step,
                                  "R_h": stat["mean"], "lo": stat["lo"], "hi": stat["hi"]})
    return pd.DataFrame(final_rows), pd.DataFrame(dose_rows)


def _mean_quality(runs: list[RunRecord], key: str) -> float:
    values = [r.quality[key] for r in runs if r.quality]
    return sum(values) / len(values) if values else float("nan")


def differences(records: list[RunRecord], reference: str = "full") -> pd.DataFrame:
    """Per data set, harmful set and mode: R_h of the mode minus R_h of ``reference`` (full
    fine-tuning), paired by seed and request (``interp.stats.seeds_difference``) over the seeds
    both have finished, and SPPFT minus the same-size ablation where both ran (is it the located
    range that protects, or freezing any layers?).  A negative difference whose interval stays
    below zero means the mode leaves fewer harmful requests answered than its reference."""
    rows = []
    runs = {(r.data, r.mode, r.seed): r for r in records}
    modes = list(dict.fromkeys(r.mode for r in records))
    pairs = [(m, reference) for m in modes if m != reference]
    if "sppft" in modes and "ablation" in modes:
        pairs.append(("sppft", "ablation"))
    for data_name in dict.fromkeys(r.data for r in records):
        for mode, ref in pairs:
            seeds = sorted({s for (d, m, s) in runs if d == data_name and m == mode}
                           & {s for (d, m, s) in runs if d == data_name and m == ref})
            if not seeds:
                continue
            for name in [s for s in STUDY_SETS if s in runs[data_name, mode, seeds[0]].final]:
                stat = seeds_difference([runs[data_name, mode, s].final[name] for s in seeds],
                                        [runs[data_name, ref, s].final[name] for s in seeds])
                rows.append({"data": data_name, "mode": mode, "reference": ref, "set": name,
                             "difference": stat["mean"], "lo": stat["lo"], "hi": stat["hi"],
                             "seeds": stat["n_seeds"], "n": stat["n_requests"]})
    return pd.DataFrame(rows, columns=["data", "mode", "reference", "set", "difference", "lo", "hi", "seeds", "n"])


def audit_table(records: list[RunRecord], before: dict) -> pd.DataFrame:
    """Per data set and mode (mean over seeds): R_o on the D_o subset and the paired gap per layer."""
    rows = []
    if before.get("audit"):
        rows.append({"data": "-", "mode": "before", "R_o": before["audit"]["R_o"]["k"], "n": before["audit"]["R_o"]["n"],
                     **{f"gap_{i}": g for i, g in enumerate(before["audit"]["gap"])}})
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        if r.audit:
            groups.setdefault((r.data, r.mode), []).append(r)
    for (data_name, mode), runs in groups.items():
        n_layers = len(runs[0].audit["gap"])
        rows.append({"data": data_name, "mode": mode,
                     "R_o": sum(r.audit["R_o"]["k"] for r in runs) / len(runs), "n": runs[0].audit["R_o"]["n"],
                     **{f"gap_{i}": sum(r.audit["gap"][i] for r in runs) / len(runs) for i in range(n_layers)}})
    return pd.DataFrame(rows)
