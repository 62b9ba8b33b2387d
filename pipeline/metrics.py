"""Evaluation metrics: reconstruction and sparsity on stored activations, and the cost of splicing into the model.

Definitions (x: an activation, x_hat: its reconstruction, f: latent activations; means are over tokens):
- mse: mean of ||x - x_hat||^2 / d_in (per element);  normalized_mse: mean of ||x - x_hat||^2 / ||x||^2
- explained_variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
- cosine: mean cos(x, x_hat);  shrinkage: mean ||x_hat|| / ||x||
- l0: mean number of active latents;  l1: mean sum of f (raw-activation units)
- dead latents: never active on the split;  dense latents: active on more than `dense_threshold` of tokens
- splice scores: CE loss score (CE_zero - CE_sae) / (CE_zero - CE_clean), KL score (KL_zero - KL_sae) / KL_zero,
  where the hook's activations are replaced by the reconstruction (sae) or by zeros (zero), BOS positions kept.
  A score is undefined (None) when its denominator is not positive: zero-ablation does not hurt the model
  (e.g. random weights), so "share of the ablation's damage recovered" means nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.extraction import padded, plan_batches
from pipeline.sae import SparseAutoencoder

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
DENSITY_BINS = np.linspace(-7, 0, 29)  # log10 of firing frequency, 0.25 per bin


def reconstruction_metrics(
    sae: SparseAutoencoder, blocks: Iterable[torch.Tensor], dense_threshold: float
) -> dict[str, float | int | list]:
    """Reconstruction and sparsity over every activation in `blocks` (accumulated in float64)."""
    sums: dict[str, float] = dict.fromkeys(("sq_err", "mse", "nmse", "cos", "shrink", "l0", "l1"), 0.0)
    total_x = total_xx = None
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    n = 0
    for x in blocks:
        with torch.no_grad():
            x_hat, f = sae(x)
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
    total_variance = (total_xx - total_x.pow(2).sum() / n).item()  # sum ||x - mean||^2
    frequency = (fires / n).numpy()
    counts, _ = np.histogram(np.log10(np.clip(frequency, 1e-12, None)), bins=DENSITY_BINS)
    return {
        "n_tokens": n,
        "mse": sums["mse"] / n,
        "normalized_mse": sums["nmse"] / n,
        "explained_variance": 1 - sums["sq_err"] / total_variance,
        "cosine": sums["cos"] / n,
        "shrinkage": sums["shrink"] / n,
        "l0": sums["l0"] / n,
        "l1": sums["l1"] / n,
        "dead_latents": int((frequency == 0).sum()),
        "dense_latents": int((frequency > dense_threshold).sum()),
        "d_sae": sae.d_sae,
        "density_histogram": {
            "log10_frequency_bin_edges": DENSITY_BINS.tolist(),
            "counts": counts.tolist(),
            "dead": int((frequency == 0).sum()),
        },
    }


def splice_scores(
    model,
    tokens: np.ndarray,
    offsets: np.ndarray,
    hook: str,
    reconstructions: dict[str, Reconstruct],
    batch_tokens: int,
) -> dict[str, dict[str, float]]:
    """Per entry of `reconstructions`: CE and KL of the model with `hook` replaced by it, by zeros, and untouched.

    The clean and zero-ablated passes do not depend on the SAE, so each batch runs them once for all SAEs.
    """
    device = next(model.parameters()).device
    lengths = np.diff(offsets)
    totals = {
        key: dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0) for key in reconstructions
    }
    n_predicted = 0
    for batch in plan_batches(lengths, np.arange(len(lengths)), batch_tokens):
        ids, mask = padded(batch, tokens, offsets, device)
        predicted = mask[:, 1:].bool()  # positions whose next token is a real token
        targets = ids[:, 1:][predicted]

        clean = _log_probs(model, ids, mask, predicted, hook, None)
        zero = _log_probs(model, ids, mask, predicted, hook, torch.zeros_like)
        ce_clean = F.nll_loss(clean, targets, reduction="sum").item()
        ce_zero = F.nll_loss(zero, targets, reduction="sum").item()
        kl_zero = F.kl_div(zero, clean, log_target=True, reduction="sum").item()
        del zero
        for key, reconstruct in reconstructions.items():
            spliced = _log_probs(model, ids, mask, predicted, hook, reconstruct)
            sums = totals[key]
            sums["ce_clean"] += ce_clean
            sums["ce_zero"] += ce_zero
            sums["kl_zero"] += kl_zero
            sums["ce_sae"] += F.nll_loss(spliced, targets, reduction="sum").item()
            sums["kl_sae"] += F.kl_div(spliced, clean, log_target=True, reduction="sum").item()
        n_predicted += int(predicted.sum())
    return {key: _scores(sums, n_predicted, len(lengths)) for key, sums in totals.items()}


def _scores(sums: dict[str, float], n_predicted: int, n_docs: int) -> dict[str, float | None]:
    """Mean CE/KL and the scores; a score is None (undefined) when zero-ablation does not hurt the model."""
    means = {k: v / n_predicted for k, v in sums.items()}
    ce_gap = means["ce_zero"] - means["ce_clean"]
    return {
        **means,
        "ce_loss_score": (means["ce_zero"] - means["ce_sae"]) / ce_gap if ce_gap > 0 else None,
        "kl_score": (means["kl_zero"] - means["kl_sae"]) / means["kl_zero"] if means["kl_zero"] > 0 else None,
        "ce_delta": means["ce_sae"] - means["ce_clean"],
        "n_docs": n_docs,
        "n_predicted_tokens": n_predicted,
    }


def _log_probs(
    model, ids: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor, hook: str, replace: Reconstruct | None
) -> torch.Tensor:
    """Next-token log-probabilities at the `predicted` positions, with `hook` replaced by `replace` (or not)."""

    def splice(activation: torch.Tensor, hook=None) -> torch.Tensor:
        patched = replace(activation.float()).to(activation.dtype)
        patched[:, 0] = activation[:, 0]  # the BOS position is never replaced (SAEs are not trained on it)
        return patched

    hooks = [] if replace is None else [(hook, splice)]
    with torch.inference_mode():
        logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks, return_type="logits")
    return logits[:, :-1][predicted].float().log_softmax(-1)
