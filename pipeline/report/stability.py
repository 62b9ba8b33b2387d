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

import logging

import torch

from pipeline.core.matching import cosines, one_to_one

THRESHOLDS = (0.9, 0.7)
log = logging.getLogger(__name__)


def stability(w_x: torch.Tensor, w_y: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Shares of X's latents with a counterpart in Y and of Y's in X: {"x_in_y"|"y_in_x": {method: {t: share}}}."""
    cos = cosines(w_x, w_y)
    rows, cols = one_to_one(cos)
    matched = cos[rows, cols]
    result = {}
    for name, best, n in (("x_in_y", cos.max(dim=1).values, cos.shape[0]), ("y_in_x", cos.max(dim=0).values,
                                                                            cos.shape[1])):  # fmt: skip
        result[name] = {
            "max_cosine": {str(t): float((best >= t).double().mean()) for t in THRESHOLDS},
            "one_to_one": {str(t): float((matched >= t).sum()) / n for t in THRESHOLDS},
        }
    return result


def feature_stability(decoders: dict[str, torch.Tensor]) -> dict[str, dict[str, dict]]:
    """Stability of every ordered pair of SAEs, from their decoders: shares[x][y] = {method: {threshold: share}}
    of x's latents found in y."""
    keys = list(decoders)
    shares: dict[str, dict[str, dict]] = {key: {} for key in keys}
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            log.info("feature stability: %s against %s", x, y)
            both = stability(decoders[x], decoders[y])
            shares[x][y], shares[y][x] = both["x_in_y"], both["y_in_x"]
    return shares
