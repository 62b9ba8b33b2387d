"""ReLU SAE with an L1 penalty, the reference report's SAE: f = ReLU(pre); loss = MSE + l1_coeff * L1."""

from __future__ import annotations

import torch

from pipeline.params import SAEConfig
from pipeline.saes.base import SparseAutoencoder, l1, mse


class ReLUSAE(SparseAutoencoder):
    name = "relu"
    settings = ("l1_coeff",)
    saelens_architecture = "standard"
    penalty = ("l1", "l1_coeff")
    sets_l0_by_penalty = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss_terms(self, x, pre, f, x_hat, cfg: SAEConfig) -> dict[str, torch.Tensor]:
        return {"mse": mse(x_hat, x), "l1": l1(f)}
