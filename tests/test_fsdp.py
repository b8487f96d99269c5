"""SPPFT sharded with FSDP2 (``finetune.sharded``): two CPU processes over gloo, on a tiny model of
every family (tests/fsdp_sppft.py, launched once with ``torch.distributed.run``), and through the
user's entry, ``accelerate launch --config_file finetune/accelerate_sharded.yaml -m analyses.sppft
--train-only`` (accelerate as a launcher: its own FSDP plugin does not engage on the CPU).

Each tiny model (3 layers, layer 1 frozen) trains 3 AdamW steps (weight decay 0.1) with batches of
4 rows, 2 per rank.  Checked against an independent single-process run written out here (the plain
HF model from ``from_pretrained``, its own loss, AdamW on the parameters outside layer 1's attention
and MLP, the same batches):

- every parameter is sharded (``DTensor``) on both ranks, in a process group of two over gloo;
- in the gathered checkpoint, layer 1's attention and MLP weights are bit-identical to the start and
  every other weight moved, and the trained weights equal the single-process run's (atol 1e-5);
- the loss curve is the same on both ranks and equals the single-process run's within rtol 1e-5
  (the two differ only in the order of floating-point sums);
- the checkpoint reloads with plain ``from_pretrained`` and gives the sharded model's logits
  (atol 1e-5);
- element masks, LoRA, a bridged model and a batch that does not split over the processes are
  refused with ``ShardingError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import data as D
from tests.ddp_sppft import digest
from tests.fsdp_sppft import PAIRS, PROBE
from tests.test_distributed import _free_port
from tests.test_families import FAMILIES, block_names, build_tiny_family

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "fsdp_sppft.py"
FROZEN = 1
STEPS, BATCH, LR, DECAY = 3, 4, 1e-3, 0.1
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _launch(command: list[str], out: Path, what: str) -> None:
    try:
        proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within 400 s")
    if proc.returncode != 0 and len(list(out.glob("rank*.started"))) < 2 and not (out / "model").exists():
        pytest.skip(f"{what} could not start two processes here (exit {proc.returncode}): {proc.stderr[-800:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tests.conftest import embedded_tokenizer

    tok = embedded_tokenizer()
    return {f: build_tiny_family(f, tmp_path_factory.mktemp(f"fsdp-{f}"), tokenizer=tok) for f in FAMILIES}


@pytest.fixture(scope="module")
def sharded(dirs, tmp_path_factory):
    """Every family's records from one two-process launch: ``{family: (rank0, rank1)}``."""
    out = tmp_path_factory.mktemp("fsdp-out")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(SCRIPT), "--out", str(out), "--steps", str(STEPS),
               "--layers", f"{FROZEN},{FROZEN}", *[a for f, d in dirs.items() for a in ("--model", f"{f}={d}")]]
    _launch(command, out, "torch.distributed.run")
    return {f: tuple(json.loads((out / f"{f}-rank{r}.json").read_text()) for r in (0, 1)) for f in FAMILIES}, out


def _checkpoint(out: Path, family: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for path in sorted((out / family / "model").glob("*.safetensors")) for k, v in load_file(path).items()}


def reference_run(folder, steps: int = STEPS) -> tuple[list[float], torch.nn.Module]:
    """The single-process run: plain HF model, its own mean-token loss, AdamW (no decay on biases
    and norms) on everything but layer ``FROZEN``'s attention and MLP, linear decay from ``LR``,
    gradients clipped at 1, batches of ``BATCH`` consecutive rows of a permutation seeded 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.train import pad_collate

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folder)
    rows = D.tokenize(D.implicit_set(PAIRS, tok), tok, max_length=64)
    frozen = block_names(dict(model.named_parameters()), [FROZEN])
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
        if name not in frozen:
            (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LR * (1 - step / steps)
        batch = pad_collate([rows[i] for i in order[step * BATCH:(step + 1) * BATCH]], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.eval()


@pytest.fixture(scope="module")
def references(dirs):
    torch.manual_seed(0)
    return {f: reference_run(d) for f, d in dirs.items()}


def test_every_parameter_was_sharded_over_two_gloo_processes(sharded):
    records, _ = sharded
    for family, ranks in records.items():
        for rank, record in enumerate(ranks):
            assert record["rank"] == rank and record["env_world_size"] == 2 and record["world_size"] == 2
            assert record["backend"] == "gloo"
            assert record["sharded_class"].startswith("FSDP") and record["sharded_param_types"] == ["DTensor"], family
            assert record["steps"] == STEPS
        assert ranks[0]["before"] == ranks[1]["before"]


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_layer_bit_identical_and_the_rest_moved_in_the_gathered_checkpoint(sharded, family):
    records, out = sharded
    before = records[family][0]["before"]
    expected = block_names(before, [FROZEN])
    assert expected and all(record["frozen"] == sorted(expected) or set(record["frozen"]) == expected
                            for record in records[family])
    after = _checkpoint(out, family)
    assert set(before) <= set(after)
    for name, old in before.items():
        assert (digest(after[name]) == old) == (name in expected), f"{family}: {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_curve_and_weights_equal_the_single_process_run(sharded, references, family):
    records, out = sharded
    rank0, rank1 = records[family]
    assert rank0["losses"] == rank1["losses"]
    losses, reference = references[family]
    assert rank0["losses"] == pytest.approx(losses, rel=1e-5)
    after = _checkpoint(out, family)
    for name, param in reference.named_parameters():
        if name in after:
            torch.testing.assert_close(after[name], param.detach(), atol=1e-5, rtol=1e-4, msg=f"{family}: {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_with_from_pretrained_and_gives_the_sharded_logits(sharded, family):
    from transformers import AutoModelForCausalLM

    records, out = sharded
    model = AutoModelForCausalLM.from_pretrained(out / family / "model", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE)).logits[0, :, :64]
    for record in records[family]:
        torch.testing.assert_close(logits, torch.tensor(record["probe_logits"]), atol=1e-5, rtol=1e-5)


def test_what_cannot_be_sharded_is_refused(tiny_dir, tmp_path):
    from finetune.sharded import ShardingError, check_shardable, train_sharded
    from finetune.train import TrainConfig
    from interp.models import load_model

    plain = load_model(str(tiny_dir), device="cpu", bridge=False)
    examples = D.implicit_set(PAIRS, plain.tokenizer)
    mask = {"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)}
    with pytest.raises(ShardingError, match="element masks"):
        train_sharded(plain, examples, "full", out_dir=tmp_path, element_masks=mask)
    with pytest.raises(ShardingError, match="LoRA"):
        check_shardable(plain, TrainConfig(lora=True), None, 2)
    with pytest.raises(ShardingError, match="multiple of the 2 processes"):
        check_shardable(plain, TrainConfig(batch_size=3), None, 2)
    with pytest.raises(ShardingError, match="gradient accumulation"):
        check_shardable(plain, TrainConfig(grad_accum=2), None, 1)
    bridged = load_model(str(tiny_dir), device="cpu")
    _ = bridged.bridge  # boot it
    with pytest.raises(ShardingError, match="plain HF model"):
        check_shardable(bridged, TrainConfig(), None, 1)
    assert not torch.distributed.is_initialized()  # the group of one made for the refused call is gone


def test_accelerate_launch_of_the_cli_equals_one_process(tiny_dir, tmp_path):
    """``accelerate launch -m analyses.sppft --train-only`` with the shipped config (two processes)
    and the same command in this process (a world of one): the same loss curve, the same frozen
    bytes, and each writes a checkpoint that ``from_pretrained`` loads."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from analyses.sppft import main

    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    argv = ["--train-only", "--model", str(tiny_dir), "--layers", "1,2", "--data", "implicit", "--modes", "sppft",
            "--seeds", "0", "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--answers", str(answers)]
    out2 = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "finetune" / "accelerate_sharded.yaml"), "--main_process_port", str(_free_port()),
               "-m", "analyses.sppft", *argv, "--out", str(out2)]
    _launch(command, out2, "accelerate launch")
    one = main([*argv, "--out", str(tmp_path / "one")])
    two = json.loads((out2 / "config.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["layer_range"] == [1, 2]
    logged = [h["loss"] for h in json.loads((out2 / "log.json").read_text())]
    assert logged == pytest.approx(one["losses"], rel=1e-5) and len(logged) == 2
    start = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    states = [AutoModelForCausalLM.from_pretrained(d / "model").state_dict() for d in (out2, tmp_path / "one")]
    assert len(two["frozen_parameters"]) == 14  # q k v o gate up down, two layers
    for name in start:
        frozen = name in two["frozen_parameters"]
        for state in states:
            assert torch.equal(state[name], start[name]) == frozen, name
        torch.testing.assert_close(states[0][name], states[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--modes", "sppft,full"], "one run"),
    (["--modes", "critical"], "element masks cannot be sharded"),
    (["--device", "cpu"], "leave out --device"),
    (["--answers", "/no/such.jsonl"], "no answers JSONL"),
])
def test_train_only_arguments_are_checked_before_any_model_loads(extra, message):
    from analyses.cli import UsageError
    from analyses.sppft import parse_args

    argv = ["--train-only", "--layers", "1,2", "--data", "implicit", "--modes", "sppft", "--seeds", "0"]
    with pytest.raises(UsageError, match=message):
        parse_args(argv + extra)


def test_answers_need_train_only(tmp_path):
    from analyses.cli import UsageError
    from analyses.sppft import parse_args

    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(UsageError, match="--answers goes with --train-only"):
        parse_args(["--layers", "1,2", "--answers", str(tmp_path / "a.jsonl")])
