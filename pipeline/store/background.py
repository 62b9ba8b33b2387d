"""Writing shards on threads, so that the model computes the next shard while the last ones go to storage.

Several shards are written at once: hashing and file writes release the GIL, so each writer thread uses a core
of its own, and a store on object storage has several uploads in flight.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.store.writer import StoreWriter

MAX_WRITERS = 4  # threads writing shards at once (at most the machine's cores)


def default_workers() -> int:
    return max(1, min(MAX_WRITERS, os.cpu_count() or 1))


class BackgroundWriter:
    """Writes shards on `workers` threads; a write's error surfaces on the next call."""

    def __init__(self, writer: StoreWriter, workers: int | None = None) -> None:
        self.writer = writer
        workers = workers or default_workers()
        self.queue: queue.Queue = queue.Queue(maxsize=workers)  # shards waiting: memory of `workers` more shards
        self.error: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._run, daemon=True, name=f"store-writer-{i}") for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def submit(
        self,
        split: str,
        index: int,
        start: int,
        activations: dict[str, np.ndarray],
        ready: Callable[[], None] = lambda: None,
    ) -> None:
        """Queue a shard; a writer thread calls `ready()` (wait for a device-to-host copy) before writing it."""
        self._raise_if_failed()
        self.queue.put((split, index, start, activations, ready))

    def close(self) -> None:
        """Wait until every submitted shard is written."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                split, index, start, activations, ready = item
                try:
                    ready()
                    self.writer.write_shard(split, index, start, activations)
                except BaseException as exc:  # kept and re-raised in the producer's thread
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise PipelineError(f"writing the store failed: {self.error}") from self.error
