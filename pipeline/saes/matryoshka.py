"""Matryoshka SAE (Bussmann et al. 2025): BatchTopK whose nested prefixes of latents (the first m for each share
in `matryoshka_prefixes`, and all of them) must each reconstruct the input on their own; the reconstruction term
is the mean of their MSEs. AuxK as TopK; saved as a JumpReLU SAE, as BatchTopK."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.params import SAEConfig
from pipeline.saes.batchtopk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    saebench_architecture = "matryoshka_batch_topk"
    settings = ("k", "matryoshka_prefixes", "k_aux", "aux_coeff", "dead_tokens")
    options = ("k", "matryoshka_prefixes")
    reconstruction_term = "matryoshka"

    def __init__(
        self, d_in: int, d_sae: int, k: int, matryoshka_prefixes: Sequence[float],
        generator: torch.Generator | None = None, **shape,
    ) -> None:  # fmt: skip
        super().__init__(d_in, d_sae, k, generator, **shape)
        self.matryoshka_prefixes = tuple(matryoshka_prefixes)

    def prefix_ends(self) -> list[int]:
        """The number of latents in each nested prefix, the last being all of them."""
        ends = {max(1, round(share * self.d_sae)) for share in self.matryoshka_prefixes} | {self.d_sae}
        return sorted(ends)

    def loss_terms(self, x, pre, f, x_hat, cfg: SAEConfig) -> dict[str, torch.Tensor]:
        return {"matryoshka": self.prefix_mse(f, x), "auxk": self.auxk(pre, x - x_hat.detach(), cfg)}

    def prefix_mse(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mean over the nested prefixes of the MSE of reconstructing x from that prefix's latents alone."""
        partial, start, total = self.b_dec, 0, 0.0
        ends = self.prefix_ends()
        for end in ends:
            partial = partial + f[:, start:end] @ self.W_dec[start:end]
            total = total + (partial.float() - x).pow(2).mean()
            start = end
        return total / len(ends)
