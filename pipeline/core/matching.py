"""Comparing two dictionaries of directions: their cosines, and the one-to-one matching that maximises the total.

Used against the true features of synthetic data (evaluate's ground truth) and between two trained SAEs (the
report's feature stability).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def cosines(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[len(a), len(b)] cosines between the rows of `a` and of `b`, computed in `dtype`."""
    normalize = torch.nn.functional.normalize
    return normalize(a.to(dtype), dim=1) @ normalize(b.to(dtype), dim=1).T


def one_to_one(scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the one-to-one matching with the largest total score (Hungarian algorithm);
    min(rows, columns) pairs."""
    return linear_sum_assignment(scores.double().cpu().numpy(), maximize=True)
