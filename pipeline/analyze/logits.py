"""Direct logit effects: what each latent's decoder direction promotes and suppresses in the model's output.

The direction goes through the model's own final norm and the unembedding. A LayerNorm (GPT-2, GPT-NeoX) is
accounted for by its centring and its weight γ; an RMSNorm (Llama, Qwen2, Gemma) by its effective per-dimension
scale, without centring (Gemma's is 1 + w). Whether the norm centres, and an RMSNorm's scale, are read off the
norm module itself (`final_norm`), so no family is named here. The division by the norm is a positive factor
common to every vocabulary token, so it changes no ranking, and a LayerNorm's bias does not depend on the latent.
The path through the layers after the hook is not included ("direct" effect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.saes.base import SparseAutoencoder


def direct_logits(directions: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """[n, vocab] direct logit effects of `directions` [n, d_model] through the final norm and the unembedding."""
    directions = directions.float()
    if vocabulary.centred:
        directions = directions - directions.mean(dim=1, keepdim=True)
    if vocabulary.ln_weight is not None:
        directions = directions * vocabulary.ln_weight.float()
    return directions @ vocabulary.unembed.float()


def logit_effects(
    sae: SparseAutoencoder, vocabulary: Vocabulary, n: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom `n` vocabulary entries of each decoder direction's direct logit effect:
    (top values, top ids, bottom values, bottom ids)."""
    outputs: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for start in range(0, sae.d_sae, chunk):
            logits = direct_logits(sae.W_dec[start : start + chunk], vocabulary)
            top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
            for out, value in zip(outputs, (top.values, top.indices, bottom.values, bottom.indices), strict=True):
                out.append(value.cpu())
    return tuple(torch.cat(parts) for parts in outputs)  # type: ignore[return-value]


@dataclass
class Vocabulary:
    """How the analysis names tokens: the model's unembedding (with its final norm's centring and scale) and a
    decoder of token ids to text. None on synthetic data, which has no model."""

    unembed: torch.Tensor  # [d_model, vocab]
    ln_weight: torch.Tensor | None  # the final norm's per-dimension scale; None where it has none (folded away)
    decode: Callable[[int], str]
    centred: bool = True  # whether the final norm subtracts the mean (LayerNorm) or not (RMSNorm)


def vocabulary_of(model, device: torch.device) -> Vocabulary:
    """The unembedding, the final norm (`final_norm`) and the tokenizer of a TransformerBridge model."""
    centred, scale = final_norm(getattr(model.ln_final, "_original_component", model.ln_final))
    tokenizer = model.tokenizer
    return Vocabulary(
        unembed=model.W_U.detach().float().to(device),
        ln_weight=None if scale is None else scale.detach().float().to(device),
        decode=lambda token: tokenizer.decode([token]),
        centred=centred,
    )


def final_norm(norm: torch.nn.Module) -> tuple[bool, torch.Tensor | None]:
    """(centres, per-dimension scale) of a final norm module, read off the module.

    A norm that centres gives the same output for x and x + c (LayerNorm); its scale is its `weight` (None where
    weight processing folded it away). One that does not is an RMSNorm, x / rms(x) * s: its output for a vector of
    ones is s / sqrt(1 + eps), whatever its formula for s (w, or Gemma's 1 + w).
    """
    weight = getattr(norm, "weight", None)
    shape = getattr(norm, "normalized_shape", None)
    d_model = weight.shape[0] if weight is not None else shape[0] if shape else None
    if d_model is None:  # nothing to probe with: a LayerNorm without parameters, as weight processing leaves it
        return True, None
    dtype, device = (torch.float32, "cpu") if weight is None else (weight.dtype, weight.device)
    probe = torch.linspace(-1.0, 2.0, d_model, dtype=dtype, device=device)
    with torch.no_grad():
        centres = torch.allclose(norm(probe).float(), norm(probe + 3.0).float(), rtol=1e-3, atol=1e-3)
        if centres:
            return True, None if weight is None else weight.detach()
        eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 0.0) or 0.0)
        return False, norm(torch.ones(d_model, dtype=dtype, device=device)).float() * (1.0 + eps) ** 0.5


def logit_note(vocabulary: Vocabulary) -> str:
    """What the browser says the logit effects are."""
    norm = "centred and scaled by the final LayerNorm's weight" if vocabulary.centred else (
        "scaled by the final RMSNorm's per-dimension scale (no centring)")  # fmt: skip
    kind = "LayerNorm" if vocabulary.centred else "RMSNorm"
    return (
        f"Direct logit effect: the decoder direction, {norm}, through the unembedding. The {kind}'s division by "
        "the norm scales every token alike and is left out; so are the layers after the hook."
    )


def logit_rows(sae: SparseAutoencoder, vocabulary: Vocabulary | None, n: int) -> list[dict | None]:
    """Per latent, its top and bottom `n` logit effects as [token id, value] pairs (None without a model)."""
    if vocabulary is None:
        return [None] * sae.d_sae
    top_v, top_i, bottom_v, bottom_i = (x.tolist() for x in logit_effects(sae, vocabulary, n))
    return [
        {"top": [[t, round(v, 4)] for v, t in zip(tv, ti, strict=True)],
         "bottom": [[t, round(v, 4)] for v, t in zip(bv, bi, strict=True)]}
        for tv, ti, bv, bi in zip(top_v, top_i, bottom_v, bottom_i, strict=True)
    ]  # fmt: skip
