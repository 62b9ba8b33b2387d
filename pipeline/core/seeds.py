"""Seeds of the random streams: one base seed, mixed with what tells the streams apart.

Each stream (an epoch's order, an SAE's initial weights, a chunk of synthetic samples) gets its own seed from the
base seed and a few integers, so that streams never share draws and any one can be recreated alone (on resume,
on another rank).
"""

from __future__ import annotations

import torch


def mixed_seed(seed: int, *parts: int) -> int:
    """One seed from `seed` and the integers that name a stream (e.g. the epoch; or the purpose, then the chunk)."""
    mixed = 0
    for part in parts:
        mixed = mixed * 10_007 + part
    return seed * 1_000_003 + mixed


def generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded with `mixed_seed(seed, *parts)`."""
    return torch.Generator(device=device).manual_seed(mixed_seed(seed, *parts))
