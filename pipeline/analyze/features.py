"""Everything the feature browser shows, for every latent: the three passes' results as one JSON-ready payload."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.analyze.logits import Vocabulary, logit_note, logit_rows
from pipeline.analyze.statistics import (
    Activations,
    activations_at,
    context_windows,
    histograms_and_quantile_samples,
    latent_statistics,
)
from pipeline.params import AnalyzeConfig
from pipeline.saes.base import SparseAutoencoder

ACTIVATION_SCALE = 1000  # context activations are stored as integers: thousandths of the latent's maximum


def analyze(
    sae: SparseAutoencoder,
    source: Activations,
    tokens: np.ndarray,
    offsets: np.ndarray,
    settings: AnalyzeConfig,
    seed: int,
    vocabulary: Vocabulary | None,
    on_block: Callable[[int], None] = lambda n: None,
) -> dict:
    """Everything the feature browser shows, for every latent: a JSON-ready dict (format: `feature_record`).

    `source` gives the split's activations (the tokens to analyse, BOS excluded or not as in training; or any
    token by index), `tokens`/`offsets` the split's token ids and document boundaries.
    """
    stats = latent_statistics(source, sae, settings, on_block)
    histograms, samples, in_interval = histograms_and_quantile_samples(
        source, sae, stats.maxima, settings, seed, on_block
    )
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
    window_acts = activations_at(source, sae, window_tokens, np.repeat(latent, lengths), settings.batch_tokens)
    maxima = stats.maxima.cpu().numpy()
    scaled = np.rint(window_acts / np.maximum(np.repeat(maxima[latent], lengths), 1e-30) * ACTIVATION_SCALE)
    # Python lists once, then slices of them: per-example numpy calls would dominate on a GPU machine.
    ids, acts = tokens[window_tokens].tolist(), scaled.astype(np.int64).tolist()
    context = [
        [d, p, a, ids[e - n : e], acts[e - n : e]]
        for d, p, a, n, e in zip(doc.tolist(), position.tolist(), (centre - lo).tolist(), lengths.tolist(),
                                 ends.tolist(), strict=True)
    ]  # fmt: skip
    logits = logit_rows(sae, vocabulary, settings.logit_tokens)
    counts, sums, maxima_l = stats.counts.tolist(), stats.sums.tolist(), maxima.tolist()
    hist = histograms.tolist()
    n_top, n_sampled = (top >= 0).sum(1).tolist(), (sampled >= 0).sum(2).tolist()
    interval_counts = in_interval.tolist()
    features, cursor = [], 0
    for j in range(d_sae):
        mine = context[cursor : cursor + n_top[j] + sum(n_sampled[j])]
        cursor += len(mine)
        features.append(feature_record(j, counts[j], sums[j], maxima_l[j], source.n_tokens, mine[: n_top[j]],
                                       mine[n_top[j] :], n_sampled[j], interval_counts[j], hist[j],
                                       logits[j]))  # fmt: skip
    used = set(ids)
    for row in filter(None, logits):
        used |= {t for t, _ in row["top"] + row["bottom"]}
    return {
        "d_sae": sae.d_sae,
        "n_tokens": source.n_tokens,
        "activation_scale": ACTIVATION_SCALE,
        "window": settings.window,
        "quantiles": settings.quantiles,
        "histogram_bins": settings.histogram_bins,
        "logit_note": None if vocabulary is None else logit_note(vocabulary),
        "vocab": None if vocabulary is None else {str(t): vocabulary.decode(t) for t in sorted(used)},
        "features": features,
    }


def feature_record(
    j: int, count: int, total: float, maximum: float, n_tokens: int, top: list, sampled_contexts: list,
    per_quantile: list[int], interval_counts: list[int], histogram: list[int], logits: dict | None,
) -> dict:  # fmt: skip
    """One latent: `top` and each quantile's `examples` are [document, position, index of the token in the
    window, window token ids, activations in thousandths of `max`]; `top_token` is the commonest token among the
    top examples' activating tokens, with its share. `per_quantile`: how many of `sampled_contexts` each
    equal-width interval of [0, max] holds, in order; `interval_counts`: how many firing tokens each holds."""
    quantiles, cursor, q = [], 0, len(per_quantile)
    for i, n in enumerate(per_quantile):
        quantiles.append({"range": [maximum * i / q, maximum * (i + 1) / q], "count": interval_counts[i],
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
