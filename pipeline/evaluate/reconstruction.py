"""Reconstruction and sparsity of an SAE on stored activations (accumulated in float64).

Definitions (x: an activation, x_hat: its reconstruction, f: latent activations; means are over tokens):
- mse: mean of ||x - x_hat||^2 / d_in (per element);  mse_per_token: mean of ||x - x_hat||^2 (summed over d_in:
  SAELens's and SAEBench's `mse` convention);  normalized_mse: mean of ||x - x_hat||^2 / ||x||^2
- explained_variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
- cosine: mean cos(x, x_hat);  shrinkage: mean ||x_hat|| / ||x||
- l0: mean number of active latents;  l1: mean sum of f (raw-activation units)
- dead latents: never active on the split;  dense latents: active on more than `dense_threshold` of tokens
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.saes.base import SparseAutoencoder

DENSITY_BINS = np.linspace(-7, 0, 29)  # log10 of firing frequency, 0.25 per bin


def reconstruction_metrics(
    sae: SparseAutoencoder,
    blocks: Iterable[torch.Tensor],
    dense_threshold: float,
    on_block: Callable[[int], None] = lambda n_tokens: None,
) -> dict[str, float | int | list]:
    """Reconstruction and sparsity over every activation in `blocks` (accumulated in float64). A transcoder's
    blocks are [input | target] rows (`ActivationLoader` with a target hook), and x below is the target."""
    sums: dict[str, float] = dict.fromkeys(("sq_err", "mse", "nmse", "cos", "shrink", "l0", "l1"), 0.0)
    total_x = total_xx = None
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    for block in blocks:
        source, x = sae.input_and_target(block)
        with torch.no_grad():
            x_hat, f = sae(source)
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        err = (x - x_hat).pow(2).sum(dim=1)
        norm = x.norm(dim=1)
        sums["sq_err"] += err.sum().item()
        sums["mse"] += (err / x.shape[1]).sum().item()
        sums["nmse"] += (err / norm.pow(2)).sum().item()
        sums["cos"] += F.cosine_similarity(x, x_hat, dim=1).sum().item()
        sums["shrink"] += (x_hat.norm(dim=1) / norm).sum().item()
        sums["l0"] += (f > 0).sum().item()
        sums["l1"] += f.sum().item()
        fires += (f > 0).sum(dim=0).cpu()
        total_x = x.sum(0) if total_x is None else total_x + x.sum(0)
        total_xx = x.pow(2).sum() if total_xx is None else total_xx + x.pow(2).sum()
        n += len(x)
        on_block(len(x))
    total_variance = (total_xx - total_x.pow(2).sum() / n).item()  # sum ||x - mean||^2
    frequency = (fires / n).numpy()
    counts, _ = np.histogram(np.log10(np.clip(frequency, 1e-12, None)), bins=DENSITY_BINS)
    dead, dense = int((frequency == 0).sum()), int((frequency > dense_threshold).sum())
    flags = []
    if dead == sae.d_sae:
        flags.append(f"all {sae.d_sae} latents are dead")
    if dense == sae.d_sae:
        flags.append(f"all {sae.d_sae} latents are dense (active on more than {dense_threshold:g} of tokens)")
    return {
        "n_tokens": n,
        "mse": sums["mse"] / n,
        "mse_per_token": sums["sq_err"] / n,
        "normalized_mse": sums["nmse"] / n,
        "explained_variance": 1 - sums["sq_err"] / total_variance,
        "cosine": sums["cos"] / n,
        "shrinkage": sums["shrink"] / n,
        "l0": sums["l0"] / n,
        "l1": sums["l1"] / n,
        "dead_latents": dead,
        "dense_latents": dense,
        "d_sae": sae.d_sae,
        "density_histogram": {
            "log10_frequency_bin_edges": DENSITY_BINS.tolist(),
            "counts": counts.tolist(),
            "dead": dead,
        },
        "flags": flags,
    }
