"""SPPFT under data-parallel training, one process per rank (run by tests/test_distributed.py):

    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 tests/ddp_sppft.py --model DIR --out DIR

(two CPU processes, DDP over gloo; see tests/test_distributed.py for why not ``--cpu``)

Each rank loads the tiny model without a bridge, fine-tunes it with ``finetune.train.train``
(mode ``sppft``, layers 1-2 frozen, AdamW with weight decay), and writes
``rank{R}.json``: the SHA-256 of every parameter's bytes before and after training (by HF name),
the frozen names, and what the process saw of the distributed setup (world size, backend, the
batches it trained on).  A ``rank{R}.started`` file is written first, so the test can tell a
launcher that never started the script from a script that failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, for interp/finetune


def digest(tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests mean bit-identical values."""
    import torch

    data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", default="1,2")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.started").write_text("")

    import torch
    from transformers import TrainerCallback

    from finetune import data as D
    from finetune import masks as M
    from finetune.train import TrainConfig, train
    from interp.models import load_model

    torch.set_num_threads(1)
    model = load_model(args.model, device="cpu", bridge=False)
    before = {n: digest(p) for n, p in M.named_parameters(model).items()}
    pairs = [(f"What is {i} plus {i}?", f"Sure: {i} plus {i} makes {2 * i}, as you can check.") for i in range(16)]
    seen = []

    class Record(TrainerCallback):
        """The distributed state as the trainer sees it, once training has set it up."""

        def on_step_begin(self, targs, state, control, **kwargs):
            if not seen:
                dist = torch.distributed
                seen.append({
                    "initialized": dist.is_available() and dist.is_initialized(),
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "backend": dist.get_backend() if dist.is_initialized() else None,
                    "parallel_mode": str(targs.parallel_mode),
                })

    config = TrainConfig(max_steps=args.steps, batch_size=2, max_length=64, lr=1e-3, weight_decay=0.1, warmup=0,
                         progress=False, save_strategy="no", logging_steps=1)
    result = train(model, D.implicit_set(pairs, model.tokenizer), "sppft", layers=args.layers,
                   out_dir=out / f"run{rank}", config=config, callbacks=[Record()])
    after = {n: digest(p) for n, p in M.named_parameters(model).items()}
    record = {
        "rank": rank,
        "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "distributed": seen[0] if seen else None,
        "steps": result.steps,
        "losses": [h["loss"] for h in result.log_history if "loss" in h],
        "frozen": result.frozen,
        "before": before,
        "after": after,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
