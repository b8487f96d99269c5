"""Step time and memory of SPPFT versus full fine-tuning, through ``finetune.train``.

    python -m benchmarks.sppft [--model embedded-base] [--layers START,END] [--steps 6] [--batch-size 8]

The paper argues SPPFT is cheaper: frozen weights need no optimizer state and (when autograd
skips them) no weight gradients.  Three variants run on the same batches, in one process:

- ``full``: every weight trains;
- ``sppft``: the range frozen by gradient hooks (``finetune.masks``) and left out of AdamW:
  no optimizer state for it, but autograd still computes (then zeroes) its weight gradients;
- ``sppft-skip``: the same plus ``requires_grad=False`` on the frozen weights
  (``TrainConfig.skip_frozen_grads``, what the paper's code does): no weight gradients either.

Measured per variant: the median wall time of an optimizer step (forward, backward, step),
leaving out the first step of each run, over ``--rounds`` interleaved rounds (full, sppft,
sppft-skip, full, ...) so that a change in machine load hits every variant alike; the bytes held in ``.grad`` tensors just before the optimizer step; the bytes of
AdamW's state after it; on CUDA, ``torch.cuda.max_memory_allocated``.  Printed as ratios to
``full`` measured in the same run.  Weights differ between variants after training (each
trains the model further); that does not change the cost of a step.  The default model is
``embedded-base`` (the aligned ``embedded`` has the same shapes, so the same costs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finetune import data as D
from finetune.masks import resolve_range
from finetune.train import TrainConfig, train
from interp.data import load_prompts
from interp.models import load_model


def timing_callback():
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Step times, gradient bytes (before the optimizer step) and optimizer-state bytes."""

        def __init__(self):
            self.times, self.grad_bytes, self.state_bytes, self._t = [], 0, 0, None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            self.state_bytes = sum(
                t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
            )

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    return Meter()


def examples(model, n: int, answer_words: int):
    """``n`` benign instructions with a fixed filler answer (no generation needed)."""
    answer = " ".join(["This is a plain answer sentence used to time training."] * max(1, answer_words // 10))
    pairs = [(q, answer) for q in load_prompts("benign", "train")[:n]]
    return D.normal_set(pairs, model.tokenizer, model.template)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-base")
    parser.add_argument("--layers", default=None, help="the frozen range (START,END or a located-range JSON; default: "
                                                        "the range shipped with the aligned embedded model, same shapes)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants (less drift from load)")
    parser.add_argument("--answer-words", type=int, default=60)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model, device=args.device)
    if args.layers is None:
        from interp.export import shipped_located

        args.layers = shipped_located().range
    frozen = resolve_range(args.layers, model)
    rows = examples(model, args.batch_size * args.steps, args.answer_words)
    n_tokens = sum(len(r) for r in D.tokenize(rows, model.tokenizer)["input_ids"]) / len(rows)
    variants = {
        "full": ("full", {}),
        "sppft": ("sppft", {}),
        "sppft-skip": ("sppft", {"skip_frozen_grads": True}),
    }
    print(f"{args.model} on {model.device}: {model.n_layers} layers, frozen {frozen} ({len(frozen)} layers), "
          f"batch {args.batch_size} x ~{n_tokens:.0f} tokens, {args.steps} steps, {torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, (mode, extra) in variants.items():
                meter = timing_callback()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, progress=False, save_strategy="no",
                                     logging_steps=10**6, **extra)
                train(model, rows, mode, layers=frozen, out_dir=Path(tmp) / f"{name}-{round_}", config=config, callbacks=[meter])
                times[name] += meter.times[1:] or meter.times
                results[name] = {
                    "grad_MB": meter.grad_bytes / 2**20,
                    "adam_MB": meter.state_bytes / 2**20,
                    "cuda_peak_MB": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                }
    for name in variants:
        results[name]["step_s"] = statistics.median(times[name])
        results[name]["steps_timed"] = len(times[name])
    base = results["full"]
    print(f"{'variant':<11} {'step s':>7} {'x full':>7} {'grads MB':>9} {'x full':>7} {'AdamW MB':>9} {'x full':>7}"
          + ("  cuda peak MB  x full" if base["cuda_peak_MB"] else ""))
    for name, r in results.items():
        line = (f"{name:<11} {r['step_s']:7.3f} {r['step_s'] / base['step_s']:7.2f} {r['grad_MB']:9.1f} "
                f"{r['grad_MB'] / base['grad_MB']:7.2f} {r['adam_MB']:9.1f} {r['adam_MB'] / base['adam_MB']:7.2f}")
        if base["cuda_peak_MB"]:
            line += f"  {r['cuda_peak_MB']:12.1f} {r['cuda_peak_MB'] / base['cuda_peak_MB']:7.2f}"
        print(line)
    return results


if __name__ == "__main__":
    main()
