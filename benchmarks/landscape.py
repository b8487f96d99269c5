"""The R_o landscape: this project's shared walk against two baselines over the same ranges, with
verdicts compared, and the full pass extrapolated.

    python -m benchmarks.landscape [--model embedded] [--n 32] [--starts 13,24] [--ends-per-start 8]
        [--alpha 1.2] [--threads 1] [--baseline-every 3] [--batch-size 64]

Three ways to measure R_o of the ranges ``[i, i .. i+E-1]`` for each start ``i`` (same spread
D_o queries, greedy 16 new tokens, the same judge):

- **this project** (``interp.landscape.LandscapeEvaluator``): one unscaled pass records every
  start's states; each start's ranges are walked by end, each prefill resuming where the
  previous range's stopped (module docstring of ``interp.landscape``);
- **per-start RoEvaluator**: the project's search evaluator built once per start (layers below
  the start shared, prefix shared, early stop, plain twin), every range's prefill from its start;
- **batched baseline**: what a competent user writes: a weight-scaled copy of the plain HF model
  and left-padded batched ``generate`` per range (``benchmarks.locate.generate_flags``), timed
  on every ``--baseline-every``-th range; the copy's time is left out.

The ratio the issue asks for is the batched baseline's seconds per range over this project's.
The last lines extrapolate the full location (465 ranges x 128 queries, then 10 ranges x 731)
from this run's seconds per range and query, for one process and for two processes on two
cores (each taking half the starts; an ideal split, stated as such).  Times are wall-clock and
CPU seconds of this process, printed, never asserted.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.locate import Took, generate_flags, scaled_copy, timed
from interp.landscape import LandscapeEvaluator
from interp.overrejection import RoEvaluator, over_rejection_prompts
from interp.ranges import LayerRange

FULL_RANGES, COARSE_N, TOP, CONFIRM_N = 465, 128, 10, 731


def walked(evaluator, start, alpha, last):
    return [(r, result.flags.tolist()) for r, result in evaluator.walk(start, alpha, last=last)]


def compare(model, plain, queries, plan, alpha, batch_size, every):
    """Per start, one after another (so a change in the machine's load hits all three alike):
    this project's walk, a per-start ``RoEvaluator``, and the batched baseline on every
    ``every``-th range.  Returns the times and the verdicts of each."""
    times = {"ours": Took(0.0, 0.0), "per_start": Took(0.0, 0.0), "baseline": Took(0.0, 0.0)}
    flags = {"ours": {}, "per_start": {}, "baseline": {}}
    evaluator, took = timed(LandscapeEvaluator, model, queries, batch_size=batch_size, keep_starts=list(plan))
    result, took2 = timed(evaluator.unscaled)
    times["ours"] += took + took2
    flags["ours"][None] = result.flags.tolist()
    k = 0
    for start, last in plan.items():
        walk, took = timed(walked, evaluator, start, alpha, last)
        times["ours"] += took
        flags["ours"].update(walk)
        per, took = timed(RoEvaluator, model, queries, start=start, batch_size=batch_size)
        times["per_start"] += took
        if None not in flags["per_start"]:
            result, took = timed(per.evaluate, None)
            times["per_start"] += took
            flags["per_start"][None] = result.flags.tolist()
        for end in range(start, last + 1):
            layer_range = LayerRange(start, end)
            result, took = timed(per.evaluate, layer_range, alpha)
            times["per_start"] += took
            flags["per_start"][layer_range] = result.flags.tolist()
            if k % every == 0:
                copy_ = scaled_copy(plain, layer_range, alpha)  # the copy's time is left out
                flags["baseline"][layer_range], took = timed(generate_flags, copy_, model, queries, batch_size)
                times["baseline"] += took
                del copy_
            k += 1
    return times, flags


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=32, help="over-rejection queries (spread over D_o)")
    parser.add_argument("--starts", default="13,24")
    parser.add_argument("--ends-per-start", type=int, default=8, help="ranges walked per start (fewer at the top)")
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-every", type=int, default=3, help="time the batched baseline on every k-th range")
    args = parser.parse_args(argv)

    from interp.models import load_hf, load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    queries = over_rejection_prompts(args.n, "spread")
    model = load_model(args.model, device="cpu")
    plan = {int(s): min(model.n_layers - 1, int(s) + args.ends_per_start - 1) for s in args.starts.split(",")}
    ranges = [LayerRange(s, e) for s, last in plan.items() for e in range(s, last + 1)]
    print(f"{args.model}, {args.n} spread D_o queries, alpha {args.alpha}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}; ranges {', '.join(str(r) for r in ranges)} ({len(ranges)}) and the unscaled model")

    plain, _, _ = load_hf(args.model)
    plain = plain.eval()
    plain.config._attn_implementation = "eager"  # as load_model sets it for the bridged model
    times, flags = compare(model, plain, queries, plan, args.alpha, args.batch_size, args.baseline_every)
    n, n_base = len(ranges) + 1, len(flags["baseline"])
    per_ours, per_start, per_base = times["ours"] * (1 / n), times["per_start"] * (1 / n), \
        times["baseline"] * (1 / n_base)
    print(f"\nseconds per configuration ({n} configurations: {len(ranges)} ranges and the unscaled model):")
    print(f"  this project (shared walk):                {per_ours}")
    print(f"  per-start RoEvaluator:                     {per_start}  {per_start.ratio(per_ours)}")
    print(f"  batched baseline (scaled copy + generate): {per_base}  {per_base.ratio(per_ours)}  "
          f"(on {n_base} of the ranges; copy time excluded)")
    same = sum(flags["ours"][r] == flags["per_start"][r] for r in flags["ours"])
    agree = sum(flags["baseline"][r] == flags["ours"][r] for r in flags["baseline"])
    print(f"  verdicts: this project == per-start RoEvaluator in {same}/{n} configurations, == batched baseline in "
          f"{agree}/{n_base}")
    print("  R_o: " + ", ".join(f"{'unscaled' if r is None else r} {sum(f)}" for r, f in flags["ours"].items()))

    work = FULL_RANGES * COARSE_N + TOP * CONFIRM_N
    print(f"\nextrapolated full location ({FULL_RANGES} ranges x {COARSE_N} + {TOP} x {CONFIRM_N} queries = {work} "
          f"range-queries), as two one-thread processes on two cores (an ideal split of the starts):")
    for what, took in (("wall", per_ours.wall), ("cpu", per_ours.cpu)):
        per_query = took / args.n
        base = per_query * per_base.wall / per_ours.wall if what == "wall" else per_query * per_base.cpu / per_ours.cpu
        print(f"  from this run's {what} time, {per_query * 1000:.1f} ms per range-query: {per_query * work / 120:.0f} "
              f"min (the batched baseline: {base * work / 120:.0f} min)")


if __name__ == "__main__":
    main()
