"""TopK SAE (Gao et al. 2024): the k largest ReLU(pre) of each token; an AuxK loss revives dead latents.

AuxK: latents that have not fired for `dead_tokens` tokens are dead; the top `k_aux` of their pre-activations
reconstruct the main reconstruction's error, and that MSE, times `aux_coeff`, is added to the loss.
"""

from __future__ import annotations

import torch

from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.params import SAEConfig
from pipeline.saes.base import SparseAutoencoder, keep_top, mse


class TopKSAE(SparseAutoencoder):
    name = "topk"
    settings = ("k", "k_aux", "aux_coeff", "dead_tokens")
    options = ("k",)
    saelens_architecture = "topk"
    penalty = ("auxk", "aux_coeff")

    def __init__(self, d_in: int, d_sae: int, k: int, generator: torch.Generator | None = None, **shape) -> None:
        if k > d_sae:
            raise PipelineError(f"k={k} is more than its {d_sae} latents")
        super().__init__(d_in, d_sae, generator, **shape)
        self.k = k
        # training state: tokens since each latent last fired (AuxK's definition of dead); not saved for users
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    def encoder_scale(self) -> float:
        return 1.0  # k active latents reconstruct with the k largest projections, unscaled

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return keep_top(torch.relu(pre), self.k, dim=-1)

    def loss_terms(self, x, pre, f, x_hat, cfg: SAEConfig) -> dict[str, torch.Tensor]:
        return {"mse": mse(x_hat, x), "auxk": self.auxk(pre, x - x_hat.detach(), cfg)}

    def auxk(self, pre: torch.Tensor, residual: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
        """MSE of reconstructing the main reconstruction's error from the top k_aux dead latents (0 if none is)."""
        dead = self.tokens_since_fired >= cfg.dead_tokens
        if not bool(dead.any()):  # one sync per step, only for the topk family
            return torch.zeros((), device=pre.device)
        f_dead = keep_top(torch.relu(pre[:, dead]), cfg.k_aux, dim=-1)
        return (f_dead @ self.W_dec[dead] - residual.float()).float().pow(2).mean()

    @torch.no_grad()
    def observe(self, f: torch.Tensor, over_ranks: bool = False) -> None:
        """Which latents fired in this batch (for AuxK), and any statistics a subclass adds (`batch_statistics`).

        `over_ranks`: `f` is this rank's share of a batch split over ranks (data-parallel training), and the
        statistics are those of the whole batch: a latent fired if it fired on any rank (one small all-reduce).
        """
        batch = self.batch_statistics(f)
        n_tokens = len(f)
        if over_ranks:
            distributed.maximum_(batch)
            n_tokens *= distributed.world_size()
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[batch[: self.d_sae] > 0] = 0
        self.update_from_batch(batch[self.d_sae :])

    def batch_statistics(self, f: torch.Tensor) -> torch.Tensor:
        """[d_sae] 1 where the latent fired, then any statistics a subclass appends; merged over ranks by MAX."""
        return (f > 0).any(dim=0).float()

    def update_from_batch(self, extra: torch.Tensor) -> None:
        """Use the statistics a subclass appended in `batch_statistics` (none here)."""
