"""Training batches from the store: token-level shuffling, resident in memory when the split fits, else streamed.

No forked DataLoader workers: zarr 3 runs an asyncio loop on a thread, which forking can deadlock. Instead:
- resident (the split's stored bytes fit `memory_budget_gb`): the split is read once (sequential whole-shard
  reads) into device memory, and every epoch gathers its blocks there in a seeded permutation of all training
  positions;
- streamed (they do not): the split stays in the store, out of core. An epoch visits the store's chunks in a
  seeded random order, a window of chunks at a time (so a window mixes every shard); a background thread reads
  the next window's chunks as stored and draws its shuffled order, while the current one is gathered into blocks
  in its order (in pinned memory on CUDA, copied to the device with `non_blocking=True`). Every training token
  is seen once per epoch. The windows live in WINDOW_BUFFERS buffers allocated once and reused, by later epochs
  too (a steady footprint, not one the allocator grows, and no page faults of fresh memory after the first
  epoch), which together take at most `memory_budget_gb`; the blocks in flight come on top.
Both are deterministic for a seed and resume at any block; their orders differ (streaming shuffles within
windows).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from pipeline.core.device import uses_pinned_memory
from pipeline.core.errors import PipelineError
from pipeline.core.seeds import generator
from pipeline.store import ActivationStore

WINDOW_BUFFERS = 3  # the window being gathered into blocks, one queued, one being read
GATHER_ROWS = 2048  # rows gathered into a block at a time: the float16 copy in between is of this many, not a block
SAMPLE_EPOCH = -1  # the stream `sample` draws from: not any training epoch's


class TrainingBlocks(Protocol):
    """What the trainer reads blocks from: an `ActivationLoader`, or a streamed synthetic split
    (pipeline/synth/stream.py)."""

    device: torch.device
    widths: list[int]  # a row's activations: [d_model], or a transcoder's [input width, target width]
    n_columns: int  # after them, per-token columns that travel with the activations (token labels)
    n_tokens: int  # training tokens per epoch
    resident_on_device: bool
    stall_seconds: float

    @property
    def order_kind(self) -> str: ...

    def sample(self, n_tokens: int) -> torch.Tensor: ...

    def epoch(
        self, epoch: int, block_tokens: int, start_block: int = 0, reuse_memory: bool = False
    ) -> Iterator[torch.Tensor]: ...


class ActivationLoader:
    """Shuffled [block_tokens, d_model] float32 blocks of one split and hook, on `device`.

    With a `target_hook` (a transcoder's), each row is a token's `hook` activation followed by its `target_hook`
    activation: the two are read, shuffled and handed out together (`widths` says where one ends). With `columns`
    ([n_tokens, n] small integers, such as token labels), each row ends with its token's columns, shuffled with it:
    they cost no second read, and leave the order, the windows and the memory budget (reckoned on the
    activations) as they are without them. With `documents` (a bool per document of the split), only the tokens of
    the documents chosen are training tokens (a reasoning task's: pipeline/label/documents.py).
    """

    def __init__(
        self,
        store: ActivationStore,
        split: str,
        hook: str,
        device: torch.device,
        seed: int,
        exclude_bos: bool = True,
        memory_budget_gb: float = 8.0,
        target_hook: str | None = None,
        columns: np.ndarray | None = None,
        documents: np.ndarray | None = None,
    ) -> None:
        self.hooks = [hook] if target_hook is None else [hook, target_hook]
        arrays = [store.activations(split, name) for name in self.hooks]
        array = arrays[0]
        self.store, self.split, self.hook, self.target_hook = store, split, hook, target_hook
        self.device = device
        self.seed = seed
        self.widths = [a.shape[1] for a in arrays]
        self.n_rows = array.shape[0]
        self.columns = None if columns is None else np.asarray(columns).reshape(self.n_rows, -1)
        self.n_columns = 0 if columns is None else self.columns.shape[1]
        self.d_model = sum(self.widths) + self.n_columns  # a row's width
        self.excluded = _excluded_positions(store, split, exclude_bos, documents)
        self.n_tokens = self.n_rows - len(self.excluded)  # training tokens per epoch
        if self.n_tokens == 0:
            raise PipelineError(f"split {split!r} of {store.path} holds no training tokens")
        self.dtype = array.dtype  # as stored
        self.torch_dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype  # the same, as torch names it
        self.resident_on_device = sum(a.nbytes for a in arrays) <= memory_budget_gb * 2**30
        self.chunk_tokens = store.attrs["chunk_tokens"]
        chunk_bytes = self.chunk_tokens * sum(self.widths) * self.dtype.itemsize
        self.window_chunks = max(1, int(memory_budget_gb * 2**30 // (WINDOW_BUFFERS * chunk_bytes)))
        if self.resident_on_device:
            self.positions = np.setdiff1d(np.arange(self.n_rows), self.excluded, assume_unique=True)
            self.data = self._read_resident()
        self.stall_seconds = 0.0  # time the consumer spent waiting for a block
        self.spare_windows: list[list[torch.Tensor]] = []  # window memory no stream holds: the next one takes it

    @property
    def order_kind(self) -> str:
        """What decides the order of an epoch's tokens besides the seed: a resumed run must keep it."""
        if self.resident_on_device:
            return "resident"
        chunks = f"{self.window_chunks} chunk{'s' * (self.window_chunks != 1)}"
        return f"streamed in windows of {chunks} of {self.chunk_tokens} tokens"

    def order(self, epoch: int) -> torch.Tensor:
        """Resident: the token positions of `epoch`, shuffled by a generator seeded with (seed, epoch)."""
        perm = torch.randperm(len(self.positions), generator=generator(self.seed, epoch))
        return torch.from_numpy(self.positions)[perm]

    def sample(self, n_tokens: int) -> torch.Tensor:
        """A fixed random sample of up to `n_tokens` activations (for statistics such as the input scale)."""
        if not self.resident_on_device:  # the first tokens of a stream of their own
            with contextlib.closing(self._streamed(SAMPLE_EPOCH, min(n_tokens, self.n_tokens), 0, False)) as stream:
                return next(stream)
        shuffled = torch.randperm(len(self.positions), generator=torch.Generator().manual_seed(self.seed + 7919))
        chosen = torch.from_numpy(self.positions)[shuffled]
        return self.data[chosen[:n_tokens].to(self.data.device)].float().to(self.device)

    def epoch(
        self, epoch: int, block_tokens: int, start_block: int = 0, reuse_memory: bool = False
    ) -> Iterator[torch.Tensor]:
        """Consecutive blocks of this epoch's order (the last may be shorter), from block `start_block` on.

        Each block is the caller's to modify in place until it asks for the next one. With `reuse_memory`, a later
        block may then be written into its memory (keep a copy to keep it): streamed on the CPU, fresh memory for
        every block costs more in page faults than the rest of the work together.
        """
        if not self.resident_on_device:
            yield from self._streamed(epoch, block_tokens, start_block, reuse_memory)
            return
        order = self.order(epoch)
        for i in range(start_block * block_tokens, len(order), block_tokens):
            yield self.data[order[i : i + block_tokens].to(self.device)].float()

    def in_order(self, block_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(token indices, float32 activations on the device) of every training position in token order, in
        blocks of `block_tokens` (the last may be shorter): what analysis streams over. Streamed, the store is read
        in order, a chunk at a time."""
        if self.resident_on_device:
            positions = torch.from_numpy(self.positions)
            for start in range(0, len(positions), block_tokens):
                chosen = positions[start : start + block_tokens]
                yield chosen, self.data[chosen.to(self.device)].float()
            return
        pieces: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, rows) of the block being gathered
        gathered = 0
        for chunk in range(math.ceil(self.n_rows / self.chunk_tokens)):
            start, end = self._rows_of(chunk)  # chunk by chunk: zarr's reads of more need several times the bytes
            read = self._read_rows(start, end)
            kept = self._kept(start, end)
            positions, rows = np.arange(start, end)[kept], read[kept]
            while len(positions):
                take = min(block_tokens - gathered, len(positions))
                pieces.append((positions[:take], rows[:take]))
                positions, rows, gathered = positions[take:], rows[take:], gathered + take
                if gathered == block_tokens:
                    yield self._joined(pieces)
                    pieces, gathered = [], 0
        if pieces:
            yield self._joined(pieces)

    def _joined(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        positions, rows = (np.concatenate(parts) for parts in zip(*pieces, strict=True))
        return torch.from_numpy(positions), torch.from_numpy(rows).to(self.device).float()

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 activations [len(positions), d_model] of the tokens `positions` (ascending), on the device.
        Streamed, each chunk that holds any of them is read once."""
        if self.resident_on_device:
            return self.data[positions.to(self.device)].float()
        wanted = positions.numpy()
        found = np.empty((len(wanted), self.d_model), dtype=self.dtype)
        chunks = wanted // self.chunk_tokens
        for group in np.split(np.arange(len(wanted)), np.flatnonzero(np.diff(chunks)) + 1):
            if len(group):
                start, end = self._rows_of(int(chunks[group[0]]))
                found[group] = self._read_rows(start, end)[wanted[group] - start]
        return torch.from_numpy(found).to(self.device).float()

    def windows(self, epoch: int) -> list[np.ndarray]:
        """Streamed: the chunk indices of each window of `epoch`, in the order they are read."""
        n_chunks = math.ceil(self.n_rows / self.chunk_tokens)
        chunks = np.random.default_rng([self.seed, epoch + 1]).permutation(n_chunks)
        return [chunks[i : i + self.window_chunks] for i in range(0, n_chunks, self.window_chunks)]

    def _streamed(self, epoch: int, block_tokens: int, start_block: int, reuse_memory: bool) -> Iterator[torch.Tensor]:
        windows = self.windows(epoch)
        skip, first = start_block * block_tokens, 0
        while first < len(windows) and skip >= (in_window := self._training_tokens(windows[first])):
            skip, first = skip - in_window, first + 1  # whole windows before the start: not even read
        reader = _WindowReader(self, epoch, [(w, windows[w]) for w in range(first, len(windows))])
        left = self.n_tokens - start_block * block_tokens  # tokens still to hand out: the last block may be short
        pin = uses_pinned_memory(self.device)
        on_host = self.device.type == "cpu"  # the block is what the caller gets
        memory = None  # the first block's memory, for every later block where the caller lets it be reused
        block, filled = None, 0
        try:
            for parts, order in reader:
                order, skip = order[skip:], 0
                while len(order):
                    if block is None:
                        size, filled = min(block_tokens, left), 0
                        # On the host, rows become float32 as they are gathered; a device converts its own copy (the
                        # transfer then carries the stored dtype's bytes).
                        dtype = torch.float32 if on_host else self.torch_dtype
                        block = memory[:size] if memory is not None else torch.empty(size, self.d_model, dtype=dtype,
                                                                                     pin_memory=pin)  # fmt: skip
                        if reuse_memory and on_host and memory is None:
                            memory = block
                    take = min(len(block) - filled, len(order))
                    _gather(parts, order[:take], block[filled : filled + take])
                    order, filled = order[take:], filled + take
                    if filled == len(block):
                        # the host allocator keeps a pinned block alive until its non-blocking copy has finished
                        yield block.to(self.device, non_blocking=pin).float()
                        left, block = left - filled, None
                reader.release(parts)  # gathered from: the reader may fill it again
        finally:
            reader.close()

    def _training_tokens(self, window: np.ndarray) -> int:
        return sum(end - start - len(self._excluded_in(start, end)) for start, end in map(self._rows_of, window))

    def _rows_of(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_tokens, min((chunk + 1) * self.chunk_tokens, self.n_rows)

    def _excluded_in(self, start: int, end: int) -> np.ndarray:
        return self.excluded[np.searchsorted(self.excluded, start) : np.searchsorted(self.excluded, end)]

    def _kept(self, start: int, end: int) -> np.ndarray:
        """Which rows of start..end-1 are training positions (all but excluded BOS positions)."""
        kept = np.ones(end - start, dtype=bool)
        kept[self._excluded_in(start, end) - start] = False
        return kept

    def _read_window(self, epoch: int, index: int, window: np.ndarray, parts: list[torch.Tensor]) -> torch.Tensor:
        """Reads the window's chunks, in store order, into `parts` (`_new_parts`), and returns the window's shuffled
        order, seeded by (seed, epoch, index): the row of `parts` that each of its positions takes. Only training
        rows are placed."""
        kept, filled = [], 0
        for start, end in sorted(map(self._rows_of, window)):
            self._read_into(start, end, parts, filled)
            kept.append(filled + np.flatnonzero(self._kept(start, end)))
            filled += end - start
        training_rows = np.concatenate(kept)
        places = np.random.default_rng([self.seed, epoch + 1, index]).permutation(len(training_rows))
        order = np.empty_like(training_rows)
        order[places] = training_rows  # training row j goes to position places[j]
        return torch.from_numpy(order)

    def _read_resident(self) -> torch.Tensor:
        """Every row of the split as `_read_rows` gives them, in one tensor on the device. Read a shard at a time:
        on the CPU straight into it where a row is one hook's; otherwise into host memory then copied into it
        (pinned on CUDA, two shards' worth taking turns, so that a shard's copy overlaps the next one's read)."""
        data = torch.empty((self.n_rows, self.d_model), dtype=self.torch_dtype, device=self.device)
        pin, shard = uses_pinned_memory(self.device), self.store.shard_tokens
        if self.device.type == "cpu" and self.d_model == self.widths[0]:  # one part: its rows are the data's
            for start in range(0, self.n_rows, shard):
                self._read_into(start, min(start + shard, self.n_rows), [data[start : start + shard]])
            return data
        turns: list[tuple[list[torch.Tensor], torch.cuda.Event | None]] = [
            (self._new_parts(shard, pin), None) for _ in range(2 if pin else 1)
        ]
        for index, start in enumerate(range(0, self.n_rows, shard)):
            end = min(start + shard, self.n_rows)
            parts, copied = turns[index % len(turns)]
            if copied is not None:  # its previous shard is still being copied from it
                copied.synchronize()
            self._read_into(start, end, parts)
            column = 0
            for part in parts:
                data[start:end, column : column + part.shape[1]].copy_(part[: end - start], non_blocking=pin)
                column += part.shape[1]
            turns[index % len(turns)] = (parts, _recorded_event() if pin else None)
        return data

    def _read_rows(self, start: int, end: int) -> np.ndarray:
        """Rows start..end-1 of every hook (checked), side by side, then their columns."""
        parts = self._new_parts(end - start)
        self._read_into(start, end, parts)
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).numpy()

    def _read_into(self, start: int, end: int, parts: list[torch.Tensor], at: int = 0) -> None:
        """Rows start..end-1 of every hook, checked for NaN and inf, and of the columns, into rows at... of
        `parts` (`_new_parts`)."""
        for hook, part in zip(self.hooks, parts, strict=False):
            rows = self.store.read_rows(self.split, hook, start, end, out=part.numpy()[at : at + end - start])
            _check_finite(self.store, self.split, hook, start, rows)
        if self.columns is not None:  # small integers: exact in float16
            parts[-1].numpy()[at : at + end - start] = self.columns[start:end]

    def _new_parts(self, rows: int, pin: bool = False) -> list[torch.Tensor]:
        """Host memory for `rows` rows as read: one [rows, width] tensor per hook, then one for the columns."""
        widths = self.widths + ([self.n_columns] if self.n_columns else [])
        return [torch.empty((rows, width), dtype=self.torch_dtype, pin_memory=pin) for width in widths]


def _recorded_event() -> torch.cuda.Event:
    """A CUDA event recorded after the work queued so far: `synchronize` waits for that work."""
    event = torch.cuda.Event()
    event.record()
    return event


def _gather(parts: list[torch.Tensor], rows: torch.Tensor, target: torch.Tensor) -> None:
    """target[i] = row rows[i] of the parts side by side, in target's dtype (GATHER_ROWS rows at a time)."""
    for begin in range(0, len(rows), GATHER_ROWS):
        chosen, column = rows[begin : begin + GATHER_ROWS], 0
        for part in parts:
            target[begin : begin + len(chosen), column : column + part.shape[1]] = part.index_select(0, chosen)
            column += part.shape[1]


class _WindowReader:
    """A background thread reading `windows` into a fixed pool of window memories (`_new_parts`), in
    order; iterate for (parts, order) as `_read_window` gives them, and `release` the parts once gathered from.
    Time spent waiting is added to the loader's stall time."""

    def __init__(self, loader: ActivationLoader, epoch: int, windows: list[tuple[int, np.ndarray]]) -> None:
        self.loader = loader
        self.free: queue.Queue = queue.Queue()
        self.held: list[list[torch.Tensor]] = []  # every window memory this reader has used: the loader's on close
        for _ in range(min(WINDOW_BUFFERS, len(windows))):
            spare = loader.spare_windows.pop() if loader.spare_windows else None  # None: allocated on first use
            if spare is not None:
                self.held.append(spare)
            self.free.put(spare)
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(epoch, windows), daemon=True, name="loader")
        self.thread.start()

    def _read(self, epoch: int, windows: list[tuple[int, np.ndarray]]) -> None:
        try:
            for index, window in windows:
                parts = self.free.get()
                if self.stop.is_set():
                    return
                if parts is None:
                    parts = self.loader._new_parts(self.loader.window_chunks * self.loader.chunk_tokens)
                    self.held.append(parts)
                self.ready.put((parts, self.loader._read_window(epoch, index, window, parts)))
            self.ready.put(None)
        except BaseException as exc:  # surfaced in the consumer
            self.ready.put(exc)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        while True:
            waited = time.perf_counter()
            item = self.ready.get()
            self.loader.stall_seconds += time.perf_counter() - waited
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, parts: list[torch.Tensor]) -> None:
        self.free.put(parts)

    def close(self) -> None:
        self.stop.set()
        self.free.put(None)  # wakes a reader waiting for a buffer, so that it sees `stop`
        self.thread.join()
        self.loader.spare_windows += self.held  # the next stream reuses it: no page faults of fresh memory


def _excluded_positions(
    store: ActivationStore, split: str, exclude_bos: bool, documents: np.ndarray | None = None
) -> np.ndarray:
    """Sorted token positions left out of training: each document's leading BOS, where excluded and present, and
    every token of the documents `documents` leaves out."""
    offsets = store.doc_offsets(split)
    left_out = [np.zeros(0, dtype=np.int64)]
    if exclude_bos and store.attrs.get("bos_token_id") is not None:
        starts = offsets[:-1]
        left_out.append(starts[starts < len(store.tokens(split))])
    if documents is not None:
        lengths = np.diff(offsets)[~documents]
        first = np.repeat(offsets[:-1][~documents] - np.cumsum(lengths) + lengths, lengths)
        left_out.append(first + np.arange(len(first)))
    return np.unique(np.concatenate(left_out)).astype(np.int64)


def _check_finite(store: ActivationStore, split: str, hook: str, start: int, rows: np.ndarray) -> None:
    """An error naming the first token and document of `rows` (tokens start...) with a NaN or inf."""
    if _all_finite(rows):
        return
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        token = start + int(np.argmin(finite))
        doc = int(np.searchsorted(store.doc_offsets(split), token, side="right")) - 1
        raise PipelineError(
            f"{store.path} {split}/{hook}: non-finite activation at token {token} (document {doc}); "
            "re-extract with a wider dtype or exclude that document"
        )


def _all_finite(rows: np.ndarray) -> bool:
    """Whether every value of `rows` is finite: whether their smallest and largest are (both propagate NaN), one
    pass, several times faster than numpy's `isfinite` (emulated for float16)."""
    if rows.size == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(torch.from_numpy(rows)))).all())
