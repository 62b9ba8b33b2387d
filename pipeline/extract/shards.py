"""Computing activations shard by shard: documents batched by length, one forward pass per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.core.device import to_host
from pipeline.corpus import Batch, TokenizedSplit, padded, plan_batches
from pipeline.model import capture
from pipeline.store.background import BackgroundWriter
from pipeline.store.writer import StoreWriter


def extract_pending(
    writer: StoreWriter,
    extractor: ShardExtractor,
    splits: dict[str, TokenizedSplit],
    shards: Sequence[tuple[str, int, int, int]],
    on_shard: Callable[[int], None] = lambda n_tokens: None,
) -> None:
    """Compute and write `shards` ((split, index, first token, end token) each), writing on a background thread.

    Even when interrupted, the shards already computed reach the disk and count as done.
    """
    background = BackgroundWriter(writer)
    try:
        for split, index, start, end in shards:
            data = splits[split]
            activations, ready = extractor.extract(data.tokens, data.doc_offsets, start, end)
            background.submit(split, index, start, activations, ready)
            on_shard(end - start)
    finally:
        background.close()


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

    def extract(
        self, tokens: np.ndarray, offsets: np.ndarray, start: int, end: int
    ) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
        """Activations [end - start, d_model] per hook for global token positions start..end-1, and a function that
        returns once they have reached host memory (`to_host`)."""
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
        # One device-to-host copy per shard, not per batch, and the writer thread (not this one) waits for it.
        return to_host(out)

    def _layout(self, batch: Batch, tokens: np.ndarray, offsets: np.ndarray, start: int, end: int):
        """Padded ids and mask, and where each position inside [start, end) comes from and goes to."""
        ids, mask = padded(batch, tokens, offsets, self.device)
        rows, positions, dest = [], [], []
        for row, doc in enumerate(batch.docs):
            lo, hi = int(offsets[doc]), int(offsets[doc + 1])
            keep_lo, keep_hi = max(lo, start), min(hi, end)  # the part of this document inside the shard
            positions.append(np.arange(keep_lo - lo, keep_hi - lo))
            rows.append(np.full(keep_hi - keep_lo, row))
            dest.append(np.arange(keep_lo - start, keep_hi - start))
        index = (torch.from_numpy(np.concatenate(a)).to(self.device) for a in (rows, positions, dest))
        return ids, mask, *index
