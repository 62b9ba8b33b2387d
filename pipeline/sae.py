"""The sparse autoencoder: architectures, loss terms, initialisation, and saving in SAELens's layout.

    pre = (x - b_dec) @ W_enc + b_enc        f = activation(pre)        x_hat = f @ W_dec + b_dec

The architectures differ only in `activation` and in the sparsity term of the loss:
- relu:       f = ReLU(pre); L1 penalty on f (the reference report's SAE).
- topk:       the k largest ReLU(pre) of each token (Gao et al. 2024); AuxK loss revives dead latents.
- batchtopk:  the k * n largest ReLU(pre) of a batch of n tokens, k per token on average (Bussmann et al. 2024);
              at inference f = pre * (pre > threshold), one threshold estimated during training; AuxK as topk.
- jumprelu:   f = pre * (pre > threshold_i), per-latent thresholds trained through straight-through estimators
              with a rectangle kernel of width `bandwidth`, and an L0 penalty (Rajamanoharan et al. 2024).
- matryoshka: batchtopk whose nested prefixes of latents (the first m for each m in `prefixes`) must each
              reconstruct the input on their own (Bussmann et al. 2025); the loss is the mean of their MSEs.

Decoder rows are kept at unit norm (renormalised after every optimiser step), so an L1 penalty on f is the
penalty on each latent's contribution f_i * ||W_dec[i]||, and cannot be dodged by shrinking f while growing W_dec.
Training happens on inputs multiplied by a constant `scale` with E||scale * x||^2 = d_in; `folded(scale)` returns
the equivalent SAE on raw activations (the pre-activations, hence k and thresholds, are unchanged), which is what
is saved for users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import distributed
from pipeline.atomic import atomic_path
from pipeline.config import ARCHITECTURES
from pipeline.errors import PipelineError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
BATCH_SELECTED = ("batchtopk", "matryoshka")  # k * batch latents per batch in training, a threshold at inference
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")  # k latents per token; AuxK revives dead ones
WITH_THRESHOLD = ("batchtopk", "jumprelu", "matryoshka")
TRAINING_STATE = ("tokens_since_fired", "threshold_updates")  # buffers only training needs (not saved for users)
# SAELens's architecture name for the saved inference SAE: BatchTopK and Matryoshka SAEs are saved as JumpReLU
# SAEs with one shared threshold, as SAELens's own BatchTopK and Matryoshka trainers save them.
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                        "matryoshka": "jumprelu"}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """What the forward pass needs to know besides the weights."""

    name: str = "relu"
    k: int = 32  # topk: active latents per token; batchtopk/matryoshka: per token on average over a batch
    bandwidth: float = 0.05  # jumprelu: width of the straight-through estimators' rectangle kernel
    initial_threshold: float = 0.01  # jumprelu: every threshold's starting value
    prefixes: tuple[float, ...] = ()  # matryoshka: where nested prefixes end, as shares of d_sae (d_sae implied)
    threshold_rate: float = 0.01  # batchtopk/matryoshka: EMA rate of the inference threshold estimate

    def __post_init__(self) -> None:
        if self.name not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.name!r}; choose from {', '.join(ARCHITECTURES)}")


class SparseAutoencoder(nn.Module):
    """An SAE with unit-norm decoder rows and an encoder initialised from the decoder."""

    def __init__(
        self, d_in: int, d_sae: int, architecture: Architecture | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.architecture = architecture or Architecture()
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # The encoder starts as the decoder's transpose, scaled so that the initial reconstruction of a random
        # input has about the input's norm: d_sae half-active random directions give ~ d_sae / 2d_in * x; k active
        # ones (the topk family), the k largest projections, unscaled.
        self.W_enc = nn.Parameter(w_dec.T * (1.0 if self.architecture.name in TOPK_FAMILY else 2 * d_in / d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        name = self.architecture.name
        if name == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), self.architecture.initial_threshold))
        elif name in BATCH_SELECTED:
            self.register_buffer("threshold", torch.zeros(d_sae))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        if name in TOPK_FAMILY:  # training state: tokens since each latent last fired (AuxK's definition of dead)
            self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    # addmm fuses the bias into the matrix product: one pass fewer over [tokens, d_sae] than `@` then `+`.
    # It takes 2-D inputs, so any leading dimensions ([batch, pos, d]) are flattened and restored.
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, self.d_in), self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations [n, d_sae] from pre-activations [n, d_sae]; batch selection only in training mode."""
        name, k = self.architecture.name, self.architecture.k
        if name == "relu":
            return torch.relu(pre)
        if name == "topk":
            return keep_top(torch.relu(pre), k, dim=-1)
        if name in BATCH_SELECTED and self.training:
            return keep_top(torch.relu(pre).flatten(), k * len(pre), dim=-1).reshape(pre.shape)
        if name == "jumprelu" and self.training:
            return _JumpReLU.apply(pre, self.threshold, self.architecture.bandwidth)
        return pre * (pre > self.threshold)  # jumprelu, or a batch-selected SAE at inference

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x)).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f.reshape(-1, self.d_sae), self.W_dec).reshape(*f.shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and latent activations."""
        f = self.encode(x)
        return self.decode(f), f

    def prefix_ends(self) -> list[int]:
        """Matryoshka: the number of latents in each nested prefix, the last being all of them."""
        ends = {max(1, round(share * self.d_sae)) for share in self.architecture.prefixes} | {self.d_sae}
        return sorted(ends)

    @torch.no_grad()
    def after_step(self) -> None:
        """The constraints every optimiser step restores: unit decoder rows, non-negative thresholds."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if self.architecture.name == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def observe(self, f: torch.Tensor, over_ranks: bool = False) -> None:
        """Training statistics from one batch's activations: firing for AuxK, the batch threshold estimate.

        `over_ranks`: `f` is this rank's share of a batch split over ranks (data-parallel training), and the
        statistics are those of the whole batch: a latent fired if it fired on any rank, the smallest selected
        activation is the smallest on any rank (one small all-reduce).
        """
        if self.architecture.name not in TOPK_FAMILY:
            return
        selected = self.architecture.name in BATCH_SELECTED
        # [fired per latent, -smallest selected activation (batch-selected only; -inf when nothing fired)]
        batch = (f > 0).any(dim=0).float()
        if selected:  # without a device sync
            batch = torch.cat([batch, -torch.where(f > 0, f.float(), torch.inf).min().reshape(1)])
        n_tokens = len(f)
        if over_ranks:
            distributed.maximum_(batch)
            n_tokens *= distributed.world_size()
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[batch[: self.d_sae] > 0] = 0
        if selected:
            smallest = -batch[-1]
            seen = torch.isfinite(smallest)
            rate = torch.where(self.threshold_updates == 0, 1.0, self.architecture.threshold_rate)
            updated = self.threshold + rate * (smallest - self.threshold)
            self.threshold.copy_(torch.where(seen, updated, self.threshold))
            self.threshold_updates += seen

    @torch.no_grad()
    def folded(self, scale: float) -> SparseAutoencoder:
        """The same SAE expressed on raw inputs x, when it was trained on scale * x (in inference mode)."""
        raw = SparseAutoencoder(self.d_in, self.d_sae, self.architecture).eval()
        raw.load_state_dict(self.state_dict())
        raw.W_enc.mul_(scale)
        raw.W_dec.div_(scale)
        raw.b_dec.div_(scale)
        return raw


def keep_top(values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    top = values.topk(min(k, values.shape[dim]), dim=dim, sorted=False)
    return torch.zeros_like(values).scatter(dim, top.indices, top.values)


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


def decorrelation(w_dec: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct decoder directions.

    sum_{i != j} (d_i . d_j)^2 = ||W_dec W_dec^T||_F^2 - sum_i ||d_i||^4, and ||W W^T||_F = ||W^T W||_F, so the
    d_in x d_in Gram matrix gives the exact value at d_sae * d_in^2 cost instead of d_sae^2 * d_in.
    """
    gram = w_dec.T @ w_dec
    norms_sq = (w_dec * w_dec).sum(dim=1)
    n = w_dec.shape[0]
    return ((gram * gram).sum() - (norms_sq * norms_sq).sum()) / (n * (n - 1))


@dataclass(frozen=True)
class LossCoefficients:
    """Weights of the loss terms; each architecture uses the sparsity term that is its own (see `training_loss`)."""

    l1: float = 5e-3  # relu
    decorrelation: float = 1.0  # every architecture
    l0: float = 1e-3  # jumprelu
    aux: float = 1 / 32  # topk, batchtopk, matryoshka: AuxK
    k_aux: int = 512  # AuxK: dead latents used to reconstruct the residual
    dead_tokens: int = 1_000_000  # AuxK: a latent that has not fired for this many tokens is dead


def training_loss(
    sae: SparseAutoencoder, x: torch.Tensor, coeffs: LossCoefficients, logged: bool = True, over_ranks: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise and its terms (fp32): mse per element, L1 per token, decorrelation, and the
    architecture's own: l0_penalty (jumprelu), auxk (topk family), matryoshka (mean MSE over prefixes).

    Updates the SAE's training statistics (dead latents, batch threshold). A term the loss does not use (L1 outside
    relu, decorrelation at coefficient 0, the full MSE of matryoshka) and L0 (detached) each cost a pass over the
    [batch, d_sae] latents or the decoder, so they are computed only for a step that is `logged`. `over_ranks`: `x`
    is this rank's share of a batch split over ranks (see `observe`).
    """
    name = sae.architecture.name
    pre = sae.pre_activations(x)
    f = sae.activate(pre)
    x_hat = sae.decode(f)
    sae.observe(f.detach(), over_ranks)
    terms = {}
    if name != "matryoshka" or logged:
        terms["mse"] = (x_hat.float() - x).pow(2).mean()
    if name == "relu" or logged:
        terms["l1"] = f.float().sum(dim=1).mean()
    if coeffs.decorrelation or logged:
        terms["decorrelation"] = decorrelation(sae.W_dec.float())
    if name == "matryoshka":
        terms["matryoshka"] = _prefix_mse(sae, f, x)
    loss = terms["matryoshka"] if name == "matryoshka" else terms["mse"]
    if coeffs.decorrelation:
        loss = loss + coeffs.decorrelation * terms["decorrelation"]
    if name == "relu":
        loss = loss + coeffs.l1 * terms["l1"]
    elif name == "jumprelu":
        terms["l0_penalty"] = _Step.apply(pre, sae.threshold, sae.architecture.bandwidth).float().sum(dim=1).mean()
        loss = loss + coeffs.l0 * terms["l0_penalty"]
    if name in TOPK_FAMILY:
        terms["auxk"] = _auxk(sae, pre, x - x_hat.detach(), coeffs)
        loss = loss + coeffs.aux * terms["auxk"]
    if logged:
        terms["l0"] = (f > 0).sum(dim=1).float().mean().detach()
    return loss, terms


def _prefix_mse(sae: SparseAutoencoder, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the nested prefixes of the MSE of reconstructing x from that prefix's latents alone."""
    partial, start, total = sae.b_dec, 0, 0.0
    ends = sae.prefix_ends()
    for end in ends:
        partial = partial + f[:, start:end] @ sae.W_dec[start:end]
        total = total + (partial.float() - x).pow(2).mean()
        start = end
    return total / len(ends)


def _auxk(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, coeffs: LossCoefficients):
    """MSE of reconstructing the main reconstruction's error from the top k_aux dead latents (0 if none is dead)."""
    dead = sae.tokens_since_fired >= coeffs.dead_tokens
    if not bool(dead.any()):  # one sync per step, only for the topk family
        return torch.zeros((), device=pre.device)
    f_dead = keep_top(torch.relu(pre[:, dead]), coeffs.k_aux, dim=-1)
    return (f_dead @ sae.W_dec[dead] - residual.float()).float().pow(2).mean()


def save_saelens(sae: SparseAutoencoder, directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens's `SAE.load_from_disk` reads them.

    The architecture goes where SAELens looks for it (see SAELENS_ARCHITECTURE); ours is kept in the metadata.
    The metadata (model_name, hook_name, ...) is written at the top level as well as under "metadata": SAELens 6
    reads a cfg.json without a `sae_lens_version` through its pre-6.0 path, which takes these keys from the top
    level (checked with SAELens 6.54 in a separate environment; it pins transformer-lens<4, so not in our tests).
    """
    arch = sae.architecture
    metadata = {**metadata, "architecture": arch.name, "k": arch.k, "matryoshka_prefixes": list(arch.prefixes)}
    config = {
        **metadata,
        "architecture": SAELENS_ARCHITECTURE[arch.name],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch.name == "topk":
        config |= {"k": arch.k, "rescale_acts_by_decoder_norm": False}
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch.name in WITH_THRESHOLD else ())
    state = sae.state_dict()
    weights = {name: state[name].detach().float().cpu().contiguous() for name in names}
    with atomic_path(directory, owned=is_saelens_folder) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / SAELENS_WEIGHTS)
        (tmp / SAELENS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def is_saelens_folder(path: Path) -> bool:
    """Whether `path` holds an SAE folder (a cfg.json), which a new one may replace."""
    return (Path(path) / SAELENS_CONFIG).is_file()


def load_saelens(directory: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read a folder written by `save_saelens`, or a SAELens standard/topk/jumprelu SAE (safetensors only).

    The SAE is returned in inference mode (a batchtopk SAE uses its threshold).
    """
    directory = Path(directory)
    config = json.loads((directory / SAELENS_CONFIG).read_text())
    metadata = config.get("metadata") or {}
    saelens_names = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    name = metadata.get("architecture") or saelens_names[config["architecture"]]
    architecture = Architecture(
        name=name, k=int(config.get("k") or metadata.get("k") or Architecture.k),
        prefixes=tuple(metadata.get("matryoshka_prefixes") or ()),
    )  # fmt: skip
    sae = SparseAutoencoder(config["d_in"], config["d_sae"], architecture).eval()
    missing, unexpected = sae.load_state_dict(load_file(directory / SAELENS_WEIGHTS), strict=False)
    if unexpected or set(missing) - set(TRAINING_STATE):
        raise PipelineError(
            f"{directory}: weights do not fit a {name} SAE (missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    return sae, config
