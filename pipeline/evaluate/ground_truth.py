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

from pipeline.core.matching import cosines, one_to_one
from pipeline.saes.base import SparseAutoencoder
from pipeline.synth.generator import SAMPLE_CHUNK, SyntheticModel, cosine_baseline, sample_generator


def abs_cosines(decoder: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|cos| between every decoder row and every true direction: [d_sae, n_features], in float32 (the matrix of
    a full-size benchmark is 4,096 x 16,384)."""
    return cosines(decoder, truth, torch.float32).abs()


def mcc(abs_cos: torch.Tensor) -> float:
    """Mean |cos| of the optimal one-to-one matching (rows: latents, columns: true features)."""
    rows, cols = one_to_one(abs_cos)
    return float(abs_cos.double().cpu().numpy()[rows, cols].mean())


@torch.no_grad()
def ground_truth_metrics(
    saes: dict[str, SparseAutoencoder], model: SyntheticModel, n_samples: int, seed: int
) -> dict[str, dict]:
    """MCC, per-latent precision/recall/F1 and uniqueness of each SAE against `model`'s true features (every SAE
    sees the same fresh samples, generated once)."""
    device = model.directions.device
    counts = {key: _Counts(sae, model) for key, sae in saes.items()}
    true_l0 = 0.0
    for index, start in enumerate(range(0, n_samples, SAMPLE_CHUNK)):
        generator = sample_generator(seed, "evaluation", index, device)
        x, a = model.sample(min(SAMPLE_CHUNK, n_samples - start), generator)
        true_l0 += (a > 0).sum().item()
        for key, sae in saes.items():
            counts[key].add(sae.encode(x) > 0, a > 0)
    shared = {"n_samples": n_samples, "true_l0": true_l0 / n_samples, "n_features": model.n_features,
              "random_direction_cosine": cosine_baseline(model.directions.shape[1])}  # fmt: skip
    return {key: {**counts[key].metrics(), **shared} for key in saes}


class _Counts:
    """Per-latent firing counts against the latent's best-matching true feature."""

    def __init__(self, sae: SparseAutoencoder, model: SyntheticModel) -> None:
        self.cosines = abs_cosines(sae.W_dec, model.directions)
        self.best = self.cosines.argmax(dim=1)
        zeros = torch.zeros(sae.d_sae, dtype=torch.float64, device=model.directions.device)
        self.fires, self.both, self.truly_active = zeros, zeros.clone(), zeros.clone()

    def add(self, fired: torch.Tensor, active: torch.Tensor) -> None:
        matched = active[:, self.best]
        self.fires += fired.sum(dim=0)
        self.both += (fired & matched).sum(dim=0)
        self.truly_active += matched.sum(dim=0)

    def metrics(self) -> dict:
        alive = self.fires > 0
        precision = self.both[alive] / self.fires[alive]
        recall = torch.where(
            self.truly_active[alive] > 0, self.both[alive] / self.truly_active[alive].clamp_min(1), 0.0
        )
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
        n_alive = int(alive.sum().item())
        mean = (lambda v: float(v.mean().item())) if n_alive else (lambda v: None)
        return {
            "mcc": mcc(self.cosines),
            "f1": mean(f1),
            "precision": mean(precision),
            "recall": mean(recall),
            "uniqueness": len(np.unique(self.best[alive].cpu().numpy())) / n_alive if n_alive else None,
            "n_alive_latents": n_alive,
        }
