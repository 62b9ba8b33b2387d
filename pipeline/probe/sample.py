"""The probes' sample of one hook, read once for every config at it: activations, reconstructions, latents."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from pipeline.core.errors import PipelineError
from pipeline.saes.base import SparseAutoencoder
from pipeline.train.loader import ActivationLoader

READ_TOKENS = 4096  # sampled tokens read and encoded at a time


@dataclass
class Sample:
    """The sampled tokens of one hook: activations (an SAE's target), reconstructions on the score half, latents."""

    tokens: np.ndarray  # ascending positions
    x: np.ndarray  # [n, d] float32
    score_rows: np.ndarray  # rows of the score half, ascending
    x_hat: dict[str, np.ndarray]  # key -> [len(score_rows), d] float32
    latents: dict[str, scipy.sparse.csr_array]  # key -> [n, d_sae]


def read_sample(loader: ActivationLoader, saes: dict[str, SparseAutoencoder], sample: np.ndarray, halves: np.ndarray,
          budget_gb: float, on_rows: Callable[[int], None] = lambda n: None) -> Sample:  # fmt: skip
    """Read the sampled tokens (ascending positions) a block at a time through `loader` (resident or streamed) and
    keep what the probes need: every token's activation (an SAE's target), each SAE's reconstruction of the
    score half's tokens (`halves`: per token of the split, 1 for the score half) and its latents, sparse. All of it
    must fit within `budget_gb`."""
    width = loader.widths[-1]
    score = halves[sample] == 1
    dense_bytes = len(sample) * width * 4 * (1 + len(saes) * score.mean())
    if dense_bytes > budget_gb * 2**30:
        raise PipelineError(
            f"the probes' sample ({len(sample):,} tokens of width {width}, {dense_bytes / 2**30:.1f} GB with the "
            f"reconstructions) exceeds train.memory_budget_gb ({budget_gb}); lower probe.max_per_class"
        )
    x, x_hat = [], {key: [] for key in saes}
    latents: dict[str, list[scipy.sparse.csr_array]] = {key: [] for key in saes}
    stored = 0
    for start in range(0, len(sample), READ_TOKENS):
        block = loader.rows(torch.from_numpy(sample[start : start + READ_TOKENS]))
        in_score = torch.from_numpy(score[start : start + READ_TOKENS]).to(block.device)
        for key, sae in saes.items():
            source, target = sae.input_and_target(block)
            with torch.no_grad():
                reconstruction, f = sae(source)
            x_hat[key].append(reconstruction[in_score].cpu().numpy())
            latents[key].append(scipy.sparse.csr_array(f.cpu().numpy()))
            stored += latents[key][-1].nnz * 12
        x.append(target.cpu().numpy())
        if dense_bytes + stored > budget_gb * 2**30:
            raise PipelineError(f"the probes' sample and its latents exceed train.memory_budget_gb ({budget_gb}); "
                                "lower probe.max_per_class")  # fmt: skip
        on_rows(len(block))
    return Sample(sample, np.concatenate(x), np.flatnonzero(score),
                  {key: np.concatenate(parts) for key, parts in x_hat.items()},
                  {key: scipy.sparse.vstack(parts, format="csr") for key, parts in latents.items()})  # fmt: skip
