"""Fused attention (PyTorch's `scaled_dot_product_attention`) inside TransformerBridge's GPT-2-style attention.

TransformerLens 4's `JointQKVAttentionBridge` computes attention itself (scores, masked softmax, weighted sum) so
that `hook_attn_scores` and `hook_pattern` can fire, whatever the HF model's `attn_implementation` says. Extraction
and splicing hook the residual stream, never those two, and pay for the materialised [batch, heads, seq, seq]
scores: on an H200 the bridge ran at 1/1.73 of a plain `transformers` forward (docs/performance.md).

`fuse_attention` replaces that computation, per module, by one fused kernel while nothing needs its inside: the
module is in eval mode, no hook is attached to its scores or pattern, and no option changes the arithmetic
(TransformerLens's compatibility mode, fp32 upcasting, per-head results, attention weights asked for). Otherwise
the call goes to TransformerLens's own code, unchanged, so hooks still see what they always saw. Everything
around the kernel (Q/K/V projections and their hooks, the KV cache, the causal and padding mask, the output
projection and its hooks) is TransformerLens's own code: only the three lines of arithmetic between them change.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge

log = logging.getLogger(__name__)


def fuse_attention(model: torch.nn.Module) -> int:
    """Route every GPT-2-style attention module of `model` through the fused kernel; returns how many.

    Subclasses of `JointQKVAttentionBridge` (ALiBi, rotary, Bloom, CodeGen, ...) compute their scores
    differently and keep TransformerLens's code.
    """
    fused = 0
    for module in model.modules():
        if type(module) is JointQKVAttentionBridge:
            module._reconstruct_attention = functools.partial(_attention, module, module._reconstruct_attention)
            fused += 1
    log.debug("fused attention in %d modules", fused)
    return fused


def _needs_inside(module: JointQKVAttentionBridge, kwargs: dict[str, Any]) -> bool:
    """Whether this call must compute the pattern explicitly (a hook, dropout or an option depends on it)."""
    hooked = any(
        hook._forward_hooks or hook._forward_pre_hooks or hook._backward_hooks
        for hook in (module.hook_attn_scores, module.hook_pattern)
    )
    config = module.config
    return (
        hooked
        or module.training
        or module.compatibility_mode
        or bool(kwargs.get("output_attentions"))
        or bool(getattr(module, "_reorder_and_upcast_attn", False))
        or bool(getattr(config, "use_attn_result", False))
    )


def _attention(module: JointQKVAttentionBridge, bridge_attention, q, k, v, **kwargs) -> tuple:
    """TransformerLens's `_reconstruct_attention` with the scores and pattern fused into one kernel."""
    if _needs_inside(module, kwargs):
        return bridge_attention(q, k, v, **kwargs)
    config = module.config
    n_heads = config.n_heads
    n_kv_heads = getattr(config, "n_key_value_heads", None) or n_heads
    q, k, v, batch_size, seq_len, head_dim = module._reshape_qkv_to_heads(q, k, v, n_heads, n_kv_heads)
    k, v = module._update_kv_cache(k, v, **kwargs)
    scale = head_dim**-0.5
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and module._layer_idx is not None:
        scale /= float(module._layer_idx + 1)
    kv_len = k.shape[-2]
    # The bridge's own mask (causal, plus the caller's padding mask), added to zeros instead of to the scores.
    mask = module._apply_reconstruct_attention_mask(
        attn_scores=q.new_zeros(1, 1, seq_len, kv_len),
        attention_mask=kwargs.get("attention_mask"),
        seq_len=kv_len,
        q_seq_len=seq_len,
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=n_kv_heads != n_heads)
    out = module._reshape_attn_output(out, batch_size, seq_len, n_heads, head_dim)
    return module._apply_output_projection(out), None
