"""The interface every SAE architecture implements, and what they share.

    pre = (x - b_dec) @ W_enc + b_enc        f = activate(pre)        x_hat = f @ W_dec + b_dec

Architectures differ in `activate` and in the terms of their loss (`loss_terms`); everything else is here.
Decoder rows are kept at unit norm (renormalised after every optimiser step), so a sparsity penalty on f is the
penalty on each latent's contribution f_i * ||W_dec[i]||, and cannot be dodged by shrinking f while growing W_dec
(relu can instead leave the norms free and weigh its L1 by them: pipeline/saes/relu.py).
Training happens on inputs multiplied by a constant `scale` with E||scale * x||^2 = d_in; `folded(scale)` returns
the equivalent SAE on raw activations (the pre-activations, hence k and thresholds, are unchanged), which is what
is saved for users.

The loss is the architecture's reconstruction term + decorrelation_coeff * decorrelation + its penalty, where
decorrelation is the mean squared cosine between distinct decoder rows. A config's settings (`SAEConfig`,
resolved against the train section) reach an SAE in two ways: those its forward pass needs are constructor
arguments named as the settings are (`options`, saved with the SAE); those only its loss needs are read from the
config at each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.params import SAEConfig


class SparseAutoencoder(nn.Module):
    """An SAE with unit-norm decoder rows and an encoder initialised from the decoder."""

    name: ClassVar[str]  # its name in params (`sae.<key>.architecture`) and in pipeline/saes's registry
    settings: ClassVar[tuple[str, ...]]  # the per-config settings its forward pass and loss use (the report's rows)
    options: ClassVar[tuple[str, ...]] = ()  # the settings its forward pass needs: constructor arguments, saved
    saelens_architecture: ClassVar[str]  # the SAELens architecture whose formula its saved tensors follow
    saebench_architecture: ClassVar[str | None] = None  # SAEBench's name for it, where not its SAELens one's
    reconstruction_term: ClassVar[str] = "mse"  # the loss term that measures reconstruction
    penalty: ClassVar[tuple[str, str]]  # (loss term, the setting that weights it)
    sets_l0_by_penalty: ClassVar[bool] = False  # its penalty's weight decides L0 (so a target L0 can steer it)

    def __init__(
        self, d_in: int, d_sae: int, generator: torch.Generator | None = None, d_out: int | None = None,
        skip: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.transcoder = d_out is not None  # reads one activation and predicts another (`d_out` wide)
        self.d_out = d_in if d_out is None else d_out
        w_dec = torch.randn(d_sae, self.d_out, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if self.d_out == d_in:
            self.W_enc = nn.Parameter(w_dec.T * self.encoder_scale())
        else:  # no decoder to mirror: random directions of the same norm
            w_enc = torch.randn(d_in, d_sae, generator=generator)
            self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True) * self.encoder_scale())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.skip = skip
        if skip:  # a skip transcoder's linear path, [d_out, d_in] as SAELens stores it; starts at zero
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in))

    @classmethod
    def from_config(
        cls, d_in: int, cfg: SAEConfig, generator: torch.Generator | None = None, d_out: int | None = None
    ) -> SparseAutoencoder:
        """The SAE a resolved config describes, on inputs of width `d_in` (predicting `d_out`-wide targets for a
        transcoder)."""
        options = {name: getattr(cfg, name) for name in cls.options}
        shape = {"d_out": d_out, "skip": cfg.skip} if cfg.target_hook else {}
        return cls(d_in, cfg.width(d_in), generator=generator, **options, **shape)

    def option_values(self) -> dict[str, Any]:
        """The constructor settings this SAE was built with (what a copy of it needs)."""
        return {name: getattr(self, name) for name in self.options}

    def shape(self) -> dict[str, Any]:
        """A transcoder's constructor arguments beyond an SAE's (what a copy of it needs too)."""
        return {"d_out": self.d_out, "skip": self.skip} if self.transcoder else {}

    def encoder_scale(self) -> float:
        """The encoder starts as the decoder's transpose times this: d_sae half-active random directions
        reconstruct a random input to about its norm times d_sae / 2 d_in."""
        return 2 * self.d_in / self.d_sae

    # addmm fuses the bias into the matrix product: one pass fewer over [tokens, d_sae] than `@` then `+`.
    # It takes 2-D inputs, so any leading dimensions ([batch, pos, d]) are flattened and restored.
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.transcoder:  # b_dec lives in the target's space: the input is not centred by it
            return torch.addmm(self.b_enc, x.reshape(-1, self.d_in), self.W_enc)
        return torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, self.d_in), self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations [n, d_sae] from pre-activations [n, d_sae]."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x)).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f.reshape(-1, self.d_sae), self.W_dec).reshape(*f.shape[:-1], self.d_out)

    def input_and_target(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What it reads and what it should give back, from a loader block: a transcoder's blocks are [input |
        target] rows (`ActivationLoader` with a target hook); an SAE's input is its target."""
        return (block[:, : self.d_in], block[:, self.d_in :]) if self.transcoder else (block, block)

    def skip_path(self, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's linear prediction W_skip x."""
        return x @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (a transcoder's prediction of its target) and latent activations."""
        f = self.encode(x)
        out = self.decode(f)
        return (out + self.skip_path(x) if self.skip else out), f

    def training_loss(
        self,
        x: torch.Tensor,
        cfg: SAEConfig,
        logged: bool = True,
        over_ranks: bool = False,
        target: torch.Tensor | None = None,
        coefficient: torch.Tensor | None = None,
        guide: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its terms (fp32): the architecture's own (`loss_terms`), decorrelation, and
        on a `logged` step the diagnostics every architecture reports (mse per element, L1 per token, L0).

        Updates the SAE's training statistics (`observe`). A term the loss does not use costs a pass over the
        [batch, d_sae] latents or the decoder, so it is computed only for a step that is `logged`. `over_ranks`:
        `x` is this rank's share of a batch split over ranks (see `observe`). A transcoder predicts `target` from
        `x` (an SAE reconstructs `x`); a skip transcoder's dictionary explains what its linear path does not,
        `target - W_skip x`, which is the same loss with every architecture's terms unchanged. `coefficient`, when
        given, weights the penalty instead of the config's setting (a target-L0 run's adapted value), and L0 is then
        computed on every step. `guide`, when given, is a term of the reconstruction added to the loss with the
        config's `guide.coeff` (probe-guided training, pipeline/probe/guide.py).
        """
        target = x if target is None else target
        pre = self.pre_activations(x)
        f = self.activate(pre)
        x_hat = self.decode(f)
        self.observe(f.detach(), over_ranks)
        terms = {}
        if self.skip:
            skipped = self.skip_path(x)
            if logged:  # what the linear path alone leaves unexplained
                terms["skip_mse"] = mse(skipped + self.b_dec, target).detach()
            target = target - skipped
        terms |= self.loss_terms(target, pre, f, x_hat, cfg)
        if logged:
            terms.setdefault("mse", mse(x_hat, target))
            terms.setdefault("l1", l1(f))
        if cfg.decorrelation_coeff or logged:
            terms["decorrelation"] = decorrelation(self.decoder_directions().float())
        loss = terms[self.reconstruction_term]
        if cfg.decorrelation_coeff:
            loss = loss + cfg.decorrelation_coeff * terms["decorrelation"]
        term, setting = self.penalty
        loss = loss + (getattr(cfg, setting) if coefficient is None else coefficient) * terms[term]
        if guide is not None:
            terms["guide"] = guide(x_hat)
            loss = loss + cfg.guide.coeff * terms["guide"]
        if logged or coefficient is not None:
            terms["l0"] = (f > 0).sum(dim=1).float().mean().detach()
        return loss, terms

    def loss_terms(
        self, x: torch.Tensor, pre: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, cfg: SAEConfig
    ) -> dict[str, torch.Tensor]:
        """The terms this architecture's loss is made of: its `reconstruction_term` and its `penalty` term."""
        raise NotImplementedError

    @torch.no_grad()
    def start_near_l0(self, x: torch.Tensor, target_l0: float) -> None:
        """Before training toward `target_l0`: an architecture whose initial L0 can be set from data does so on the
        sample `x` (none by default)."""

    @torch.no_grad()
    def steer_l0(self, error: torch.Tensor) -> None:
        """While a target-L0 run adapts, after each step: `error` = clamp(log(L0 / target), -1, 1) of the batch.
        An architecture whose L0 follows its sparsity coefficient too slowly moves it directly (none by default)."""

    @torch.no_grad()
    def observe(self, f: torch.Tensor, over_ranks: bool = False) -> None:
        """Training statistics from one batch's activations (none by default)."""

    def decoder_directions(self) -> torch.Tensor:
        """The decoder rows as unit vectors (what decorrelation measures): the rows themselves, kept at unit norm."""
        return self.W_dec

    @torch.no_grad()
    def after_step(self) -> None:
        """The constraints every optimiser step restores: unit decoder rows."""
        self.W_dec /= decoder_norms(self.W_dec)[:, None]

    @torch.no_grad()
    def folded(self, scale: float, target_scale: float | None = None) -> SparseAutoencoder:
        """The same SAE expressed on raw inputs x, when it was trained on scale * x (and a transcoder on
        target_scale * y, default `scale`), in inference mode."""
        target_scale = scale if target_scale is None else target_scale
        raw = type(self)(self.d_in, self.d_sae, **self.option_values(), **self.shape()).eval()
        raw.load_state_dict(self.state_dict())
        raw.W_enc.mul_(scale)
        raw.W_dec.div_(target_scale)
        raw.b_dec.div_(target_scale)
        if self.skip:
            raw.W_skip.mul_(scale / target_scale)
        return raw


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element, in fp32."""
    return (x_hat.float() - x).pow(2).mean()


def l1(f: torch.Tensor) -> torch.Tensor:
    """Sum of the latent activations per token, averaged over tokens, in fp32."""
    return f.float().sum(dim=1).mean()


def decoder_norms(w_dec: torch.Tensor) -> torch.Tensor:
    """Each decoder row's norm, kept away from zero so that dividing by it is safe."""
    return w_dec.norm(dim=1).clamp_min(1e-8)


def keep_top(values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """`values` with all but the k largest along `dim` set to zero."""
    top = values.topk(min(k, values.shape[dim]), dim=dim, sorted=False)
    return torch.zeros_like(values).scatter(dim, top.indices, top.values)


def decorrelation(w_dec: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct decoder directions.

    sum_{i != j} (d_i . d_j)^2 = ||W_dec W_dec^T||_F^2 - sum_i ||d_i||^4, and ||W W^T||_F = ||W^T W||_F, so the
    d_in x d_in Gram matrix gives the exact value at d_sae * d_in^2 cost instead of d_sae^2 * d_in.
    """
    gram = w_dec.T @ w_dec
    norms_sq = (w_dec * w_dec).sum(dim=1)
    n = w_dec.shape[0]
    return ((gram * gram).sum() - (norms_sq * norms_sq).sum()) / (n * (n - 1))
