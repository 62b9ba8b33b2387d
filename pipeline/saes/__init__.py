"""SAE architectures, one file each behind one interface (base.py), found here by name.

Adding an architecture is a new file with a subclass of `SparseAutoencoder` and its line in ARCHITECTURES; the
trainer, evaluation, analysis and the report never branch on a name. Classes are imported when first asked for,
so that parameters can be checked against these names before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipeline.params import SAEConfig
    from pipeline.saes.base import SparseAutoencoder

ARCHITECTURES = {  # params name -> module:class
    "relu": "pipeline.saes.relu:ReLUSAE",
    "topk": "pipeline.saes.topk:TopKSAE",
    "batchtopk": "pipeline.saes.batchtopk:BatchTopKSAE",
    "jumprelu": "pipeline.saes.jumprelu:JumpReLUSAE",
    "matryoshka": "pipeline.saes.matryoshka:MatryoshkaSAE",
}


def sae_class(name: str) -> type[SparseAutoencoder]:
    """The class of architecture `name`."""
    module, _, cls = ARCHITECTURES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_sae(
    cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None, d_out: int | None = None
) -> SparseAutoencoder:
    """A new SAE as a resolved config describes it, on inputs of width `d_in` (a transcoder's targets `d_out`)."""
    return sae_class(cfg.architecture).from_config(d_in, cfg, generator, d_out)
