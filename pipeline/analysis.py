"""What each latent of an SAE learned, computed by streaming over a split: never a [tokens x d_sae] matrix.

Three passes over the split's activations, in token order, one SAE encode per block each:
1. per latent: firing count, sum and maximum of its activations, and the top-N activating tokens (a running
   top-k kept on the device: the block's activations are concatenated with the current top-N and cut back to N);
2. per latent: an activation histogram over [0, max] and, for each of `quantiles` equal-width activation
   intervals of [0, max] (as SAE-Dashboard samples them), `per_quantile` tokens drawn uniformly at random from
   those that fell in the interval (a running top-k over random keys per interval, which is a uniform sample);
3. the activation of each latent on every token of its examples' context windows, by encoding just those tokens.

Direct logit effects: the decoder direction through the final LayerNorm and the unembedding. The LayerNorm is
accounted for by its centring and its weight γ; its division by the norm is a positive factor common to every
vocabulary token, so it changes no ranking, and its bias does not depend on the latent. The path through the
layers after the hook is not included ("direct" effect).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import AnalyzeConfig
from pipeline.sae import SparseAutoencoder

ACTIVATION_SCALE = 1000  # context activations are stored as integers: thousandths of the latent's maximum


@dataclass
class LatentStatistics:
    """Pass 1's results, one row per latent (tensors on the analysis device)."""

    counts: torch.Tensor  # [d_sae] tokens on which the latent fired
    sums: torch.Tensor  # [d_sae] sum of its activations
    top_values: torch.Tensor  # [d_sae, top_n], descending; 0 where it fired on fewer tokens
    top_tokens: torch.Tensor  # [d_sae, top_n] token index in the split

    @property
    def maxima(self) -> torch.Tensor:
        """[d_sae] each latent's largest activation (0 for a dead one)."""
        return self.top_values[:, 0]


def blocks(
    data: torch.Tensor, positions: torch.Tensor, sae: SparseAutoencoder, block_tokens: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token indices, latent activations [block, d_sae]) over `positions` of `data`, in order."""
    device = sae.W_dec.device
    with torch.no_grad():
        for start in range(0, len(positions), block_tokens):
            chosen = positions[start : start + block_tokens]
            x = data[chosen.to(data.device)].to(device, non_blocking=True).float()
            yield chosen.to(device), sae.encode(x).float()


def latent_statistics(
    data: torch.Tensor, positions: torch.Tensor, sae: SparseAutoencoder, settings: AnalyzeConfig,
    on_block: Callable[[int], None] = lambda n: None,
) -> LatentStatistics:  # fmt: skip
    """Pass 1: firing counts, sums, maxima and the running top-N per latent.

    Each block's own top-N comes first (one read of the block, no transposed copy), then merges with the running
    one: [2N, d_sae] values, not [N + block, d_sae].
    """
    d_sae, device, n = sae.d_sae, sae.W_dec.device, settings.top_n
    counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
    sums = torch.zeros(d_sae, dtype=torch.float64, device=device)
    top_values = torch.zeros(n, d_sae, device=device)
    top_tokens = torch.full((n, d_sae), -1, dtype=torch.int64, device=device)
    for tokens, acts in blocks(data, positions, sae, settings.batch_tokens):
        counts += torch.count_nonzero(acts, dim=0)  # every architecture's activations are >= 0
        sums += acts.sum(0).double()
        block_values, block_rows = acts.topk(min(n, len(tokens)), dim=0)
        values = torch.cat([top_values, block_values])
        top_values, index = values.topk(n, dim=0)
        top_tokens = torch.cat([top_tokens, tokens[block_rows]]).gather(0, index)
        on_block(len(tokens))
    top_tokens[top_values <= 0] = -1
    return LatentStatistics(counts, sums, top_values.T.contiguous(), top_tokens.T.contiguous())


def histograms_and_quantile_samples(
    data: torch.Tensor, positions: torch.Tensor, sae: SparseAutoencoder, maxima: torch.Tensor,
    settings: AnalyzeConfig, seed: int, on_block: Callable[[int], None] = lambda n: None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Pass 2: histograms [d_sae, bins] over [0, max], and sampled tokens [d_sae, quantiles, per_quantile] (-1 where
    an interval holds fewer tokens)."""
    d_sae, device = sae.d_sae, sae.W_dec.device
    bins, q, k = settings.histogram_bins, settings.quantiles, settings.per_quantile
    histograms = torch.zeros(d_sae * bins, dtype=torch.int64, device=device)
    keys = torch.full((d_sae * q, k), -1.0, device=device)  # random keys of the kept samples; -1 = empty slot
    kept = torch.full((d_sae * q, k), -1, dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for tokens, acts in blocks(data, positions, sae, settings.batch_tokens):
        row, latent = (acts > 0).nonzero(as_tuple=True)
        relative = acts[row, latent] / maxima[latent]
        histograms.index_add_(0, latent * bins + (relative * bins).long().clamp(max=bins - 1),
                              torch.ones_like(latent))  # fmt: skip
        group = latent * q + (relative * q).long().clamp(max=q - 1)
        key = torch.rand(len(group), generator=generator, device=device)
        new_keys, new_tokens = _top_per_group(group, key, tokens[row], d_sae * q, k)
        merged_keys, index = torch.cat([keys, new_keys], dim=1).topk(k, dim=1)
        keys, kept = merged_keys, torch.cat([kept, new_tokens], dim=1).gather(1, index)
        on_block(len(tokens))
    kept[keys < 0] = -1
    return histograms.view(d_sae, bins), kept.view(d_sae, q, k)


def _top_per_group(
    group: torch.Tensor, key: torch.Tensor, token: torch.Tensor, n_groups: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group, the (up to) k entries of largest key: keys [n_groups, k] (-1 = none) and their tokens."""
    order = key.argsort(descending=True)
    order = order[group[order].argsort(stable=True)]  # grouped, largest key first within each group
    group, key, token = group[order], key[order], token[order]
    first = torch.searchsorted(group, group, side="left")
    rank = torch.arange(len(group), device=group.device) - first
    keep = rank < k
    keys = torch.full((n_groups, k), -1.0, device=key.device)
    tokens = torch.full((n_groups, k), -1, dtype=torch.int64, device=key.device)
    keys[group[keep], rank[keep]] = key[keep]
    tokens[group[keep], rank[keep]] = token[keep]
    return keys, tokens


def context_windows(tokens: np.ndarray, offsets: np.ndarray, centre: np.ndarray, window: int):
    """For token indices `centre`: (document, position in it, first and end token index of the ±window span
    clipped to the document)."""
    doc = np.searchsorted(offsets, centre, side="right") - 1
    lo = np.maximum(offsets[doc], centre - window)
    hi = np.minimum(offsets[doc + 1], centre + window + 1)
    return doc, centre - offsets[doc], lo, hi


def activations_at(
    data: torch.Tensor, sae: SparseAutoencoder, token: np.ndarray, latent: np.ndarray, block_tokens: int
) -> np.ndarray:
    """Pass 3: the activation of `latent[i]` on token `token[i]`, encoding each distinct token once."""
    device = sae.W_dec.device
    unique, inverse = np.unique(token, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(0, len(unique) + block_tokens, block_tokens))
    values = np.zeros(len(token), dtype=np.float32)
    unique_t = torch.from_numpy(unique)
    for i, (_, acts) in enumerate(blocks(data, unique_t, sae, block_tokens)):
        requests = order[bounds[i] : bounds[i + 1]]
        rows = torch.from_numpy(inverse[requests] - i * block_tokens).to(device)
        cols = torch.from_numpy(latent[requests]).to(device)
        values[requests] = acts[rows, cols].cpu().numpy()
    return values


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


def analyze(
    sae: SparseAutoencoder,
    data: torch.Tensor,
    positions: torch.Tensor,
    tokens: np.ndarray,
    offsets: np.ndarray,
    settings: AnalyzeConfig,
    seed: int,
    vocabulary: Vocabulary | None,
    on_block: Callable[[int], None] = lambda n: None,
) -> dict:
    """Everything the feature browser shows, for every latent: a JSON-ready dict (format: `feature_record`).

    `data` holds the split's activations by token index, `positions` the tokens to analyse (BOS excluded or not,
    as in training), `tokens`/`offsets` the split's token ids and document boundaries.
    """
    stats = latent_statistics(data, positions, sae, settings, on_block)
    histograms, samples = histograms_and_quantile_samples(data, positions, sae, stats.maxima, settings, seed, on_block)
    d_sae = sae.d_sae
    top, sampled = stats.top_tokens.cpu().numpy(), samples.cpu().numpy()
    # Every example as one row, per latent: its valid top tokens, then each interval's samples (valid ones first).
    candidates = np.concatenate([top, sampled.reshape(d_sae, -1)], axis=1)
    latent, _ = np.nonzero(candidates >= 0)
    centre = candidates[candidates >= 0]
    doc, position, lo, hi = context_windows(tokens, offsets, centre, settings.window)
    lengths = hi - lo
    ends = np.cumsum(lengths)
    window_tokens = np.repeat(lo - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
    window_acts = activations_at(data, sae, window_tokens, np.repeat(latent, lengths), settings.batch_tokens)
    maxima = stats.maxima.cpu().numpy()
    scaled = np.rint(window_acts / np.maximum(np.repeat(maxima[latent], lengths), 1e-30) * ACTIVATION_SCALE)
    # Python lists once, then slices of them: per-example numpy calls would dominate on a GPU machine.
    ids, acts = tokens[window_tokens].tolist(), scaled.astype(np.int64).tolist()
    context = [
        [d, p, a, ids[e - n : e], acts[e - n : e]]
        for d, p, a, n, e in zip(doc.tolist(), position.tolist(), (centre - lo).tolist(), lengths.tolist(),
                                 ends.tolist(), strict=True)
    ]  # fmt: skip
    logit_rows = _logit_rows(sae, vocabulary, settings.logit_tokens)
    counts, sums, maxima_l = stats.counts.tolist(), stats.sums.tolist(), maxima.tolist()
    hist = histograms.tolist()
    n_top, n_sampled = (top >= 0).sum(1).tolist(), (sampled >= 0).sum(2).tolist()
    features, cursor = [], 0
    for j in range(d_sae):
        mine = context[cursor : cursor + n_top[j] + sum(n_sampled[j])]
        cursor += len(mine)
        features.append(feature_record(j, counts[j], sums[j], maxima_l[j], len(positions), mine[: n_top[j]],
                                       mine[n_top[j] :], n_sampled[j], hist[j], logit_rows[j]))  # fmt: skip
    used = set(ids)
    for row in filter(None, logit_rows):
        used |= {t for t, _ in row["top"] + row["bottom"]}
    return {
        "d_sae": sae.d_sae,
        "n_tokens": len(positions),
        "activation_scale": ACTIVATION_SCALE,
        "window": settings.window,
        "quantiles": settings.quantiles,
        "histogram_bins": settings.histogram_bins,
        "logit_note": None if vocabulary is None else LOGIT_NOTE,
        "vocab": None if vocabulary is None else {str(t): vocabulary.decode(t) for t in sorted(used)},
        "features": features,
    }


LOGIT_NOTE = (
    "Direct logit effect: the decoder direction, centred and scaled by the final LayerNorm's weight, through the "
    "unembedding. The LayerNorm's division by the norm scales every token alike and is left out; so are the layers "
    "after the hook."
)


def _logit_rows(sae: SparseAutoencoder, vocabulary: Vocabulary | None, n: int) -> list[dict | None]:
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


def feature_record(
    j: int, count: int, total: float, maximum: float, n_tokens: int, top: list, sampled_contexts: list,
    per_quantile: list[int], histogram: list[int], logits: dict | None,
) -> dict:  # fmt: skip
    """One latent: `top` and each quantile's `examples` are [document, position, index of the token in the
    window, window token ids, activations in thousandths of `max`]; `top_token` is the commonest token among the
    top examples' activating tokens, with its share. `per_quantile`: how many of `sampled_contexts` each
    equal-width interval of [0, max] holds, in order."""
    quantiles, cursor, q = [], 0, len(per_quantile)
    for i, n in enumerate(per_quantile):
        quantiles.append({"range": [maximum * i / q, maximum * (i + 1) / q],
                          "examples": sampled_contexts[cursor : cursor + n]})  # fmt: skip
        cursor += n
    centres = [example[3][example[2]] for example in top]
    commonest = max(set(centres), key=centres.count) if centres else None
    return {
        "id": j,
        "frequency": count / n_tokens,
        "mean": total / count if count else 0.0,  # over the tokens it fires on
        "max": maximum,
        "top_token": None if commonest is None else [commonest, centres.count(commonest) / len(centres)],
        "top": top,
        "quantiles": quantiles,
        "histogram": histogram,
        "logits": logits,
    }
