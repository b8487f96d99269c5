"""Benchmark: the batched last-position patching sweep against naive patching.

    python -m benchmarks.patching [--model embedded] [--n 100] [--naive-n 5] [--threads 1] [--site resid_post]

Ours (``interp.patching.patching_sweep``): every layer's residual (``hook_resid_post``) patched
from the harmful run into the benign run at the last prompt position, for ``--n`` test pairs,
harmful -> benign only: the harmful prompts run once clean (capturing every layer), the benign
prompts run once without their last token, and the last token is re-run for many (layer,
prompt) rows per forward on the cached keys and values.

Naive (the textbook TransformerLens loop): one prompt and one layer at a time, a full forward of
the benign prompt (unpadded, no shared prefix) with a hook that writes the harmful run's cached
last-position residual, after one forward of the harmful prompt capturing every layer.  It runs on
the first ``--naive-n`` pairs and its time is **extrapolated** linearly to ``--n`` pairs (printed
as such); ``--naive-n`` equal to ``--n`` runs it fully.

Both run on the same model and prompts in this process, after an untimed warm-up; the speed ratio
and the largest difference between the two methods' per-pair log-odds are printed.  No timed
assertion: the ratio depends on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from interp.data import load_pairs
from interp.hooks import hook_name
from interp.models import load_model
from interp.patching import patching_sweep, refusal_metric


@torch.no_grad()
def naive_pair(model, pair, site: str, metric) -> tuple[float, list[float]]:
    """Clean benign log-odds and the patched log-odds per layer of one pair, one forward each."""
    names = [hook_name(site, layer) for layer in range(model.n_layers)]
    cached = {}

    def read(name):
        def hook(value, hook):
            cached[name] = value[:, -1].clone()
            return value

        return hook

    with model.bridge.hooks(fwd_hooks=[(name, read(name)) for name in names]):
        model.hf_model(**model.encode([pair.harmful]))
    benign = model.encode([pair.benign])
    clean = float(metric(model.hf_model(**benign).logits[:, -1])[0])
    patched = []
    for name in names:
        def write(value, hook, source=cached[name]):
            value = value.clone()
            value[:, -1] = source
            return value

        with model.bridge.hooks(fwd_hooks=[(name, write)]):
            patched.append(float(metric(model.hf_model(**benign).logits[:, -1])[0]))
    return clean, patched


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=100, help="test pairs in the sweep")
    parser.add_argument("--naive-n", type=int, default=5, help="pairs the naive loop runs (then extrapolated)")
    parser.add_argument("--site", default="resid_post")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared 2-core box)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    pairs = load_pairs("test")[: args.n]
    naive_n = min(args.naive_n, len(pairs))
    metric = refusal_metric(model)
    kwargs = dict(sites=[args.site], directions=["harmful->benign"], batch_size=args.batch_size)
    patching_sweep(model, pairs[:2], layers=[0, 1], **kwargs)  # warm up both paths, untimed
    naive_pair(model, pairs[0], args.site, metric)

    start = time.perf_counter()
    ours = patching_sweep(model, pairs, **kwargs)
    ours_s = time.perf_counter() - start
    print(f"ours done in {ours_s:.1f} s; running the naive loop on {naive_n} pairs ...", flush=True)

    start = time.perf_counter()
    naive = [naive_pair(model, pair, args.site, metric) for pair in pairs[:naive_n]]
    naive_s = time.perf_counter() - start
    naive_full_s = naive_s * len(pairs) / naive_n

    ours_patched = ours.patched[0, 0, :, :naive_n].T  # [pair, layer]
    naive_patched = torch.tensor([p for _, p in naive])
    naive_clean = torch.tensor([c for c, _ in naive])
    diff_patched = float((ours_patched - naive_patched).abs().max())
    diff_clean = float((ours.benign_clean[:naive_n] - naive_clean).abs().max())
    forwards = len(pairs) * (model.n_layers + 2)
    print(f"model {args.model}: {len(pairs)} test pairs, site {args.site}, all {model.n_layers} layers, harmful -> "
          f"benign; torch threads {torch.get_num_threads()}")
    print(f"  ours  (batched, cached earlier positions, last token re-run): {ours_s:8.1f} s")
    label = "measured" if naive_n == len(pairs) else f"extrapolated from {naive_n} pairs ({naive_s:.1f} s measured)"
    print(f"  naive (one layer, one prompt, one full forward at a time, {forwards} forwards): {naive_full_s:8.1f} s "
          f"[{label}]")
    print(f"  speed-up: {naive_full_s / ours_s:.1f}x")
    print(f"  largest |ours - naive| over the {naive_n} pairs x {model.n_layers} layers: patched log-odds "
          f"{diff_patched:.2e}, clean log-odds {diff_clean:.2e}")
    agree = diff_patched < 1e-3 and diff_clean < 1e-3
    print(f"  same per-pair values to float tolerance (1e-3 log-odds): {'yes' if agree else 'NO'}")
    return {"ours_s": ours_s, "naive_s": naive_s, "naive_full_s": naive_full_s, "diff": max(diff_patched, diff_clean)}


if __name__ == "__main__":
    main()
