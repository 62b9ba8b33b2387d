"""Fused attention inside the bridge: the same numbers as TransformerLens's own code and a plain `transformers`
forward, taken only where nothing looks inside attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import pipeline.attention
from pipeline.model import load_model
from pipeline.params import ModelConfig


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the fused kernel's calls."""
    calls: list[int] = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(pipeline.attention.F, "scaled_dot_product_attention", counted)
    return calls


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of different lengths, right-padded as extraction pads them, and one left-padded row."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 200, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    mask[3, :6] = 0
    return ids, mask


def model(tiny_model_dir, attn_implementation: str):
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu", attn_implementation=attn_implementation))


def test_fused_attention_equals_the_bridge_and_a_plain_forward(tiny_model_dir, kernel_calls):
    ids, mask = padded_batch()
    fused, eager = model(tiny_model_dir, "sdpa"), model(tiny_model_dir, "eager")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        own = eager(ids, attention_mask=mask)
        assert not kernel_calls  # eager never fuses
        out = fused(ids, attention_mask=mask)
        reference = plain(ids, attention_mask=mask).logits
    assert len(kernel_calls) == fused.cfg.n_layers
    real = mask.bool()
    # Rounding only: fp32 logits of the tiny model are about 10 in size.
    torch.testing.assert_close(out[real], own[real], rtol=0, atol=1e-4)
    # Right-padded rows, as extraction pads them (for a left-padded row the bridge and `transformers` number the
    # positions differently, with either attention).
    right = real[:3]
    torch.testing.assert_close(out[:3][right], reference[:3][right], rtol=0, atol=1e-4)


def test_hooks_inside_attention_get_the_bridge_s_own_code(tiny_model_dir, kernel_calls):
    ids, mask = padded_batch()
    fused, eager = model(tiny_model_dir, "sdpa"), model(tiny_model_dir, "eager")
    patterns = []

    def keep(pattern, hook):
        patterns.append(pattern.clone())

    with torch.inference_mode():
        hooked = fused.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[("blocks.1.attn.hook_pattern", keep)])
        expected = eager(ids, attention_mask=mask)
    assert len(kernel_calls) == fused.cfg.n_layers - 1  # every layer but the hooked one
    assert len(patterns) == 1
    torch.testing.assert_close(patterns[0].sum(-1), torch.ones(patterns[0].shape[:-1]))
    torch.testing.assert_close(hooked[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-4)

    kernel_calls.clear()
    with torch.inference_mode():
        _, cache = fused.run_with_cache(ids, attention_mask=mask)
    assert not kernel_calls and "blocks.0.attn.hook_pattern" in cache


def test_training_mode_keeps_the_bridge_s_own_code(tiny_model_dir, kernel_calls):
    fused = model(tiny_model_dir, "sdpa")
    ids, mask = padded_batch()
    fused.train()
    try:
        with torch.no_grad():
            fused(ids, attention_mask=mask)
    finally:
        fused.eval()
    assert not kernel_calls  # attention dropout lives in the pattern


def test_unknown_attention_implementation_is_one_clear_line(tiny_params):
    from conftest import invoke

    result = invoke("extract", "--params", str(tiny_params), "-S", "model.attn_implementation=flash")
    assert result.exit_code != 0
    assert "model.attn_implementation" in result.output and "sdpa or eager" in result.output
