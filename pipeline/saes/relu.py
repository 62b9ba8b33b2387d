"""ReLU SAE with an L1 penalty, the reference report's SAE: f = ReLU(pre); loss = MSE + l1_coeff * L1.

`relu_decoder_norm` says how the L1 meets the decoder's scale:
- free (default): decoder rows keep whatever norm training gives them, starting at FREE_INIT_NORM, and the L1 weighs
  each latent by its row's norm, sum_i f_i * ||W_dec[i]|| (Anthropic's April 2024 update, which SAELens's Standard
  SAE follows). The penalty is still on each latent's contribution, and it cannot be dodged by rescaling.
- unit: rows renormalised after every step and the L1 on f, as every other architecture (the seed's recipe).
On the synthetic ground-truth profile free more than doubles relu's F1 at the same L0 (docs/performance.md).
Either way the saved SAE's rows are unit vectors on the scaled inputs, as every architecture's: `folded` moves
each free row's norm into its encoder column and bias, which a ReLU lets through unchanged
(relu(n * pre) = n * relu(pre) for n > 0), so users and SAELens get the same function in the usual form.
"""

from __future__ import annotations

import torch

from pipeline.params import SAEConfig
from pipeline.saes.base import SparseAutoencoder, decoder_norms, l1, mse

# Free rows start this short, as Anthropic's and SAELens's recipes: measured on the synthetic profile, starting at
# norm 1 instead left L0 short of its target with explained variance 0.04 (docs/performance.md).
FREE_INIT_NORM = 0.1


class ReLUSAE(SparseAutoencoder):
    name = "relu"
    settings = ("l1_coeff", "relu_decoder_norm")
    options = ("relu_decoder_norm",)
    saelens_architecture = "standard"
    penalty = ("l1", "l1_coeff")
    sets_l0_by_penalty = True

    def __init__(
        self, d_in: int, d_sae: int, relu_decoder_norm: str = "free", generator: torch.Generator | None = None,
        **shape,
    ) -> None:  # fmt: skip
        super().__init__(d_in, d_sae, generator, **shape)
        self.relu_decoder_norm = relu_decoder_norm
        if self.free_norms:  # the same directions, shorter; the encoder stays the decoder's scaled transpose
            with torch.no_grad():
                self.W_dec.mul_(FREE_INIT_NORM)
                self.W_enc.mul_(FREE_INIT_NORM)

    @property
    def free_norms(self) -> bool:
        return self.relu_decoder_norm == "free"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss_terms(self, x, pre, f, x_hat, cfg: SAEConfig) -> dict[str, torch.Tensor]:
        if self.free_norms:
            return {"mse": mse(x_hat, x), "l1": (f.float() * decoder_norms(self.W_dec.float())).sum(dim=1).mean()}
        return {"mse": mse(x_hat, x), "l1": l1(f)}

    def decoder_directions(self) -> torch.Tensor:
        if self.free_norms:
            return self.W_dec / decoder_norms(self.W_dec)[:, None]
        return self.W_dec

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.free_norms:
            super().after_step()

    @torch.no_grad()
    def folded(self, scale: float, target_scale: float | None = None) -> SparseAutoencoder:
        raw = super().folded(scale, target_scale)
        if not self.free_norms:
            return raw
        norms = decoder_norms(self.W_dec)
        raw.W_dec.div_(norms[:, None])
        raw.W_enc.mul_(norms)
        raw.b_enc.mul_(norms)
        return raw
