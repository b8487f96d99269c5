"""SPPFT sharded with FSDP2 over the processes of one launch (run by tests/test_fsdp.py):

    CUDA_VISIBLE_DEVICES= torchrun --nproc-per-node 2 tests/fsdp_sppft.py --model NAME=DIR ... --out DIR

(two CPU processes, gloo).  For each ``--model`` (one tiny model per family) each rank loads the
plain model, fine-tunes it with ``finetune.sharded.train_sharded`` (mode ``sppft``, ``--layers``
frozen, AdamW with weight decay) and writes ``{NAME}-rank{R}.json``: the SHA-256 of every
parameter's bytes before training (by HF name), the frozen names, the losses, what the process
saw of the process group, and the sharded model's logits on a fixed probe (every rank runs that
forward: it all-gathers the shards).  Rank 0 also writes the gathered checkpoint
(``{NAME}/model``).  A ``rank{R}.started`` file is written first, so the test can tell a launcher
that never started the script from a script that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, for interp/finetune

from tests.ddp_sppft import digest  # noqa: E402

PAIRS = [(f"What is {i} plus {i}?", f"Sure: {i} plus {i} makes {2 * i}, as you can check.") for i in range(16)]
PROBE = [[1, 2, 3, 4, 5, 6, 7, 8]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", default="1,1")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.started").write_text("")

    import torch
    import torch.distributed as dist

    from finetune import data as D
    from finetune import masks as M
    from finetune.sharded import start_group, train_sharded
    from finetune.train import TrainConfig
    from interp.models import load_model

    torch.set_num_threads(1)
    start_group()
    config = TrainConfig(max_steps=args.steps, batch_size=4, max_length=64, lr=1e-3, weight_decay=0.1, warmup=0,
                         progress=False, save_strategy="no", logging_steps=1)
    for spec in args.model:
        name, folder = spec.split("=", 1)
        model = load_model(folder, device="cpu", bridge=False)
        before = {n: digest(p) for n, p in M.named_parameters(model).items()}
        result = train_sharded(model, D.implicit_set(PAIRS, model.tokenizer), "sppft", layers=args.layers,
                               out_dir=out / name, config=config)
        param_types = sorted({type(p.data).__name__ for p in model.hf_model.parameters()})  # before a forward unshards
        with torch.no_grad():
            logits = model.hf_model(input_ids=torch.tensor(PROBE)).logits
        record = {
            "rank": rank,
            "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "sharded_class": type(model.hf_model).__name__,
            "sharded_param_types": param_types,
            "steps": result.steps,
            "losses": result.losses,
            "frozen": result.frozen,
            "before": before,
            "probe_logits": logits[0, :, :64].tolist(),
        }
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
