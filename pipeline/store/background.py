"""Writing shards on a thread, so that the model computes the next shard while the last one goes to storage."""

from __future__ import annotations

import queue
import threading

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.store.writer import StoreWriter


class BackgroundWriter:
    """Writes shards on a thread so that the model never waits on the disk; errors surface on the next call."""

    def __init__(self, writer: StoreWriter, max_pending: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="store-writer")
        self.thread.start()

    def submit(self, split: str, index: int, start: int, activations: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self.queue.put((split, index, start, activations))

    def close(self) -> None:
        """Wait until every submitted shard is written."""
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_shard(*item)
                except BaseException as exc:  # kept and re-raised in the producer's thread
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise PipelineError(f"writing the store failed: {self.error}") from self.error
