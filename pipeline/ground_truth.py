"""How well an SAE recovers the true features of synthetic data (the metrics SynthSAEBench reports).

- mcc: optimal one-to-one matching (Hungarian algorithm) of decoder rows to true feature directions by |cos|;
  the mean |cos| over the min(d_sae, n_features) matched pairs. 1 = every latent is a true feature.
- precision, recall, f1: each latent as a detector of its best-matching true feature (highest |cos|, not
  necessarily one-to-one), over fresh samples: precision = P(feature active | latent fires), recall =
  P(latent fires | feature active). Means over the latents that fired at least once (dead latents are counted
  separately, in the reconstruction metrics).
- uniqueness: distinct best-matching features / latents that fired.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.sae import SparseAutoencoder
from pipeline.synthetic import SAMPLE_CHUNK, SyntheticModel, cosine_baseline, sample_generator

EVALUATION_PURPOSE = 2  # seeds evaluation samples apart from the store's train (0) and test (1) samples


def abs_cosines(decoder: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|cos| between every decoder row and every true direction: [d_sae, n_features]."""
    normalize = torch.nn.functional.normalize
    return (normalize(decoder.float(), dim=1) @ normalize(truth.float(), dim=1).T).abs()


def mcc(cosines: torch.Tensor) -> float:
    """Mean |cos| of the optimal one-to-one matching (rows: latents, columns: true features)."""
    values = cosines.double().cpu().numpy()
    rows, cols = linear_sum_assignment(values, maximize=True)
    return float(values[rows, cols].mean())


@torch.no_grad()
def ground_truth_metrics(sae: SparseAutoencoder, model: SyntheticModel, n_samples: int, seed: int) -> dict:
    """MCC, per-latent precision/recall/F1 and uniqueness of `sae` against `model`'s true features."""
    device = model.directions.device
    cosines = abs_cosines(sae.W_dec, model.directions)
    best = cosines.argmax(dim=1)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    both = torch.zeros_like(fires)
    truly_active = torch.zeros_like(fires)
    true_l0 = 0.0
    for index, start in enumerate(range(0, n_samples, SAMPLE_CHUNK)):
        x, a = model.sample(min(SAMPLE_CHUNK, n_samples - start), sample_generator(seed, EVALUATION_PURPOSE, index,
                                                                                   device))  # fmt: skip
        fired = sae.encode(x) > 0
        active = a[:, best] > 0
        fires += fired.sum(dim=0)
        both += (fired & active).sum(dim=0)
        truly_active += active.sum(dim=0)
        true_l0 += (a > 0).sum().item()
    alive = fires > 0
    precision = both[alive] / fires[alive]
    recall = torch.where(truly_active[alive] > 0, both[alive] / truly_active[alive].clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    n_alive = int(alive.sum().item())
    mean = (lambda v: float(v.mean().item())) if n_alive else (lambda v: None)
    return {
        "mcc": mcc(cosines),
        "f1": mean(f1),
        "precision": mean(precision),
        "recall": mean(recall),
        "uniqueness": len(np.unique(best[alive].cpu().numpy())) / n_alive if n_alive else None,
        "n_alive_latents": n_alive,
        "n_samples": n_samples,
        "true_l0": true_l0 / n_samples,
        "n_features": model.n_features,
        "random_direction_cosine": cosine_baseline(model.directions.shape[1]),
    }
