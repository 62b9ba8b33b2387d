"""Training batches from the store: token-level shuffling, device-resident when it fits, else streamed.

No forked DataLoader workers: zarr 3 runs an asyncio loop on a thread, which forking can deadlock. Instead:
- device-resident: the split is read once (sequential whole-shard reads) into device memory, and every epoch
  gathers its shuffled blocks there;
- host-resident (split larger than `memory_budget_gb`): the split lives in host RAM and a background thread
  gathers each shuffled block into a pinned buffer, copied to the device with `non_blocking=True` while the
  previous block is being trained on.
Both give the same blocks in the same order for the same seed: the order is a seeded permutation of token
positions per epoch, independent of residency and device.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.device import uses_pinned_memory
from pipeline.errors import PipelineError
from pipeline.store import ActivationStore

N_PINNED_BUFFERS = 3


class ActivationLoader:
    """Shuffled [block_tokens, d_model] float32 blocks of one split and hook, on `device`."""

    def __init__(
        self,
        store: ActivationStore,
        split: str,
        hook: str,
        device: torch.device,
        seed: int,
        exclude_bos: bool = True,
        memory_budget_gb: float = 8.0,
    ) -> None:
        array = store.activations(split, hook)
        self.device = device
        self.seed = seed
        self.d_model = array.shape[1]
        self.positions = _training_positions(store, split, exclude_bos)
        if len(self.positions) == 0:
            raise PipelineError(f"split {split!r} of {store.path} holds no training tokens")
        host = _read_checked(store, split, hook)
        self.resident_on_device = host.nbytes <= memory_budget_gb * 2**30
        self.data = torch.from_numpy(host).to(device) if self.resident_on_device else torch.from_numpy(host)
        self.stall_seconds = 0.0  # time the consumer spent waiting for a block

    @property
    def n_tokens(self) -> int:
        """Training tokens per epoch."""
        return len(self.positions)

    def order(self, epoch: int) -> torch.Tensor:
        """The token positions of `epoch`, shuffled by a generator seeded with (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.positions), generator=generator)
        return torch.from_numpy(self.positions)[perm]

    def sample(self, n_tokens: int) -> torch.Tensor:
        """A fixed random sample of up to `n_tokens` activations (for statistics such as the input scale)."""
        generator = torch.Generator().manual_seed(self.seed + 7919)
        chosen = torch.from_numpy(self.positions)[torch.randperm(len(self.positions), generator=generator)]
        return self.data[chosen[:n_tokens].to(self.data.device)].float().to(self.device)

    def epoch(self, epoch: int, block_tokens: int, start_block: int = 0) -> Iterator[torch.Tensor]:
        """Consecutive blocks of this epoch's order (the last may be shorter), from block `start_block` on.

        Each block is the caller's to modify in place until it asks for the next one.
        """
        order = self.order(epoch)
        blocks = [order[i : i + block_tokens] for i in range(start_block * block_tokens, len(order), block_tokens)]
        if self.resident_on_device:
            for index in blocks:
                yield self.data[index.to(self.device)].float()
        else:
            yield from self._streamed(blocks, block_tokens)

    def _streamed(self, blocks: list[torch.Tensor], block_tokens: int) -> Iterator[torch.Tensor]:
        pin = uses_pinned_memory(self.device)
        buffers = [
            torch.empty(block_tokens, self.d_model, dtype=self.data.dtype, pin_memory=pin)
            for _ in blocks[:N_PINNED_BUFFERS]
        ]
        free: queue.Queue = queue.Queue()
        for i in range(len(buffers)):
            free.put((i, None))
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for index in blocks:
                    slot, copied = free.get()
                    if stop.is_set():
                        return
                    if copied is not None:
                        copied.synchronize()  # the previous copy out of this buffer has finished
                    out = buffers[slot][: len(index)]
                    torch.index_select(self.data, 0, index, out=out)
                    ready.put((slot, out))
            except BaseException as exc:  # surfaced in the consumer
                ready.put((None, exc))

        thread = threading.Thread(target=produce, daemon=True, name="loader")
        thread.start()
        try:
            for _ in blocks:
                waited = time.perf_counter()
                slot, out = ready.get()
                self.stall_seconds += time.perf_counter() - waited
                if slot is None:
                    raise out
                block = out.to(self.device, non_blocking=pin).float()
                event = torch.cuda.Event() if pin else None
                if event is not None:
                    event.record()
                yield block
                free.put((slot, event))
        finally:
            stop.set()
            free.put((0, None))  # wake the producer so that it can see `stop`
            thread.join()


def _training_positions(store: ActivationStore, split: str, exclude_bos: bool) -> np.ndarray:
    """Token positions used for training: all of them, or all but each document's leading BOS (if it has one)."""
    n_tokens = len(store.tokens(split))
    keep = np.ones(n_tokens, dtype=bool)
    if exclude_bos and store.attrs.get("bos_token_id") is not None:
        starts = store.doc_offsets(split)[:-1]
        keep[starts[starts < n_tokens]] = False
    return np.flatnonzero(keep)


def _read_checked(store: ActivationStore, split: str, hook: str) -> np.ndarray:
    """The whole [n_tokens, d] array in host memory, read shard by shard; NaN or inf is an error naming where."""
    array = store.activations(split, hook)
    host = np.empty(array.shape, dtype=array.dtype)
    for start in range(0, array.shape[0], store.shard_tokens):
        block = store.read_rows(split, hook, start, start + store.shard_tokens)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            token = start + int(np.argmin(finite))
            doc = int(np.searchsorted(store.doc_offsets(split), token, side="right")) - 1
            raise PipelineError(
                f"{store.path} {split}/{hook}: non-finite activation at token {token} (document {doc}); "
                "re-extract with a wider dtype or exclude that document"
            )
        host[start : start + len(block)] = block
    return host
