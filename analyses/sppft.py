"""SPPFT versus full fine-tuning versus the frozen-other-layers ablation (Li et al., §4, Table 2
and Table 8), on the same data and seed.

    python -m analyses.sppft --model embedded --layers results/locate/located.json \\
        --data normal,implicit [--epochs 1] [--limit N] [--out results/sppft]

For each fine-tuning set in ``--data`` (``normal`` D_N, ``implicit`` D_I, ``backdoor`` D_B,
``harmful`` D_H with ``--harmful FILE.jsonl --p 0.1``) and each mode (``sppft``: the located
range frozen; ``full``; ``ablation``: a disjoint range of the same size frozen, ``--ablation-layers``
or the first layers of the model), the model is loaded afresh (``--reuse-model`` instead restores
a copy of the original weights and checks the fingerprint), fine-tuned with ``finetune.train``
and evaluated with ``finetune.evaluate``: R_h on the held-out AdvBench half, R_o on the
over-rejection set (``--skip-ro`` to leave out), and task quality (ROUGE-L F1 and the mean
answer loss) on held-out benign instructions against reference answers (by default the
original model's own greedy answers, so ROUGE-L is 1 before fine-tuning by construction and
measures how much the general answers changed; ``--quality-answers FILE.jsonl`` for real
references).  The original model is evaluated once ("before").

Training answers: the model's own greedy answers to ``load_prompts("benign", "train")``
(cached), or ``--answers FILE.jsonl``.  ``--limit N`` takes the first N rows of the training
pairs (unless ``--train-size``) and of every evaluation set.

Writes under ``--out``: ``results.json`` (settings, ranges, data records, every metric),
``results.csv`` (one row per data set × mode, plus "before"), ``sppft.png`` (R_h bars), and one
run folder per data set × mode (``finetune.train``'s config/log/metrics plus ``eval.json`` and
``harmful_responses.csv``).  Prints the paper's Table 2 columns.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from finetune import data as D
from finetune import evaluate as E
from finetune import masks as M
from finetune.train import MODES, TrainConfig, mask_range, train, versions
from interp.io import atomic_savefig, atomic_write_csv, atomic_write_json
from interp.models import load_model

MODE_LABELS = {"sppft": "SPPFT", "full": "FullFT", "ablation": "Ablation"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    parser.add_argument("--layers", default="results/locate/located.json",
                        help="the located safety range: a JSON from interp.export, or START,END")
    parser.add_argument("--ablation-layers", default=None, help="START,END of the ablation range (default: same size, first layers)")
    parser.add_argument("--data", default="normal,implicit", help=f"comma-separated sets from {', '.join(D.SETS)}")
    parser.add_argument("--modes", default="sppft,full,ablation", help=f"comma-separated modes from {', '.join(MODES)}")
    parser.add_argument("--answers", type=Path, help='JSONL of {"instruction","output"} training pairs (default: self-generated)')
    parser.add_argument("--quality-answers", type=Path, help="JSONL of held-out reference pairs for task quality")
    parser.add_argument("--harmful", type=Path, help="JSONL of harmful pairs for the D_H set (none ship)")
    parser.add_argument("--p", type=float, default=0.1, help="harmful fraction for D_H")
    parser.add_argument("--trigger", default=D.BACKDOOR_TRIGGER)
    parser.add_argument("--train-size", type=int, default=None, help="first N training pairs (default: all 200, or --limit)")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of the training pairs and of each evaluation set")
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--train-on-inputs", action="store_true", help="loss on the prompt too (the paper's code)")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--skip-frozen-grads", action="store_true",
                        help="also set requires_grad=False on frozen weights (saves their gradients; needed under FSDP/DeepSpeed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ro", action="store_true", help="do not measure R_o")
    parser.add_argument("--reuse-model", action="store_true", help="restore the original weights instead of reloading")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("results/sppft"))
    args = parser.parse_args(argv)
    args.data = [d.strip() for d in args.data.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in args.data:
        if name not in D.SETS:
            parser.error(f"unknown data set {name!r}; choose from {', '.join(D.SETS)}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if "harmful" in args.data and args.harmful is None:
        parser.error("--data harmful needs --harmful FILE.jsonl of harmful pairs (none ship with the project)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


# ---------------------------------------------------------------- model handling


class Models:
    """Hands out the original model for each run: a fresh load, or the first load with its
    original weights copied back (verified by fingerprint)."""

    def __init__(self, spec: str, template: str, device: str | None, reuse: bool):
        self.spec, self.template, self.device, self.reuse = spec, template, device, reuse
        self.model = load_model(spec, device=device, template=template)
        self.fingerprint = self.model.fingerprint()
        self.original = {n: p.detach().clone() for n, p in M.named_parameters(self.model).items()} if reuse else None
        self.used = False

    def fresh(self):
        if not self.used:
            self.used = True
            return self.model
        if not self.reuse:
            self.model = load_model(self.spec, device=self.device, template=self.template)
        else:
            with torch.no_grad():
                for name, param in M.named_parameters(self.model).items():
                    param.copy_(self.original[name])
        if self.model.fingerprint() != self.fingerprint:
            raise RuntimeError("the reloaded model's weights differ from the original's")
        return self.model


# ---------------------------------------------------------------- steps


def evaluate_model(model, args, quality_pairs) -> dict:
    return E.evaluate(model, limit=args.limit, quality_pairs=quality_pairs, skip_over_rejection=args.skip_ro)


def save_eval(run_dir: Path, result: dict) -> dict:
    """Write eval.json and harmful_responses.csv; return the result without the responses."""
    responses = result.pop("harmful_responses")
    atomic_write_csv(run_dir / "harmful_responses.csv", pd.DataFrame(responses, columns=["query", "response", "refused"]))
    atomic_write_json(run_dir / "eval.json", result)
    return result


def results_table(rows: list[dict]) -> pd.DataFrame:
    """The paper's Table 2 columns, one line per data set: R_h before / SPPFT / FullFT /
    ablation (%), ROUGE-L and training time per mode."""
    frame = pd.DataFrame(rows)
    before = frame[frame["mode"] == "before"].iloc[0]
    lines = []
    for data, group in frame[frame["mode"] != "before"].groupby("data", sort=False):
        line = {"data": data, "R_h before %": round(100 * before["R_h"], 2)}
        by_mode = {r["mode"]: r for _, r in group.iterrows()}
        for mode, label in MODE_LABELS.items():
            if mode in by_mode:
                line[f"R_h {label} %"] = round(100 * by_mode[mode]["R_h"], 2)
        if "R_o" in before:
            line["R_o before"] = int(before["R_o"])
            for mode, label in MODE_LABELS.items():
                if mode in by_mode:
                    line[f"R_o {label}"] = int(by_mode[mode]["R_o"])
        if "rouge_l" in before:
            line["ROUGE-L before"] = round(before["rouge_l"], 3)
            for mode, label in MODE_LABELS.items():
                if mode in by_mode:
                    line[f"ROUGE-L {label}"] = round(by_mode[mode]["rouge_l"], 3)
        for mode, label in MODE_LABELS.items():
            if mode in by_mode:
                line[f"train s {label}"] = round(by_mode[mode]["train_seconds"], 1)
        lines.append(line)
    return pd.DataFrame(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows)
    before = frame[frame["mode"] == "before"].iloc[0]
    datas = list(dict.fromkeys(frame[frame["mode"] != "before"]["data"]))
    labels = ["before"] + [MODE_LABELS[m] for m in MODE_LABELS if m in set(frame["mode"])]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datas), 3.6))
    for k, label in enumerate(labels):
        values = []
        for data in datas:
            if label == "before":
                values.append(100 * before["R_h"])
            else:
                mode = next(m for m, lab in MODE_LABELS.items() if lab == label)
                match = frame[(frame["data"] == data) & (frame["mode"] == mode)]
                values.append(100 * match["R_h"].iloc[0] if len(match) else float("nan"))
        ax.bar([i + (k - (len(labels) - 1) / 2) * width for i in range(len(datas))], values, width, label=label)
    ax.set_xticks(range(len(datas)), datas)
    ax.set_ylabel("R_h: harmful requests answered (%)")
    ax.set_title(f"Fine-tuning attacks on {before['model']}: held-out AdvBench (n={int(before['n_harmful'])})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(path, fig)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def run(args) -> dict:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    models = Models(args.model, args.template, args.device, args.reuse_model)
    model = models.model
    safety = M.resolve_range(args.layers, model)
    ablation = mask_range(model, "ablation", safety, args.ablation_layers) if "ablation" in args.modes else None
    train_size = args.train_size or args.limit
    pairs = D.benign_pairs(model, "train", limit=train_size, answers_jsonl=args.answers, max_new_tokens=args.answer_tokens)
    quality_pairs = D.benign_pairs(model, "test", limit=args.limit, answers_jsonl=args.quality_answers, max_new_tokens=args.answer_tokens)
    harmful_pairs = D.load_pairs_jsonl(args.harmful) if args.harmful else None

    config = TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        weight_decay=args.weight_decay, train_on_inputs=args.train_on_inputs, lora=args.lora, seed=args.seed,
        skip_frozen_grads=args.skip_frozen_grads,
        save_strategy="epoch" if args.keep_checkpoints else "no",
    )
    print(f"model {args.model} ({model.n_layers} layers), safety range {safety}, ablation range {ablation}; "
          f"{len(pairs)} training pairs, {len(quality_pairs)} quality pairs")

    before = save_eval(args.out / "before", evaluate_model(model, args, quality_pairs))
    rows = [{"data": "-", "mode": "before", "model": args.model, **before}]
    records = {}
    for data_name in args.data:
        examples = D.build_set(data_name, pairs, model.tokenizer, args.template, args.seed, harmful_pairs, args.p, args.trigger)
        records[data_name] = D.describe(examples, data_name, args.template, args.seed, p=args.p if data_name == "harmful" else None)
        for mode in args.modes:
            model = models.fresh()
            run_dir = args.out / f"{data_name}-{mode}"
            print(f"--- {data_name} / {MODE_LABELS[mode]}")
            result = train(
                model, examples, mode, layers=safety, ablation_layers=ablation, out_dir=run_dir, config=config,
                record=records[data_name],
            )
            after = save_eval(run_dir, evaluate_model(model, args, quality_pairs))
            rows.append({
                "data": data_name, "mode": mode, "model": args.model, "range": result.layer_range, **after,
                "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                "steps": result.steps, "train_loss": result.train_loss,
            })

    table = results_table(rows)
    summary = {
        "model": args.model,
        "fingerprint": models.fingerprint,
        "template": args.template,
        "safety_range": [safety.start, safety.end],
        "ablation_range": [ablation.start, ablation.end] if ablation else None,
        "layers_arg": str(args.layers),
        "training_pairs": len(pairs),
        "answers": str(args.answers) if args.answers else f"self-generated, {args.answer_tokens} tokens",
        "quality_references": str(args.quality_answers) if args.quality_answers else "the original model's greedy answers",
        "limit": args.limit,
        "data": records,
        "train_config": vars(config),
        "fresh_load_per_run": not args.reuse_model,
        "rows": rows,
        "table": table.to_dict(orient="records"),
        "seconds_total": round(time.perf_counter() - start, 1),
        "versions": versions(),
    }
    atomic_write_json(args.out / "results.json", summary)
    atomic_write_csv(args.out / "results.csv", pd.DataFrame(rows))
    plot(rows, args.out / "sppft.png")
    return summary


def main(argv=None) -> dict:
    import sys

    from interp.data import DataError
    from interp.models import ModelLoadError, ModelNotFoundError
    from interp.ranges import LayerRangeError

    args = parse_args(argv)
    try:
        summary = run(args)
    except (LayerRangeError, DataError, ModelNotFoundError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(pd.DataFrame(summary["table"]).to_string(index=False))
    print(f"written to {args.out} in {summary['seconds_total']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
