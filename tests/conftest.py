"""Shared fixtures: a tiny random Llama saved to a folder (loaded through the same
``load_model`` path as any local model), and the embedded SmolLM2 models."""

from __future__ import annotations

import os

import pytest
import torch

from interp.models import embedded_gguf_path, load_model

# TEST_THREADS=1 keeps the suite from starving a training run that shares the machine
torch.set_num_threads(int(os.environ.get("TEST_THREADS", max(1, min(2, torch.get_num_threads())))))


def embedded_tokenizer():
    """SmolLM2's tokenizer, read from the embedded GGUF file (every tiny model uses it)."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_sizes(tok, n_layers: int) -> dict:
    """The config fields every tiny random model shares (d_model 64, 4 heads, 2 KV heads), with
    ``tok``'s vocabulary and special tokens."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_tiny_llama(folder, n_layers: int = 4, seed: int = 0, bias: bool = False):
    """Save a randomly initialised Llama (d_model 64) with SmolLM2's tokenizer to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded_tokenizer()
    config = LlamaConfig(**tiny_sizes(tok, n_layers), attention_bias=bias, mlp_bias=bias, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if bias:  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bias_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bias"), bias=True, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def embedded_base():
    return load_model("embedded-base", device="cpu")


@pytest.fixture(scope="session")
def embedded():
    return load_model("embedded", device="cpu")


def pytest_addoption(parser):
    """``pytest --model SPEC [--dtype bfloat16] [--device cuda]``: run the hook checks of
    ``tests/test_user_model.py`` on your own model (default: tiny random models)."""
    group = parser.getgroup("safety-layers", "hook checks on your own model (tests/test_user_model.py)")
    group.addoption("--model", action="append", default=None, metavar="SPEC",
                    help="a load_model spec (repeatable); default: tiny random models")
    group.addoption("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dtype for --model (default float32)")
    group.addoption("--device", default=None, help="device for --model (default: cuda if available, else cpu)")
