from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_gpt():
    """A traced 2-block hand-written GPT with its example input."""
    from planner.models import GPT, GPTConfig
    from planner.tracing import trace

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)).eval()
    ids = torch.randint(0, 64, (1, 8))
    return model, trace(model, args=(ids,)), ids


@pytest.fixture(scope="session")
def llama_tiny():
    """The traced llama-tiny preset, batch 1, 8 tokens (shared: tracing it takes seconds)."""
    import planner
    from planner.models import load_model

    lm = load_model("llama-tiny", batch_size=1, seq_len=8)
    return planner.trace(lm.model, lm.args, lm.kwargs)
