"""BatchTopK SAE (Bussmann et al. 2024): in training, the k * n largest ReLU(pre) of a batch of n tokens, k per
token on average; at inference f = pre * (pre > threshold), one threshold for all latents: an EMA of each
training batch's smallest selected activation. AuxK as TopK.

Saved as a JumpReLU SAE with that threshold for every latent, as SAELens's own BatchTopK trainer saves it.
"""

from __future__ import annotations

import torch

from pipeline.saes.base import keep_top
from pipeline.saes.topk import TopKSAE

THRESHOLD_RATE = 0.01  # EMA rate of the inference threshold estimate


class BatchTopKSAE(TopKSAE):
    name = "batchtopk"
    saelens_architecture = "jumprelu"
    saebench_architecture = "batch_topk"

    def __init__(self, d_in: int, d_sae: int, k: int, generator: torch.Generator | None = None, **shape) -> None:
        super().__init__(d_in, d_sae, k, generator, **shape)
        self.register_buffer("threshold", torch.zeros(d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))  # training state

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return keep_top(torch.relu(pre).flatten(), self.k * len(pre), dim=-1).reshape(pre.shape)
        return pre * (pre > self.threshold)

    def batch_statistics(self, f: torch.Tensor) -> torch.Tensor:
        """Fired latents, then minus the smallest selected activation (-inf when nothing fired), without a sync:
        the maximum over ranks of its negative is the smallest over the whole batch."""
        smallest = -torch.where(f > 0, f.float(), torch.inf).min().reshape(1)
        return torch.cat([super().batch_statistics(f), smallest])

    def update_from_batch(self, extra: torch.Tensor) -> None:
        smallest = -extra[0]
        seen = torch.isfinite(smallest)
        rate = torch.where(self.threshold_updates == 0, 1.0, THRESHOLD_RATE)
        updated = self.threshold + rate * (smallest - self.threshold)
        self.threshold.copy_(torch.where(seen, updated, self.threshold))
        self.threshold_updates += seen
