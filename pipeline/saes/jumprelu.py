"""JumpReLU SAE (Rajamanoharan et al. 2024): f = pre * (pre > threshold_i), per-latent thresholds trained through
straight-through estimators with a rectangle kernel of width `jumprelu_bandwidth`, and an L0 penalty (the same
estimator), weighted by `l0_coeff`."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.params import SAEConfig
from pipeline.saes.base import SparseAutoencoder, mse

THRESHOLD_GAIN = 0.01  # steer_l0: thresholds move by at most 1% a step toward the target L0


class JumpReLUSAE(SparseAutoencoder):
    name = "jumprelu"
    settings = ("l0_coeff", "jumprelu_bandwidth", "jumprelu_initial_threshold")
    options = ("jumprelu_bandwidth", "jumprelu_initial_threshold")
    saelens_architecture = "jumprelu"
    penalty = ("l0_penalty", "l0_coeff")
    sets_l0_by_penalty = True

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        jumprelu_bandwidth: float,
        jumprelu_initial_threshold: float,
        generator: torch.Generator | None = None,
        **shape,
    ) -> None:
        super().__init__(d_in, d_sae, generator, **shape)
        self.jumprelu_bandwidth = jumprelu_bandwidth
        self.jumprelu_initial_threshold = jumprelu_initial_threshold
        self.threshold = nn.Parameter(torch.full((d_sae,), jumprelu_initial_threshold))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return _JumpReLU.apply(pre, self.threshold, self.jumprelu_bandwidth)
        return pre * (pre > self.threshold)

    def loss_terms(self, x, pre, f, x_hat, cfg: SAEConfig) -> dict[str, torch.Tensor]:
        l0 = _Step.apply(pre, self.threshold, self.jumprelu_bandwidth).float().sum(dim=1).mean()
        if cfg.target_l0 is not None:  # target-relative: pulls toward the target from both sides
            return {"mse": mse(x_hat, x), "l0_penalty": (l0 / cfg.target_l0 - 1).square()}
        return {"mse": mse(x_hat, x), "l0_penalty": l0}

    @torch.no_grad()
    def start_near_l0(self, x: torch.Tensor, target_l0: float) -> None:
        """Each threshold at the quantile of its latent's pre-activations on `x` above which a share
        target_l0 / d_sae of tokens lie, so that training starts at about the target L0 rather than wherever a
        constant threshold puts it (never below 0)."""
        share = min(1.0, target_l0 / self.d_sae)
        quantiles = torch.quantile(self.pre_activations(x).float(), 1.0 - share, dim=0)
        self.threshold.copy_(quantiles.clamp_min(0.0))

    @torch.no_grad()
    def steer_l0(self, error: torch.Tensor) -> None:
        """Every threshold scaled by exp(THRESHOLD_GAIN * error). Adam moves a threshold by about lr a step
        whatever the penalty's weight, and the encoder moves the pre-activations faster than that: on the
        synthetic profile L0 followed the same path for coefficients 100x apart (docs/training.md)."""
        self.threshold.mul_(torch.exp(THRESHOLD_GAIN * error))

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.threshold.clamp_(min=0.0)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold's gradient through a rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth) / ctx.bandwidth
        grad_threshold = (-(threshold * kernel) * grad).sum(dim=0)
        return grad * (pre > threshold), grad_threshold.to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """1[pre > threshold]; gradient to the threshold only, through the same estimator (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = _rectangle((pre - threshold) / ctx.bandwidth) / ctx.bandwidth
        return None, (-kernel * grad).sum(dim=0).to(threshold.dtype), None
