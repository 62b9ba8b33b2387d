"""SAEBench's core-eval output: the statistics it adds, checked by hand on cases small enough to count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.saebench import NOT_APPLICABLE, latent_statistics, weight_statistics
from pipeline.saes.relu import ReLUSAE


class Identity:
    """An 'SAE' whose latents are its input and whose reconstruction is half of it: every count is readable."""

    d_sae = 3

    def input_and_target(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block, block

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x / 2, x


def test_latent_statistics_count_tokens_and_documents_across_blocks():
    # Documents: 0 = positions 0-2, 1 = 3-6, 2 = 7-8. Latent 0 fires in documents 0 and 1 (document 1 across the
    # block boundary at position 5), latent 1 only at position 8, latent 2 never.
    x = torch.zeros(9, 3)
    x[[0, 1, 4, 5], 0] = 1.0
    x[8, 1] = 2.0
    x[:, 2] = -1.0
    offsets = np.array([0, 3, 7, 9])
    blocks = [(torch.arange(0, 5), x[:5]), (torch.arange(5, 9), x[5:])]
    found = latent_statistics(Identity(), blocks, offsets)
    assert found["n_tokens"] == 9
    assert found["feature_density"] == pytest.approx([4 / 9, 1 / 9, 0.0])
    # tokens fired on per document fired in: 4 tokens in 2 documents; 1 in 1; never fires
    assert found["consistent_activation_heuristic"] == pytest.approx([2.0, 1.0, NOT_APPLICABLE])
    norms = x.double().norm(dim=1)
    assert found["l2_norm_in"] == pytest.approx(norms.mean().item())
    assert found["l2_norm_out"] == pytest.approx(norms.mean().item() / 2)
    assert found["relative_reconstruction_bias"] == pytest.approx(0.5)  # x_hat = x / 2: (1/4) / (1/2)


def test_largest_cosine_with_another_latent_equals_the_full_matrix():
    sae = ReLUSAE(8, 2500, generator=torch.Generator().manual_seed(0))  # more latents than one slice of rows
    with torch.no_grad():
        sae.b_enc.normal_()
    found = weight_statistics(sae)
    for name, weights in (("max_decoder_cosine_sim", sae.W_dec), ("max_encoder_cosine_sim", sae.W_enc.T)):
        unit = torch.nn.functional.normalize(weights.detach().double(), dim=1)
        cosines = unit @ unit.T
        cosines.fill_diagonal_(-torch.inf)
        assert np.allclose(found[name], cosines.max(dim=1).values.numpy())
    assert found["encoder_bias"] == pytest.approx(sae.b_enc.tolist())
    assert found["encoder_norm"] == pytest.approx(sae.W_enc.norm(dim=0).tolist(), rel=1e-6)
