"""Direct logit effects: what each latent's decoder direction promotes and suppresses in the model's output.

The direction goes through the final LayerNorm and the unembedding. The LayerNorm is accounted for by its centring
and its weight γ; its division by the norm is a positive factor common to every vocabulary token, so it changes no
ranking, and its bias does not depend on the latent. The path through the layers after the hook is not included
("direct" effect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.saes.base import SparseAutoencoder


def logit_effects(
    sae: SparseAutoencoder, unembed: torch.Tensor, ln_weight: torch.Tensor | None, n: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom `n` vocabulary entries of each decoder direction through the final LayerNorm's centring and
    weight and the unembedding `unembed` [d_model, vocab]: (top values, top ids, bottom values, bottom ids)."""
    outputs: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for start in range(0, sae.d_sae, chunk):
            direction = sae.W_dec[start : start + chunk].float()
            direction = direction - direction.mean(dim=1, keepdim=True)
            if ln_weight is not None:
                direction = direction * ln_weight.float()
            logits = direction @ unembed.float()
            top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
            for out, value in zip(outputs, (top.values, top.indices, bottom.values, bottom.indices), strict=True):
                out.append(value.cpu())
    return tuple(torch.cat(parts) for parts in outputs)  # type: ignore[return-value]


@dataclass
class Vocabulary:
    """How the analysis names tokens: the model's unembedding (with its final LayerNorm's weight) and a decoder
    of token ids to text. None on synthetic data, which has no model."""

    unembed: torch.Tensor  # [d_model, vocab]
    ln_weight: torch.Tensor | None
    decode: Callable[[int], str]


def vocabulary_of(model, device: torch.device) -> Vocabulary:
    """The unembedding, final LayerNorm weight (None where weight processing folded it away) and tokenizer of a
    TransformerBridge model."""
    ln = getattr(model.ln_final, "_original_component", model.ln_final)
    weight = getattr(ln, "weight", None)
    tokenizer = model.tokenizer
    return Vocabulary(
        unembed=model.W_U.detach().float().to(device),
        ln_weight=None if weight is None else weight.detach().float().to(device),
        decode=lambda token: tokenizer.decode([token]),
    )


LOGIT_NOTE = (
    "Direct logit effect: the decoder direction, centred and scaled by the final LayerNorm's weight, through the "
    "unembedding. The LayerNorm's division by the norm scales every token alike and is left out; so are the layers "
    "after the hook."
)


def logit_rows(sae: SparseAutoencoder, vocabulary: Vocabulary | None, n: int) -> list[dict | None]:
    """Per latent, its top and bottom `n` logit effects as [token id, value] pairs (None without a model)."""
    if vocabulary is None:
        return [None] * sae.d_sae
    top_v, top_i, bottom_v, bottom_i = (x.tolist() for x in logit_effects(sae, vocabulary.unembed,
                                                                          vocabulary.ln_weight, n))  # fmt: skip
    return [
        {"top": [[t, round(v, 4)] for v, t in zip(tv, ti, strict=True)],
         "bottom": [[t, round(v, 4)] for v, t in zip(bv, bi, strict=True)]}
        for tv, ti, bv, bi in zip(top_v, top_i, bottom_v, bottom_i, strict=True)
    ]  # fmt: skip
