"""How much faster R_o and the bound search run here than with the paper's method.

    python -m benchmarks.locate [--model embedded-base] [--n 64] [--range 8,14] [--alpha 1.2]
        [--window 2] [--threads 2] [--baseline-n N] [--full-baseline-sweep]

The paper's method (``Safety_layers_locating/scaling.py``): per configuration, a deep copy of
the plain HF model with the projection weights of the range multiplied by α, then greedy
generation of 16 new tokens one prompt at a time.  Here: hooks on the bridge (no copy), the
prompts tokenised once, their shared prefix (the chat template's system turn) run once per
configuration, batched left-padded generation (``interp.overrejection``), and, for the
first-step estimate, the layers below the sweep cached.  Same prompts (the first ``--n``
over-rejection queries), same template, same refusal matcher.

Printed: the time of one R_o evaluation and of a whole sweep (baseline + both bounds, window
``--window``) for each way, the speed ratios, and how far the counts agree (R_o of each way and
the per-prompt verdicts).  ``--baseline-n`` runs the paper's method on the first N prompts only
and scales its time to ``--n`` (its cost is linear in the prompts: one at a time); the paper's
whole sweep is its per-configuration time times the number of configurations unless
``--full-baseline-sweep`` runs it.  Times are wall-clock and CPU seconds of this process: on a
shared machine the wall time swings with others' load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

from interp.locate import estimate_ro, generation_ro, locate, lowest_layer
from interp.overrejection import FirstStepEstimator, over_rejection_prompts, refusal_flags
from interp.ranges import LayerRange
from interp.refusal import end_token_ids, is_refusal
from interp.scaling import ALL_COMPONENTS, scale_weights_, scaled


def paper_method_flags(plain_hf, model, queries, layer_range, alpha, max_new_tokens=16) -> list[bool]:
    """The paper's way: copy, scale weights, generate one prompt at a time."""
    scaled_copy = copy.deepcopy(plain_hf)
    if layer_range is not None:
        scale_weights_(scaled_copy, layer_range, alpha, ALL_COMPONENTS)
    tok = model.tokenizer
    end_ids = end_token_ids(model)
    flags = []
    with torch.no_grad():
        for query in queries:
            enc = model.encode([query])
            out = scaled_copy.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       temperature=None, top_p=None, top_k=None, eos_token_id=end_ids,
                                       pad_token_id=tok.pad_token_id)
            generated = out[0, enc["input_ids"].shape[1]:].tolist()
            cut = next((k for k, t in enumerate(generated) if t in end_ids), len(generated))
            flags.append(is_refusal(tok.decode(generated[:cut], skip_special_tokens=True).strip()))
    del scaled_copy
    return flags


@dataclass
class Took:
    """Wall-clock and CPU seconds (all threads of this process) of one call.  On a shared
    machine the wall time swings with other people's load; the CPU time barely does, so the
    ratios are printed for both."""

    wall: float
    cpu: float

    def __mul__(self, factor: float) -> "Took":
        return Took(self.wall * factor, self.cpu * factor)

    __rmul__ = __mul__

    def ratio(self, other: "Took") -> str:
        return f"{self.wall / other.wall:5.1f}x wall, {self.cpu / other.cpu:5.1f}x cpu"

    def __str__(self) -> str:
        return f"{self.wall:7.1f} s wall ({self.cpu:7.1f} s cpu)"


def timed(fn, *args, **kwargs) -> tuple[object, Took]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, Took(time.perf_counter() - wall, time.process_time() - cpu)


def sweep_configs(initial: LayerRange, n_layers: int, window: int):
    """The configurations a search evaluates if its upper winner is the initial end (for the
    paper's full sweep: the same number of configurations as the real search)."""
    ranges = {LayerRange(initial.start, initial.end + k) for k in range(-window, window + 1)
              if initial.start <= initial.end + k < n_layers}
    ranges |= {LayerRange(initial.start - k, initial.end) for k in range(-window, window + 1)
               if 0 <= initial.start - k <= initial.end}
    return [None, *sorted(ranges)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-base")
    parser.add_argument("--n", type=int, default=64, help="over-rejection prompts (the first N)")
    parser.add_argument("--range", default="8,14", help="range of the single evaluation and the search's start")
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-n", type=int, default=None, help="prompts for the paper's method (default --n)")
    parser.add_argument("--full-baseline-sweep", action="store_true")
    args = parser.parse_args(argv)

    from interp.models import load_hf, load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    queries = over_rejection_prompts(args.n)
    layer_range = LayerRange.parse(args.range)
    model = load_model(args.model, device="cpu")
    layer_range.check(model.n_layers)
    plain, _, _ = load_hf(args.model)
    plain = plain.eval()
    plain.config._attn_implementation = "eager"  # as load_model sets it for the bridged model
    base_n = min(args.baseline_n or args.n, args.n)
    print(f"{args.model}, {args.n} over-rejection prompts, torch threads {torch.get_num_threads()}, "
          f"range {layer_range} x {args.alpha}, 16 new tokens")

    # --- one R_o evaluation
    paper, t_paper = timed(paper_method_flags, plain, model, queries[:base_n], layer_range, args.alpha)
    t_paper_n = t_paper * (args.n / base_n)

    def ours_once():
        with scaled(model, layer_range, args.alpha):
            return refusal_flags(model, queries, batch_size=args.batch_size)

    ours, t_ours = timed(ours_once)
    start = lowest_layer(layer_range, model.n_layers, args.window)
    estimator, t_build = timed(FirstStepEstimator, model, queries, start, batch_size=args.batch_size)
    first, t_est = timed(estimator.estimate, layer_range, args.alpha)
    agree = sum(a == b for a, b in zip(paper, ours[:base_n]))
    extrapolated = f" (measured on {base_n}, scaled to {args.n})" if base_n < args.n else ""
    print("\none R_o evaluation:")
    print(f"  paper method (copy + scale + one prompt at a time): {t_paper_n}{extrapolated}, R_o {sum(paper)}/{base_n}")
    print(f"  hooks + shared prefix + batched generation:         {t_ours}  {t_paper_n.ratio(t_ours)}, "
          f"R_o {sum(ours)}/{args.n} (on the paper's {base_n}: {sum(ours[:base_n])}; "
          f"per-prompt agreement {agree}/{base_n})")
    print(f"  first-step estimate, per configuration:             {t_est}  {t_paper_n.ratio(t_est)}, "
          f"summed mass {first.expected:.2f}, argmax count {first.count} (+ {t_build.wall:.1f} s once to cache "
          f"layers < {start}); per-prompt agreement with generation "
          f"{int((first.argmax_opens == torch.tensor(ours)).sum())}/{args.n}")

    # --- a whole sweep
    configs = sweep_configs(layer_range, model.n_layers, args.window)
    if args.full_baseline_sweep:
        def paper_sweep():
            return {c: sum(paper_method_flags(plain, model, queries[:base_n], c, args.alpha)) for c in configs}

        paper_counts, t_paper_sweep = timed(paper_sweep)
        t_paper_sweep = t_paper_sweep * (args.n / base_n)
        how = "measured" + extrapolated
    else:
        paper_counts, t_paper_sweep = None, t_paper_n * len(configs)
        how = f"{len(configs)} configurations x the single evaluation"
    gen = generation_ro(model, queries, batch_size=args.batch_size)
    result, t_sweep = timed(locate, gen, layer_range, args.alpha, model.n_layers, window=args.window)

    def fast_sweep():
        est = FirstStepEstimator(model, queries, start, batch_size=args.batch_size)
        return locate(estimate_ro(est), layer_range, args.alpha, model.n_layers, window=args.window,
                      confirm=generation_ro(model, queries, batch_size=args.batch_size), keep=2)

    fast, t_fast = timed(fast_sweep)
    print(f"\nwhole sweep (baseline + upper + lower, window {args.window}, "
          f"{len(result.rows) - 1} scaled configurations):")
    print(f"  paper method: {t_paper_sweep} ({how})")
    print(f"  generation:   {t_sweep}  {t_paper_sweep.ratio(t_sweep)}, located {result.range}")
    print(f"  fast (first-step estimate, best 2 per sweep confirmed): {t_fast}  "
          f"{t_paper_sweep.ratio(t_fast)}, located {fast.range}")
    print(result.table())
    print(fast.table())
    if paper_counts is not None and base_n == args.n:
        ours_counts = {r.range: r.r_o for r in result.rows}
        same = [c for c in configs if c in ours_counts and ours_counts[c] == paper_counts[c]]
        print(f"  R_o equal in {len(same)}/{sum(c in ours_counts for c in configs)} shared configurations")


if __name__ == "__main__":
    main()
