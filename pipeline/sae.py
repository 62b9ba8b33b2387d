"""The sparse autoencoder: forward pass, loss terms, initialisation, and saving in SAELens's layout.

    f = ReLU((x - b_dec) @ W_enc + b_enc)        x_hat = f @ W_dec + b_dec

Decoder rows are kept at unit norm (renormalised after every optimiser step), so the L1 penalty on f is the
L1 penalty on each latent's contribution f_i * ||W_dec[i]||, and cannot be dodged by shrinking f while growing W_dec.
Training happens on inputs multiplied by a constant `scale` with E||scale * x||^2 = d_in; `folded(scale)` returns
the equivalent SAE on raw activations, which is what is saved for users.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.atomic import atomic_path

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"


class SparseAutoencoder(nn.Module):
    """A ReLU SAE with unit-norm decoder rows and an encoder initialised from the decoder."""

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # The encoder starts as the decoder's transpose, scaled so that the initial reconstruction of a random
        # input has about the input's norm (sum over d_sae half-active random directions ~ d_sae / 2d_in * x).
        self.W_enc = nn.Parameter(w_dec.T * (2 * d_in / d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # addmm fuses the bias into the matrix product: one pass fewer over [tokens, d_sae] than `@` then `+`.
    # It takes 2-D inputs, so any leading dimensions ([batch, pos, d]) are flattened and restored.
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = (x - self.b_dec).reshape(-1, self.d_in)
        return torch.relu(torch.addmm(self.b_enc, flat, self.W_enc)).reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f.reshape(-1, self.d_sae), self.W_dec).reshape(*f.shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and latent activations."""
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def folded(self, scale: float) -> SparseAutoencoder:
        """The same SAE expressed on raw inputs x, when it was trained on scale * x."""
        raw = SparseAutoencoder(self.d_in, self.d_sae)
        raw.W_enc.copy_(self.W_enc * scale)
        raw.b_enc.copy_(self.b_enc)
        raw.W_dec.copy_(self.W_dec / scale)
        raw.b_dec.copy_(self.b_dec / scale)
        return raw


def decorrelation(w_dec: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct decoder directions.

    sum_{i != j} (d_i . d_j)^2 = ||W_dec W_dec^T||_F^2 - sum_i ||d_i||^4, and ||W W^T||_F = ||W^T W||_F, so the
    d_in x d_in Gram matrix gives the exact value at d_sae * d_in^2 cost instead of d_sae^2 * d_in.
    """
    gram = w_dec.T @ w_dec
    norms_sq = (w_dec * w_dec).sum(dim=1)
    n = w_dec.shape[0]
    return ((gram * gram).sum() - (norms_sq * norms_sq).sum()) / (n * (n - 1))


def loss_terms(sae: SparseAutoencoder, x: torch.Tensor, with_l0: bool = True) -> dict[str, torch.Tensor]:
    """Each loss term separately (fp32): mse per element, L1 per token, decorrelation; L0 (detached) if asked.

    L0 costs one more pass over the [batch, d_sae] latents, so the trainer asks for it only when it logs.
    """
    x_hat, f = sae(x)
    terms = {
        "mse": (x_hat.float() - x).pow(2).mean(),
        "l1": f.float().sum(dim=1).mean(),
        "decorrelation": decorrelation(sae.W_dec.float()),
    }
    if with_l0:
        terms["l0"] = (f > 0).sum(dim=1).float().mean().detach()
    return terms


def save_saelens(sae: SparseAutoencoder, directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens's `SAE.load_from_disk` reads a standard SAE.

    The metadata (model_name, hook_name, ...) is written at the top level as well as under "metadata": SAELens 6
    reads a cfg.json without a `sae_lens_version` through its pre-6.0 path, which takes these keys from the top
    level (checked with SAELens 6.54 in a separate environment; it pins transformer-lens<4, so not in our tests).
    """
    config = {
        **metadata,
        "architecture": "standard",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    weights = {name: p.detach().float().cpu().contiguous() for name, p in sae.named_parameters()}
    with atomic_path(directory, owned=is_saelens_folder) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / SAELENS_WEIGHTS)
        (tmp / SAELENS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def is_saelens_folder(path: Path) -> bool:
    """Whether `path` holds an SAE folder (a cfg.json), which a new one may replace."""
    return (Path(path) / SAELENS_CONFIG).is_file()


def load_saelens(directory: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read a folder written by `save_saelens` (safetensors: nothing is unpickled)."""
    directory = Path(directory)
    config = json.loads((directory / SAELENS_CONFIG).read_text())
    sae = SparseAutoencoder(config["d_in"], config["d_sae"])
    sae.load_state_dict(load_file(directory / SAELENS_WEIGHTS))
    return sae, config
