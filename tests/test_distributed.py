"""SPPFT under DDP: ``accelerate launch --multi_gpu --num_processes 2`` runs tests/ddp_sppft.py
as two processes on the CPU (torchrun's launcher; the Trainer's ``use_cpu`` makes it DDP over
gloo; CUDA is hidden from the processes).  ``accelerate launch --cpu --num_processes 2`` is not
used: in accelerate 1.x it starts a single process on one machine unless an MPI hostfile is
given (``--mpirun_hostfile``), so it would test nothing distributed.

The tiny Llama is trained 3 steps with layers 1-2 frozen.  On both ranks the frozen layers'
weights must stay bit-identical to the start, and every trained weight must be bit-identical
across the ranks (DDP all-reduces the gradients; the ranks see different batches, so without
DDP they would drift apart) and different from the start.

Only DDP on the CPU is run here; sharded training (FSDP2, ``finetune.sharded``) is tested in
tests/test_fsdp.py.  Not run: DeepSpeed (not installed here) and any real multi-GPU run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "ddp_sppft.py"
FROZEN = (1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    from tests.conftest import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path_factory.mktemp("ddp-model"))
    out = tmp_path_factory.mktemp("ddp-out")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(SCRIPT), "--model", str(model_dir), "--out", str(out), "--steps", "3",
        "--layers", f"{FROZEN[0]},{FROZEN[1]}",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(command, cwd=SCRIPT.parent.parent, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("accelerate launch did not finish within 300 s")
    started = sorted(p.name for p in out.glob("rank*.started"))
    if proc.returncode != 0 and len(started) < 2:
        pytest.skip(f"accelerate could not launch two processes here (exit {proc.returncode}): "
                    f"{proc.stderr[-800:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return records


def test_both_ranks_ran_under_ddp(ddp_run):
    for rank, record in enumerate(ddp_run):
        assert record["rank"] == rank and record["env_world_size"] == 2
        assert record["distributed"]["initialized"] and record["distributed"]["world_size"] == 2
        assert record["distributed"]["backend"] == "gloo"
        assert "DISTRIBUTED" in record["distributed"]["parallel_mode"]
        assert record["steps"] == 3
    assert ddp_run[0]["before"] == ddp_run[1]["before"]  # the same start on both ranks


def test_frozen_weights_bit_identical_on_every_rank(ddp_run):
    names = list(ddp_run[0]["before"])
    expected = {n for n in names
                if any(n.startswith(f"model.layers.{i}.{part}.") for i in range(FROZEN[0], FROZEN[1] + 1)
                       for part in ("self_attn", "mlp"))}
    assert len(expected) == 14  # q k v o gate up down, two layers
    for record in ddp_run:
        assert set(record["frozen"]) == expected
        for name in expected:
            assert record["after"][name] == record["before"][name], f"rank {record['rank']}: {name} moved"


def test_trained_weights_equal_across_ranks_and_moved(ddp_run):
    rank0, rank1 = ddp_run
    trained = set(rank0["before"]) - set(rank0["frozen"])
    assert trained
    for name in trained:
        assert rank0["after"][name] == rank1["after"][name], f"{name} differs between the ranks"
        assert rank0["after"][name] != rank0["before"][name], f"{name} did not move"
