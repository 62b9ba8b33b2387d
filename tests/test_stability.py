"""Feature stability: 1 for an SAE against itself or a shuffled copy, ~0 against unrelated directions."""

from __future__ import annotations

import pytest
import torch

from pipeline.report.stability import stability
from pipeline.saes.relu import ReLUSAE

W = torch.nn.functional.normalize(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)), dim=1)


def shares(result: dict, direction: str) -> list[float]:
    return [v for method in result[direction].values() for v in method.values()]


def test_an_sae_is_fully_stable_against_itself():
    assert shares(stability(W, W), "x_in_y") == [1.0] * 4


def test_a_shuffled_subset_is_found_in_full_and_covers_its_share():
    subset = W[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:200]]
    result = stability(W, subset)
    assert shares(result, "y_in_x") == [1.0] * 4  # every latent of the subset is in W
    assert shares(result, "x_in_y") == pytest.approx([200 / 300] * 4)  # two thirds of W's latents are in it


def test_opposite_directions_are_not_counterparts():
    assert shares(stability(W, -W), "x_in_y") == [0.0] * 4  # latents are non-negative: -d is another feature


def test_unrelated_directions_are_unstable_and_rotation_shows_the_thresholds():
    assert max(shares(stability(W, torch.randn(300, 32, generator=torch.Generator().manual_seed(2))), "x_in_y")) < 0.05
    # Rotate every direction by 40 degrees: cosine 0.77, between the two thresholds.
    noise = torch.nn.functional.normalize(torch.randn(300, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    orthogonal = torch.nn.functional.normalize(noise - (noise * W).sum(1, keepdim=True) * W, dim=1)
    rotated = W * torch.cos(torch.tensor(0.698)) + orthogonal * torch.sin(torch.tensor(0.698))
    result = stability(W, rotated)["x_in_y"]
    assert result["one_to_one"] == {"0.9": 0.0, "0.7": 1.0}
    assert result["max_cosine"] == {"0.9": 0.0, "0.7": 1.0}


def test_configs_of_different_widths_do_not_share_initial_directions():
    """Else a narrower SAE would start as the first rows of a wider one, and stability across widths would be
    inflated by the shared start (the first 256 rows of 384 matched exactly before the width was mixed in)."""
    from pipeline.train.trainer import init_generator

    narrow = ReLUSAE(64, 256, generator=init_generator(0, 256)).W_dec.detach()
    wide = ReLUSAE(64, 384, generator=init_generator(0, 384)).W_dec.detach()
    assert stability(narrow, wide)["x_in_y"]["max_cosine"]["0.7"] < 0.05
    again = ReLUSAE(64, 256, generator=init_generator(0, 256)).W_dec.detach()
    assert torch.equal(narrow, again)
