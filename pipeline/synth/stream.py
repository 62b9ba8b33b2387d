"""The train split of a streamed synthetic store (`synth.stream: true`), generated while the trainer runs.

The published recipe trains on 200M samples: 300 GB in float16, more than a store holds on the GPU machine's
disk. A streamed store keeps the test split and the truth only; the trainer draws the train split's rows here,
shard by shard, from the same seeds and in the same dtype as `pipeline synth` would have written them, so a
streamed run sees exactly the samples of a stored one. An epoch visits the shards in a seeded order and shuffles
the rows within each; every process generates the whole stream (as every process reads the whole store), so
any process count, and `--resume` at any block, gives the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.seeds import generator
from pipeline.store import ActivationStore
from pipeline.synth.generator import SyntheticModel, sample_generator, samples

STREAMED_SPLIT = "train"


def is_streamed(store: ActivationStore, split: str) -> bool:
    """Whether `split` of `store` is generated on the fly rather than stored."""
    return store.is_synthetic and bool(store.attrs["synthetic"].get("stream")) and split == STREAMED_SPLIT


class SyntheticStream:
    """Shuffled [block_tokens, d_model] float32 blocks of a streamed train split, on `device` (the interface the
    trainer uses of `ActivationLoader`)."""

    resident_on_device = False
    order_kind = "generated on the fly: shards in a seeded order, rows shuffled within each"

    def __init__(self, store: ActivationStore, device: torch.device, seed: int) -> None:
        synth = store.attrs["synthetic"]
        drawn_on = torch.device(synth["device"])  # the device type changes the draws: generate where the store did
        if drawn_on.type == "cuda" and not torch.cuda.is_available():
            raise PipelineError(f"{store.path} streams samples drawn on CUDA, and this machine has no CUDA device; "
                                "train it on a GPU, or rewrite the store with synth.device=cpu")  # fmt: skip
        self.model = SyntheticModel.from_arrays(store.truth(), drawn_on)
        self.synth_seed, self.n_tokens = synth["seed"], synth["n_train"]
        self.shard_tokens = store.shard_tokens
        self.stored_dtype = getattr(torch, store.attrs["dtype"])
        self.widths = [store.d_model]
        self.n_columns = 0  # no token labels: synthetic samples are not documents
        self.device, self.seed = device, seed
        self.stall_seconds = 0.0  # host time spent generating (on CUDA the device runs it asynchronously)

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self.shard_tokens)

    def shard_size(self, index: int) -> int:
        return min(self.shard_tokens, self.n_tokens - index * self.shard_tokens)

    def shard(self, index: int) -> torch.Tensor:
        """The rows shard `index` of the train split holds in a stored store, in order, as float32 on the device."""
        started = time.perf_counter()
        drawn_with = sample_generator(self.synth_seed, STREAMED_SPLIT, index, self.model.directions.device)
        rows = samples(self.model, self.shard_size(index), drawn_with)
        rows = rows.to(self.stored_dtype).to(self.device, torch.float32)  # rounded as the store rounds them
        self.stall_seconds += time.perf_counter() - started
        return rows

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch + 1]).permutation(self.n_shards)

    def sample(self, n_tokens: int) -> torch.Tensor:
        """The first `n_tokens` rows of the split (its samples are independent draws: a fair sample)."""
        rows, index = [], 0
        while sum(map(len, rows)) < min(n_tokens, self.n_tokens):
            rows.append(self.shard(index))
            index += 1
        return torch.cat(rows)[:n_tokens]

    def epoch(
        self, epoch: int, block_tokens: int, start_block: int = 0, reuse_memory: bool = False
    ) -> Iterator[torch.Tensor]:
        """Consecutive blocks of this epoch's order (the last may be shorter), from block `start_block` on; each is
        the caller's to modify in place, and fresh memory (`reuse_memory` changes nothing here). Shards before the
        start are not generated."""
        skip = start_block * block_tokens
        pieces: list[torch.Tensor] = []
        gathered = 0
        for index in self.shard_order(epoch):
            size = self.shard_size(int(index))
            if skip >= size:
                skip -= size
                continue
            within = torch.randperm(size, generator=generator(self.seed, epoch, int(index)))
            rows = self.shard(int(index))[within.to(self.device)][skip:]
            skip = 0
            while len(rows):
                take = min(block_tokens - gathered, len(rows))
                pieces.append(rows[:take])
                rows, gathered = rows[take:], gathered + take
                if gathered == block_tokens:
                    yield torch.cat(pieces)
                    pieces, gathered = [], 0
        if pieces:
            yield torch.cat(pieces)
