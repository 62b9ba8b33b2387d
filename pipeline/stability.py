"""Feature stability: how many latents of one SAE have a counterpart in another (the reference report's last
next step: do features survive a change of width, or of seed?).

For SAEs X and Y read from the same hook, cos(i, j) is the cosine between X's decoder row i and Y's row j, signed:
latents are non-negative, so a direction and its opposite are different features.
- max-cosine: the share of X's latents whose most similar direction in Y has cos >= t;
- one-to-one: the matching of X's latents to Y's that maximises the total cosine (Hungarian algorithm,
  min(d_x, d_y) pairs); the share of X's latents matched with cos >= t (an unmatched latent counts as not).
An SAE compared with itself scores 1 on both.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

THRESHOLDS = (0.9, 0.7)


def decoder_cosines(w_x: torch.Tensor, w_y: torch.Tensor) -> torch.Tensor:
    """[d_x, d_y] cosines between the decoder rows of two SAEs."""
    normalize = torch.nn.functional.normalize
    return normalize(w_x.double(), dim=1) @ normalize(w_y.double(), dim=1).T


def stability(w_x: torch.Tensor, w_y: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Shares of X's latents with a counterpart in Y and of Y's in X: {"x_in_y"|"y_in_x": {method: {t: share}}}."""
    cos = decoder_cosines(w_x, w_y)
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    matched = cos[rows, cols]
    result = {}
    for name, best, n in (("x_in_y", cos.max(dim=1).values, cos.shape[0]), ("y_in_x", cos.max(dim=0).values,
                                                                            cos.shape[1])):  # fmt: skip
        result[name] = {
            "max_cosine": {str(t): float((best >= t).double().mean()) for t in THRESHOLDS},
            "one_to_one": {str(t): float((matched >= t).sum()) / n for t in THRESHOLDS},
        }
    return result
