"""Benchmark: this project's capture + all-pairs statistic against the paper's method.

    python -m benchmarks.existence [--model embedded-base] [--n 100] [--threads 2] [--faithful]

Ours: ``capture_last_token_resid`` (padded batches, shared-prefix keys/values, hooks that keep
only the last token) and the exact all-pairs statistic (``similarity_table``).

Baseline (the paper's ``save_all_pairs_cos_sim.py``): one prompt at a time,
``hf_model.generate(max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True)``,
every decoder layer's last-position hidden state, then r = 500 seeded pairs per type with a numpy
cosine per pair and layer.  By default each prompt is generated once (a baseline kinder than the
paper's script); ``--faithful`` also times the script as written, which generates both prompts of
every one of the 3 x r draws afresh.

A competent batched baseline too: the same prompts left-padded in batches through a *plain*
(unbridged) HF copy with ``output_hidden_states=True``, keeping the last position of every layer.

All run on the same model, template and prompts in this one process; the speed ratios and the
largest differences between the methods' activations are printed (HF's last hidden state has the
final norm applied, so ours are compared after ``apply_final_norm``).  Printed, never asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from interp.activations import apply_final_norm, capture_last_token_resid
from interp.cosine import PAPER_SEEDS, paper_pair_indices, similarity_table
from interp.data import load_prompts
from interp.models import load_model


def paper_vectors(model, query: str) -> list[np.ndarray]:
    """The paper's vector: every decoder layer's hidden state at the last prompt position,
    taken in the first step of ``generate`` (the embedding output skipped)."""
    batch = model.encode([query])
    with torch.no_grad():
        out = model.hf_model.generate(
            **batch, max_new_tokens=1, output_hidden_states=True, return_dict_in_generate=True,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=model.tokenizer.pad_token_id,
        )
    return [layer[0][-1].float().numpy() for layer in out.hidden_states[0][1:]]


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def paper_statistic(vectors_of, n_normal: int, n_malicious: int, r: int) -> dict[str, np.ndarray]:
    """r seeded draws per pair type; ``vectors_of(kind, index)`` gives a prompt's layer vectors.
    Returns ``[r, layer]`` cosines per type."""
    cosines = {}
    for kind in ("nn", "mm", "nm"):
        sizes = {"nn": (n_normal, n_normal), "mm": (n_malicious, n_malicious), "nm": (n_normal, n_malicious)}[kind]
        first, second = {"nn": ("n", "n"), "mm": ("m", "m"), "nm": ("n", "m")}[kind]
        draws = paper_pair_indices(*sizes, r, PAPER_SEEDS[kind], same_pool=kind != "nm")
        cosines[kind] = np.array([
            [numpy_cosine(u, v) for u, v in zip(vectors_of(first, i), vectors_of(second, j))] for i, j in draws
        ])
    return cosines


def gap_code(cosines: dict[str, np.ndarray]) -> np.ndarray:
    mean_nm, mean_nn = cosines["nm"].mean(0), cosines["nn"].mean(0)
    return np.degrees(np.arccos(np.clip(mean_nm, -1, 1))) - np.degrees(np.arccos(np.clip(mean_nn, -1, 1)))


def run_ours(model, normal, malicious, batch_size):
    start = time.perf_counter()
    acts = capture_last_token_resid(model, normal + malicious, batch_size=batch_size, progress=False)
    table = similarity_table(acts[: len(normal)], acts[len(normal):], "all")
    return time.perf_counter() - start, acts, table


def run_paper_per_prompt(model, normal, malicious, r):
    start = time.perf_counter()
    vectors = {"n": [paper_vectors(model, q) for q in normal], "m": [paper_vectors(model, q) for q in malicious]}
    cosines = paper_statistic(lambda kind, i: vectors[kind][i], len(normal), len(malicious), r)
    return time.perf_counter() - start, vectors, cosines


@torch.no_grad()
def batched_hidden_states(plain, model, queries, batch_size: int) -> torch.Tensor:
    """The competent baseline: left-padded batches through a plain HF model with
    ``output_hidden_states``, every decoder layer's last-position state ``[prompt, layer, d_model]``."""
    out = []
    for start in range(0, len(queries), batch_size):
        enc = model.encode(queries[start:start + batch_size], padding_side="left")
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        hidden = plain(**enc, position_ids=position_ids, output_hidden_states=True).hidden_states[1:]
        out.append(torch.stack([h[:, -1] for h in hidden], dim=1).float())
    return torch.cat(out)


def run_paper_faithful(model, normal, malicious, r):
    sets = {"n": normal, "m": malicious}
    start = time.perf_counter()
    cosines = paper_statistic(lambda kind, i: paper_vectors(model, sets[kind][i]), len(normal), len(malicious), r)
    return time.perf_counter() - start, cosines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-base")
    parser.add_argument("--template", default="chat", choices=["chat", "alpaca"])
    parser.add_argument("--n", type=int, default=100, help="prompts per set")
    parser.add_argument("--r", type=int, default=500, help="pairs per type in the paper's estimator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--faithful", action="store_true", help="also time the paper's script as written (slow)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", template=args.template)
    normal = load_prompts("benign", "train")[: args.n]
    malicious = load_prompts("advbench", "train")[: args.n]
    paper_vectors(model, normal[0])  # warm up both paths once, untimed
    capture_last_token_resid(model, normal[:2], progress=False)

    ours_s, acts, _ = run_ours(model, normal, malicious, args.batch_size)
    from interp.models import load_hf

    plain = load_hf(args.model)[0].eval()
    plain.config._attn_implementation = "eager"
    batched_hidden_states(plain, model, normal[:2], 2)  # warm-up
    start = time.perf_counter()
    baseline = batched_hidden_states(plain, model, normal + malicious, args.batch_size)
    similarity_table(baseline[: len(normal)], baseline[len(normal):], "all")
    batched_s = time.perf_counter() - start
    print(f"ours done in {ours_s:.2f} s; running the paper's method ...", flush=True)
    base_s, vectors, cosines = run_paper_per_prompt(model, normal, malicious, args.r)

    theirs = torch.tensor(np.array([np.stack(v) for v in vectors["n"] + vectors["m"]]))
    ours_hf = apply_final_norm(model, acts)
    diff = (ours_hf - theirs).abs()
    scale = theirs.abs().amax()
    sampled_ours = similarity_table(ours_hf[: len(normal)], ours_hf[len(normal):], "sampled", r=args.r)
    exact = similarity_table(ours_hf[: len(normal)], ours_hf[len(normal):], "all")
    print(f"model {args.model} ({args.template}), {len(normal)} normal + {len(malicious)} malicious prompts, "
          f"{model.n_layers} layers, torch threads {torch.get_num_threads()}, r = {args.r}")
    print(f"  ours  (batched capture + exact all-pairs statistic): {ours_s:8.2f} s")
    print(f"  batched baseline (plain HF, output_hidden_states, same statistic): {batched_s:8.2f} s   "
          f"-> ours is {batched_s / ours_s:.2f}x faster; max |ours - baseline| = "
          f"{(apply_final_norm(model, acts) - baseline).abs().max():.2e}")
    print(f"  paper (generate per prompt + {args.r} sampled pairs/type): {base_s:8.2f} s   -> ours is {base_s / ours_s:.1f}x faster")
    print(f"  activations: max |ours - paper| = {diff.max():.2e} (largest |value| {scale:.1f}; "
          f"layers 0..{model.n_layers - 2}: {diff[:, :-1].max():.2e}, last layer after final norm: {diff[:, -1].max():.2e})")
    print(f"  sampled gap_code from our activations vs the paper's: max |diff| = "
          f"{np.abs(sampled_ours['gap_code'].to_numpy() - gap_code(cosines)).max():.2e} deg")
    print(f"  exact all-pairs gap_code vs the paper's sampled estimate: max |diff| = "
          f"{np.abs(exact['gap_code'].to_numpy() - gap_code(cosines)).max():.2f} deg (sampling error of r = {args.r})")
    if args.faithful:
        faithful_s, _ = run_paper_faithful(model, normal, malicious, args.r)
        print(f"  paper script as written (2 x 3 x {args.r} generate calls): {faithful_s:8.2f} s   "
              f"-> ours is {faithful_s / ours_s:.1f}x faster")


if __name__ == "__main__":
    main()
