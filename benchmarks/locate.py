"""R_o and the bound search: this project against the paper's method and a competent batched
baseline, in one run, with verdict agreement and where the time goes.

    python -m benchmarks.locate [--model embedded] [--n 64] [--range START,END] [--alpha 1.2]
        [--upper-offsets=-3,3 --lower-offsets=-2,2] [--threads 2] [--paper-n 16] [--fingerprint]

Three ways to measure R_o for one configuration (same prompts, template, greedy 16 new tokens,
the same judge):

- **paper**: the official ``scaling.py``: a deep copy of the plain HF model with the range's
  projection weights multiplied by α, then ``generate`` one prompt at a time (measured on
  ``--paper-n`` prompts and scaled linearly to ``--n``, as labelled);
- **batched baseline**: what a competent user writes in ten lines: a weight-scaled copy of the
  *plain, unbridged* HF model and left-padded batched ``generate`` (batch ``--batch-size``);
  the copy's time is reported apart and left out of the ratio;
- **this project**: ``interp.overrejection.RoEvaluator`` on the bridged model (layers below the
  sweep computed once through the bridge, shared prefix, then prefill and decode on the plain
  twin with torch scaling hooks and grouped eager attention, early stop with dropped rows).

Then a whole search (the upper and lower sweeps of ``interp.locate``): the baseline generating
every configuration, this project's exact ``generation`` search, and its default ``prune`` search
(first-step bound), with the ranges each finds.  A profile of one evaluation says where the time
goes (prefix and prefill, decode steps, the LM head, hooks, the judge and other Python).
``--fingerprint`` also times the weights' fingerprint on a random ~1.1B-parameter bfloat16 state
dict: on the device against a baseline that copies every tensor to the host as float64, with
equal values.
Times are wall-clock and CPU seconds of this process; printed as ratios, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import time
from dataclasses import dataclass

import torch

from interp.judge import DEFAULT_JUDGE
from interp.locate import lowest_layer, search_bounds
from interp.overrejection import RoEvaluator, over_rejection_prompts
from interp.ranges import LayerRange
from interp.ro_search import SearchRo
from interp.scaling import ALL_COMPONENTS, scale_weights_


@dataclass
class Took:
    wall: float
    cpu: float

    def __mul__(self, factor: float) -> "Took":
        return Took(self.wall * factor, self.cpu * factor)

    __rmul__ = __mul__

    def __add__(self, other: "Took") -> "Took":
        return Took(self.wall + other.wall, self.cpu + other.cpu)

    def ratio(self, other: "Took") -> str:
        return f"{self.wall / other.wall:5.2f}x wall, {self.cpu / other.cpu:5.2f}x cpu"

    def __str__(self) -> str:
        return f"{self.wall:7.2f} s wall ({self.cpu:7.2f} s cpu)"


def timed(fn, *args, **kwargs) -> tuple[object, Took]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, Took(time.perf_counter() - wall, time.process_time() - cpu)


def scaled_copy(plain, layer_range, alpha):
    out = copy.deepcopy(plain)
    if layer_range is not None:
        scale_weights_(out, layer_range, alpha, ALL_COMPONENTS)
    return out


def _verdicts(model, rows, prompt_len) -> list[bool]:
    end_ids, tok, flags = model.end_token_ids, model.tokenizer, []
    for row in rows[:, prompt_len:].tolist():
        cut = next((k for k, t in enumerate(row) if t in end_ids), len(row))
        flags.append(DEFAULT_JUDGE.is_refusal(tok.decode(row[:cut], skip_special_tokens=True).strip()))
    return flags


@torch.no_grad()
def generate_flags(hf, model, queries, batch_size: int, max_new_tokens: int = 16) -> list[bool]:
    """Left-padded batched greedy ``generate`` on a plain model (batch_size 1: the paper's way)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                  top_k=None, repetition_penalty=None, eos_token_id=model.end_token_ids, pad_token_id=model.pad_token_id)
    flags = []
    for start in range(0, len(queries), batch_size):
        enc = model.encode(queries[start:start + batch_size])
        out = hf.generate(**enc, **kwargs)
        flags += _verdicts(model, out, enc["input_ids"].shape[1])
    return flags


def profile_evaluation(evaluator, layer_range, alpha) -> dict[str, float]:
    """Seconds of one evaluation by part, from cProfile's cumulative times."""
    profiler = cProfile.Profile()
    profiler.enable()
    evaluator.evaluate(layer_range, alpha)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = max(v[3] for v in stats.values())

    def cumulative(name_part: str, file_part: str = "") -> float:
        return sum(v[3] for (file, _, func), v in stats.items() if func == name_part and file_part in file)

    def own(file_part: str) -> float:
        return sum(v[2] for (file, _, _), v in stats.items() if file_part in file)

    prefill = cumulative("resume_from_layer") + cumulative("prefix_cache")
    decode = cumulative("decode_greedy")
    return {
        "total": total,
        "prefix + prefill (layers >= start)": prefill,
        "decode steps": decode,
        "  of which projections (torch linear)": sum(v[3] for (file, _, func), v in stats.items()
                                                     if file == "~" and "_nn.linear" in func),
        "  of which attention matmuls": sum(v[3] for (file, _, func), v in stats.items()
                                            if file == "~" and func == "<built-in method torch.matmul>"),
        "  of which the LM head": sum(v[3] for (file, _, func), v in stats.items() if func == "last_logits"),
        "bridge hooks and wrappers (own time)": own("transformer_lens"),
        "judge + token decode (Python)": sum(v[3] for (file, _, func), v in stats.items()
                                             if func in ("decided", "is_refusal") or (func == "decode" and "tokeniz" in file)),
    }


def host_fingerprint(state: dict) -> str:
    """The fingerprint's baseline: every tensor copied to the host as float64 and summed there
    (``interp.provenance.weights_fingerprint`` computes the same value on the device)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if name.rpartition(".")[2] == "bias" and not tensor.detach().any():
            continue
        flat = tensor.detach().double().flatten().cpu()
        step = max(1, flat.numel() // 257)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(f"{flat.sum().item():.6e}".encode())
        digest.update(flat[::step].numpy().round(6).tobytes())
    return digest.hexdigest()[:16]


def fingerprint_benchmark() -> None:
    """The fingerprint of a random ~1.1B-parameter bfloat16 state dict: on the device against
    the previous host-float64 implementation, same value."""
    from interp.provenance import weights_fingerprint

    torch.manual_seed(0)
    d, ff, layers, vocab = 2048, 5632, 16, 32000
    state = {"model.embed_tokens.weight": torch.randn(vocab, d, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                            ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (ff, d)), ("mlp.up_proj", (ff, d)),
                            ("mlp.down_proj", (d, ff))):
            state[p + name + ".weight"] = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    n = sum(t.numel() for t in state.values())
    new, t_new = timed(weights_fingerprint, state)
    old, t_old = timed(host_fingerprint, state)
    print(f"\nfingerprint of a random {n / 1e9:.2f}B-parameter bfloat16 state dict (CPU; on a GPU the baseline also "
          f"copies every tensor to the host):")
    print(f"  baseline (host float64 copies): {t_old}\n  on the device:                  {t_new}  {t_old.ratio(t_new)}; "
          f"same value: {old == new}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=64, help="over-rejection prompts (spread over D_o)")
    parser.add_argument("--range", default=None,
                        help="START,END (default: the range shipped with the aligned embedded model)")
    parser.add_argument("--alpha", type=float, default=1.2)
    parser.add_argument("--upper-offsets", default="-3,3")
    parser.add_argument("--lower-offsets", default="-2,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--paper-n", type=int, default=16, help="prompts the paper's method is timed on")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--fingerprint", action="store_true")
    args = parser.parse_args(argv)

    from interp.models import load_hf, load_model

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    queries = over_rejection_prompts(args.n, "spread")
    if args.range is None:
        if args.model != "embedded":
            parser.error("--range is needed for a model other than embedded")
        from interp.export import shipped_located

        layer_range = shipped_located().range
    else:
        layer_range = LayerRange.parse(args.range)
    upper = list(range(*(lambda a, b: (a, b + 1))(*map(int, args.upper_offsets.split(",")))))
    lower = list(range(*(lambda a, b: (a, b + 1))(*map(int, args.lower_offsets.split(",")))))
    model = load_model(args.model, device="cpu")
    plain, _, _ = load_hf(args.model)
    plain = plain.eval()
    plain.config._attn_implementation = "eager"  # as load_model sets it for the bridged model
    print(f"{args.model}, {args.n} over-rejection prompts (spread), torch threads {torch.get_num_threads()}, "
          f"range {layer_range} x {args.alpha}, 16 new tokens, batch {args.batch_size}")

    # --- one evaluation
    copy_, t_copy = timed(scaled_copy, plain, layer_range, args.alpha)
    paper_n = min(args.paper_n, args.n)
    paper, t_paper = timed(generate_flags, copy_, model, queries[:paper_n], 1)
    t_paper = t_paper * (args.n / paper_n)
    baseline, t_base = timed(generate_flags, copy_, model, queries, args.batch_size)
    start = lowest_layer(layer_range, model.n_layers, lower_offsets=lower)
    evaluator, t_build = timed(RoEvaluator, model, queries, start=start, batch_size=args.batch_size)
    ours, t_ours = timed(evaluator.evaluate, layer_range, args.alpha)
    ours_flags = ours.flags.tolist()
    print("\none R_o evaluation:")
    print(f"  paper (copy + one prompt at a time):   {t_paper}  (timed on {paper_n} prompts, scaled to {args.n}); "
          f"R_o {sum(paper)}/{paper_n} on those")
    print(f"  batched baseline (plain scaled copy):  {t_base}  (+ {t_copy.wall:.2f} s to copy and scale); "
          f"R_o {sum(baseline)}/{args.n}")
    print(f"  this project (RoEvaluator):            {t_ours}  (+ {t_build.wall:.2f} s once per search to build); "
          f"R_o {ours.count}/{args.n}")
    print(f"  ratios: project vs baseline {t_base.ratio(t_ours)}; project vs paper {t_paper.ratio(t_ours)}")
    print(f"  verdicts: project == baseline on {sum(a == b for a, b in zip(ours_flags, baseline))}/{args.n} prompts, "
          f"== paper on {sum(a == b for a, b in zip(ours_flags, paper))}/{paper_n}")
    print(f"  first-step estimate (free with generation): summed mass {ours.first.expected:.1f}, "
          f"argmax count {ours.first.count}")
    print("\nwhere one evaluation's time goes (cProfile, cumulative seconds; parts overlap):")
    for part, seconds in profile_evaluation(evaluator, layer_range, args.alpha).items():
        print(f"  {part:<40} {seconds:6.2f}")

    if not args.no_sweep:
        def baseline_ro(r, a):
            copy_r = scaled_copy(plain, r, a)
            return float(sum(generate_flags(copy_r, model, queries, args.batch_size)))

        base_result, t_base_sweep = timed(search_bounds, baseline_ro, layer_range, args.alpha, model.n_layers,
                                          upper_offsets=upper, lower_offsets=lower)
        exact = SearchRo(evaluator)
        exact_result, t_exact = timed(search_bounds, exact.generated, layer_range, args.alpha, model.n_layers,
                                      upper_offsets=upper, lower_offsets=lower)
        pruned = SearchRo(evaluator)
        pruned_result, t_pruned = timed(search_bounds, pruned.generated, layer_range, args.alpha, model.n_layers,
                                        upper_offsets=upper, lower_offsets=lower, bound=pruned.bound)
        n_configs = len({r.range for r in base_result.rows})
        print(f"\nwhole search ({n_configs} configurations):")
        print(f"  batched baseline, every configuration: {t_base_sweep}; located {base_result.range}")
        print(f"  this project, generation:              {t_exact}  {t_base_sweep.ratio(t_exact)}; "
              f"located {exact_result.range}")
        n_pruned = sum(r.pruned for r in pruned_result.upper + pruned_result.lower)
        print(f"  this project, prune (default):         {t_pruned}  {t_base_sweep.ratio(t_pruned)}; "
              f"located {pruned_result.range}; {n_pruned} pruned, margin {pruned.margin}")
        same = sum(base_result.rows[k].r_o == exact_result.rows[k].r_o for k in range(len(base_result.rows)))
        print(f"  R_o equal to the baseline's in {same}/{len(base_result.rows)} configurations")
    if args.fingerprint:
        fingerprint_benchmark()


if __name__ == "__main__":
    main()
