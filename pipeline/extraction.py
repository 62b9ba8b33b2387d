"""Computing the activations of one shard: documents batched by length, one forward pass per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.lm import capture


@dataclass
class Batch:
    """Documents padded on the right into one [len(docs), width] forward pass."""

    docs: np.ndarray  # document indices
    width: int


def plan_batches(lengths: np.ndarray, doc_ids: np.ndarray, batch_tokens: int) -> list[Batch]:
    """Group documents of similar length so that padding stays small and no batch exceeds `batch_tokens`."""
    order = doc_ids[np.argsort(lengths[doc_ids], kind="stable")[::-1]]
    batches: list[Batch] = []
    current: list[int] = []
    width = 0
    for doc in order:
        length = int(lengths[doc])
        if current and max(width, length) * (len(current) + 1) > batch_tokens:
            batches.append(Batch(np.array(current), width))
            current, width = [], 0
        current.append(int(doc))
        width = max(width, length)
    if current:
        batches.append(Batch(np.array(current), width))
    return batches


class ShardExtractor:
    """Runs the model over the documents that overlap a token range and assembles that range's activations."""

    def __init__(
        self,
        model,
        hooks: Sequence[str],
        stop_at_layer: int,
        batch_tokens: int,
        out_dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.hooks = list(hooks)
        self.stop_at_layer = stop_at_layer
        self.batch_tokens = batch_tokens
        self.out_dtype = out_dtype
        self.device = next(model.parameters()).device
        self.pad_id = 0  # never attended to, never stored

    def extract(self, tokens: np.ndarray, offsets: np.ndarray, start: int, end: int) -> dict[str, np.ndarray]:
        """Activations [end - start, d_model] per hook for global token positions start..end-1."""
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, end, side="left"))  # exclusive
        doc_ids = np.arange(first, last)
        lengths = np.diff(offsets)
        d_model = self.model.cfg.d_model
        out = {h: torch.empty(end - start, d_model, dtype=self.out_dtype, device=self.device) for h in self.hooks}
        for batch in plan_batches(lengths, doc_ids, self.batch_tokens):
            ids, mask, rows, positions, dest = self._layout(batch, tokens, offsets, start, end)
            acts = capture(self.model, ids, mask, self.hooks, self.stop_at_layer)
            for hook in self.hooks:
                out[hook][dest] = acts[hook][rows, positions].to(self.out_dtype)
        # One device-to-host copy per shard, not per batch: the GPU is not stalled by small transfers.
        return {h: v.cpu().numpy() for h, v in out.items()}

    def _layout(self, batch: Batch, tokens: np.ndarray, offsets: np.ndarray, start: int, end: int):
        n = len(batch.docs)
        ids = np.full((n, batch.width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, batch.width), dtype=np.int64)
        rows, positions, dest = [], [], []
        for row, doc in enumerate(batch.docs):
            lo, hi = int(offsets[doc]), int(offsets[doc + 1])
            ids[row, : hi - lo] = tokens[lo:hi]
            mask[row, : hi - lo] = 1
            keep_lo, keep_hi = max(lo, start), min(hi, end)  # the part of this document inside the shard
            positions.append(np.arange(keep_lo - lo, keep_hi - lo))
            rows.append(np.full(keep_hi - keep_lo, row))
            dest.append(np.arange(keep_lo - start, keep_hi - start))
        arrays = (ids, mask, np.concatenate(rows), np.concatenate(positions), np.concatenate(dest))
        return tuple(torch.from_numpy(a).to(self.device) for a in arrays)
