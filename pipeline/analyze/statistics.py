"""What each latent of an SAE does on a split, computed by streaming: never a [tokens x d_sae] matrix.

Three passes over the split's activations, in token order, one SAE encode per block each:
1. per latent: firing count, sum and maximum of its activations, and the top-N activating tokens (a running
   top-k kept on the device: the block's activations are concatenated with the current top-N and cut back to N);
2. per latent: an activation histogram over [0, max] and, for each of `quantiles` equal-width activation
   intervals of [0, max] (as SAE-Dashboard samples them), `per_quantile` tokens drawn uniformly at random from
   those that fell in the interval (a running top-k over random keys per interval, which is a uniform sample);
3. the activation of each latent on every token of its examples' context windows, by encoding just those tokens.

The activations come from an `Activations` source (the training loader is one): in token order, and by token
index. Whether the split is held in memory or streamed from the store within a memory budget is the source's
business; the passes are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.params import AnalyzeConfig
from pipeline.saes.base import SparseAutoencoder


class Activations(Protocol):
    """Where the passes read activations: every analysed token (`n_tokens` of them) in order, or some by index."""

    n_tokens: int

    def in_order(self, block_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(token indices, float32 activations) of every analysed token, in order, `block_tokens` at a time."""
        ...

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 activations of the tokens `positions` (ascending)."""
        ...


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
    source: Activations, sae: SparseAutoencoder, block_tokens: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(token indices, latent activations [block, d_sae]) of every analysed token, in order."""
    device = sae.W_dec.device
    with torch.no_grad():
        for chosen, x in source.in_order(block_tokens):
            yield chosen.to(device), sae.encode(x.to(device, non_blocking=True)).float()


def latent_statistics(
    source: Activations,
    sae: SparseAutoencoder,
    settings: AnalyzeConfig,
    on_block: Callable[[int], None] = lambda n: None,
) -> LatentStatistics:
    """Pass 1: firing counts, sums, maxima and the running top-N per latent.

    Each block's own top-N comes first (one read of the block, no transposed copy), then merges with the running
    one: [2N, d_sae] values, not [N + block, d_sae].
    """
    d_sae, device, n = sae.d_sae, sae.W_dec.device, settings.top_n
    counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
    sums = torch.zeros(d_sae, dtype=torch.float64, device=device)
    top_values = torch.zeros(n, d_sae, device=device)
    top_tokens = torch.full((n, d_sae), -1, dtype=torch.int64, device=device)
    for tokens, acts in blocks(source, sae, settings.batch_tokens):
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
    source: Activations, sae: SparseAutoencoder, maxima: torch.Tensor, settings: AnalyzeConfig, seed: int,
    on_block: Callable[[int], None] = lambda n: None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Pass 2: histograms [d_sae, bins] over [0, max], sampled tokens [d_sae, quantiles, per_quantile] (-1 where
    an interval holds fewer tokens), and how many firing tokens each interval holds [d_sae, quantiles]."""
    d_sae, device = sae.d_sae, sae.W_dec.device
    bins, q, k = settings.histogram_bins, settings.quantiles, settings.per_quantile
    histograms = torch.zeros(d_sae * bins, dtype=torch.int64, device=device)
    in_interval = torch.zeros(d_sae * q, dtype=torch.int64, device=device)
    keys = torch.full((d_sae * q, k), -1.0, device=device)  # random keys of the kept samples; -1 = empty slot
    kept = torch.full((d_sae * q, k), -1, dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for tokens, acts in blocks(source, sae, settings.batch_tokens):
        row, latent = (acts > 0).nonzero(as_tuple=True)
        relative = acts[row, latent] / maxima[latent]
        histograms.index_add_(0, latent * bins + (relative * bins).long().clamp(max=bins - 1),
                              torch.ones_like(latent))  # fmt: skip
        group = latent * q + (relative * q).long().clamp(max=q - 1)
        in_interval.index_add_(0, group, torch.ones_like(group))
        key = torch.rand(len(group), generator=generator, device=device)
        new_keys, new_tokens = _top_per_group(group, key, tokens[row], d_sae * q, k)
        merged_keys, index = torch.cat([keys, new_keys], dim=1).topk(k, dim=1)
        keys, kept = merged_keys, torch.cat([kept, new_tokens], dim=1).gather(1, index)
        on_block(len(tokens))
    kept[keys < 0] = -1
    return histograms.view(d_sae, bins), kept.view(d_sae, q, k), in_interval.view(d_sae, q)


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
    source: Activations, sae: SparseAutoencoder, token: np.ndarray, latent: np.ndarray, block_tokens: int
) -> np.ndarray:
    """Pass 3: the activation of `latent[i]` on token `token[i]` (any token, BOS too), encoding each distinct
    token once."""
    device = sae.W_dec.device
    unique, inverse = np.unique(token, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(0, len(unique) + block_tokens, block_tokens))
    values = np.zeros(len(token), dtype=np.float32)
    unique_t = torch.from_numpy(unique)
    for i, start in enumerate(range(0, len(unique), block_tokens)):
        with torch.no_grad():
            acts = sae.encode(source.rows(unique_t[start : start + block_tokens]).to(device)).float()
        requests = order[bounds[i] : bounds[i + 1]]
        rows = torch.from_numpy(inverse[requests] - i * block_tokens).to(device)
        cols = torch.from_numpy(latent[requests]).to(device)
        values[requests] = acts[rows, cols].cpu().numpy()
    return values
